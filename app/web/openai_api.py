"""An OpenAI-compatible API for other client applications, so their users' chats and thumbs feed the loop too.

`POST /v1/chat/completions` (streaming or not) is answered by the served adapter through the chat page's own
`ChatService.send`: the same system prompt, sampling, context trimming and message budgets, and the conversation,
user message and answer stored exactly like a chat turn. The stored answer id comes back as the response's `id`
and in the ANSWER_HEADER header; a streamed answer is stored once it is complete, so there it is the `id` of the
last chunk (the one with `finish_reason`), which also carries it as `kto_answer_id`. `POST /v1/feedback` rates an
answer through `ChatService.rate`/`comment`, like a thumb on the page.

Each client application has its own key (`kto-loop keys create NAME`; only its hash is stored) and passes its end
user's id in OpenAI's `user` field: chats and ratings are attributed to `key:NAME/USER` (or `key:NAME`), so the
per-identity budgets and the training snapshot's per-identity share cap hold per end user, while the per-address
budgets and share cap still hold for the client as a whole (its requests come from its address). The client's own
system messages and sampling settings are refused or ignored: the operator sets those for every channel alike.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.web.admin_api import API_PREFIX
from app.web.chat import ChatService, ChatSession, InputError, RatingError, Refused, Turn

ANSWER_HEADER = "X-KTO-Loop-Answer-Id"
DROPPED_HEADER = "X-KTO-Loop-Dropped-Messages"
MODEL_NAME = "kto-loop"            # what /v1/models lists; a request's `model` is ignored (the served one answers)
_USER_RE = re.compile(r"^[\w.@+-]{1,128}$")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, error type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "code": self.code,
                                       "param": None}}, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class ChatRequest:
    history: list[tuple[str, str]]     # earlier (role, content) turns, user/assistant only
    text: str                          # the last user message: the one answered
    user: str | None
    stream: bool
    include_usage: bool


def attributed_id(client: str, user: str | None) -> str:
    """The rater id a client's request counts as: one per end user of the client, or the client itself."""
    return f"key:{client}/{user}" if user else f"key:{client}"


def owned_by(owner: str | None, client: str) -> bool:
    """Whether a conversation's user id belongs to this client (any of its end users)."""
    return owner is not None and (owner == f"key:{client}" or owner.startswith(f"key:{client}/"))


def _text(content: Any) -> str:
    """A message's text: a string, or a list of text parts (anything else is refused: the model reads text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, "only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, "a message's content must be a string or a list of text parts")


def check_user(user: Any) -> str | None:
    if user is None or user == "":
        return None
    if not isinstance(user, str) or not _USER_RE.match(user):
        raise ApiError(400, "user must be 1-128 letters, digits or . @ + - _", code="invalid_user")
    return user


def parse_chat_request(body: Any) -> ChatRequest:
    """Check an OpenAI chat request and take what the app uses from it; ApiError says what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for m in msgs:
        if not isinstance(m, dict):
            raise ApiError(400, "each message must be an object with role and content")
        role = m.get("role")
        if role in ("system", "developer"):
            raise ApiError(400, "the system prompt is set by the operator for every client; send user and "
                                "assistant messages only", code="system_message_not_allowed")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"unsupported message role {role!r} (user and assistant only)")
        turns.append((role, _text(m.get("content"))))
    if turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "n must be 1: one answer per request (ask again for another)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    opts = body.get("stream_options") or {}
    return ChatRequest(history=turns[:-1], text=turns[-1][1], user=check_user(body.get("user")), stream=stream,
                       include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")))


def bearer(header: str | None) -> str | None:
    if not header or not header.lower().startswith("bearer "):
        return None
    return header[7:].strip() or None


def _chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None, **extra: Any) -> str:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def _usage(answer: dict) -> dict[str, int]:
    p, c = answer.get("prompt_tokens") or 0, answer.get("completion_tokens") or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(answer: dict) -> str:
    max_tokens = (answer.get("sampling") or {}).get("max_tokens")
    done = answer.get("completion_tokens")
    return "length" if isinstance(max_tokens, int) and isinstance(done, int) and done >= max_tokens else "stop"


def _failure(service: ChatService, e: BaseException) -> ApiError:
    if isinstance(e, Refused):
        return ApiError(429, str(e), "rate_limit_exceeded", "rate_limit_exceeded")
    if isinstance(e, InputError):
        return ApiError(400, str(e))
    if not service.server_ok():
        return ApiError(503, "the model server is not reachable right now; try again in a moment", "server_error")
    return ApiError(502, f"the answer failed ({getattr(e, 'user_message', type(e).__name__)})", "server_error")


def openai_router(store: Any, service: ChatService, raters: Any) -> APIRouter:
    """/v1/chat/completions, /v1/feedback and /v1/models for clients holding an API key."""
    router = APIRouter(prefix="/v1")

    def client_of(request: Request) -> str:
        client = store.client_of_key(bearer(request.headers.get("authorization")))
        if client is None:
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY; the operator makes keys with "
                                "`kto-loop keys create NAME`)", code="invalid_api_key")
        return client

    def session_for(request: Request, client: str, user: str | None) -> ChatSession:
        return ChatSession(user_id=attributed_id(client, user), addr=raters.of_request(request).addr)

    @router.get("/models")
    def models(request: Request) -> JSONResponse:
        try:
            client_of(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                                         "owned_by": "kto-loop"}]})

    @router.post("/chat/completions")
    def chat_completions(request: Request, body: Annotated[Any, Body()] = None):
        try:
            client = client_of(request)
            req = parse_chat_request(body)
        except ApiError as e:
            return e.response()
        sess = session_for(request, client, req.user)
        sess.turns = [Turn(role, content) for role, content in req.history]
        model = service.registry.current()
        gen = service.send(sess, req.text)
        try:
            first = next(gen)   # budgets, input checks and trimming run here, so they answer with a status
        except StopIteration:
            first = None
        except Exception as e:
            return _failure(service, e).response()
        answer = next((t for t in reversed(sess.turns) if t.role == "assistant"), None)
        created = int(time.time())
        if not req.stream:
            try:
                for _ in gen:
                    pass
            except Exception as e:
                return _failure(service, e).response()
            if answer is None or answer.msg_id is None:
                return ApiError(502, "the answer was not stored", "server_error").response()
            stored = store.get_answer(answer.msg_id)
            headers = {ANSWER_HEADER: answer.msg_id}
            if answer.dropped:
                headers[DROPPED_HEADER] = str(answer.dropped)
            return JSONResponse({
                "id": answer.msg_id, "object": "chat.completion", "created": created, "model": answer.adapter,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": stored["text"]},
                             "finish_reason": _finish_reason(stored), "logprobs": None}],
                "usage": _usage(stored)}, headers=headers)
        return StreamingResponse(_events(store, service, gen, first, answer, model, created, req.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/feedback")
    def feedback(request: Request, body: Annotated[Any, Body()] = None):
        try:
            client = client_of(request)
            return JSONResponse(_rate(store, service, session_for, request, client, body))
        except ApiError as e:
            return e.response()

    return router


def _events(store: Any, service: ChatService, gen: Iterator[str], first: str | None, answer: Turn | None,
            model: str, created: int, include_usage: bool) -> Iterator[str]:
    """The answer as server-sent events: deltas of the growing text, then a last chunk naming the stored answer."""
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    sent = ""
    yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
    try:
        for text in _chain(iter([first] if first is not None else []), gen):
            if text.startswith(sent) and len(text) > len(sent):
                yield _chunk(cid, created, model, {"content": text[len(sent):]})
                sent = text
        if answer is None or answer.msg_id is None:
            raise RuntimeError("the answer was not stored")
        stored = store.get_answer(answer.msg_id)
    except Exception as e:
        err = _failure(service, e)
        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'code': err.code}})}\n\n"
        return
    adapter = answer.adapter or model
    yield _chunk(answer.msg_id, created, adapter, {}, _finish_reason(stored), kto_answer_id=answer.msg_id)
    if include_usage:
        usage = {"id": answer.msg_id, "object": "chat.completion.chunk", "created": created, "model": adapter,
                 "choices": [], "usage": _usage(stored)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def _chain(*its: Iterator[str]) -> Iterator[str]:
    for it in its:
        yield from it


def _rate(store: Any, service: ChatService, session_for: Any, request: Request, client: str, body: Any) -> dict:
    """Apply one rating from a client; returns what was stored. ApiError for what is refused."""
    from feedback_store import StoreError

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    answer_id, value = body.get("answer_id"), body.get("value", ...)
    if not isinstance(answer_id, str) or not answer_id:
        raise ApiError(400, "answer_id must be the id a completion returned")
    if value is ... or value not in ("up", "down", None):
        raise ApiError(400, 'value must be "up", "down" or null (withdraw)')
    reason, comment = body.get("reason"), body.get("comment")
    if (reason is not None or comment is not None) and value != "down":
        raise ApiError(400, "reason and comment go with a thumbs-down")
    if not (reason is None or isinstance(reason, str)) or not (comment is None or isinstance(comment, str)):
        raise ApiError(400, "reason and comment must be strings")
    user = check_user(body.get("user"))
    if not owned_by(store.answer_owner(answer_id), client):   # a client rates only answers it was given
        raise ApiError(404, f"no answer {answer_id!r} for this API key", code="unknown_answer")
    sess = session_for(request, client, user)
    current = store.get_rating(sess.user_id, answer_id)
    sess.turns = [Turn("assistant", "", msg_id=answer_id, rating=current["value"] if current else None)]
    try:
        if reason is not None or comment is not None:
            service.comment(sess, answer_id, reason, comment)
        else:
            service.rate(sess, 0, {"up": True, "down": False}.get(value))
    except RatingError as e:
        raise ApiError(429, str(e), "rate_limit_exceeded", "rate_limit_exceeded") from None
    except InputError as e:
        raise ApiError(400, str(e)) from None
    except StoreError as e:
        raise ApiError(500, getattr(e, "user_message", str(e)), "server_error") from None
    return {"answer_id": answer_id, "value": value, "user_id": sess.user_id}


def keys_router(store: Any) -> APIRouter:
    """/api/admin/keys: the operator's API (behind admin auth and the forgery guard) to make and revoke keys."""
    from feedback_store import InvalidInput

    router = APIRouter(prefix=API_PREFIX)

    def name_of(body: Any) -> str:
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            raise HTTPException(400, "name: the client's name is needed")
        return name

    @router.get("/keys")
    def list_keys():
        return {"keys": json.loads(json.dumps(store.api_keys(), default=str))}

    @router.post("/keys")
    def create_key(body: Annotated[Any, Body()] = None):
        try:
            secret, row = store.create_api_key(name_of(body))
        except InvalidInput as e:
            raise HTTPException(400, str(e)) from None
        return {"key": secret, **json.loads(json.dumps(row, default=str))}

    @router.post("/keys/revoke")
    def revoke_key(body: Annotated[Any, Body()] = None):
        name = name_of(body)
        try:
            n = store.revoke_api_key(name)
        except InvalidInput as e:
            raise HTTPException(400, str(e)) from None
        if not n:
            raise HTTPException(404, f"client {name!r} has no active key")
        return {"name": name, "revoked": n}

    return router
