"""Streaming chat client for the vLLM OpenAI-compatible server (httpx, `/v1/chat/completions`, stream=true).

The adapter is picked by name per request, so an answer ends on the version it started on. Closing the stream
makes vLLM abort the request. With an `Admission`, each stream holds a place of its kind from its first read to
its end, so the product's own requests give way to people chatting (serving/admission.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from serving.admission import KINDS, Admission, slot
from serving.server import auth_header


class ChatError(RuntimeError):
    """The server answered but refused the request (unknown model, bad parameters...)."""


class ServerUnavailable(ChatError):
    """The server cannot be reached, dropped the connection, or timed out."""


@dataclass(frozen=True)
class SamplingParams:
    """What is sent to vLLM. There is no seed on purpose: `seed=` crashes vLLM's CPU sampler."""
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)   # other vLLM fields, e.g. {"ignore_eos": True}

    def to_request(self) -> dict[str, Any]:
        body: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                                "max_tokens": self.max_tokens}
        if self.stop:
            body["stop"] = list(self.stop)
        if self.presence_penalty:
            body["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            body["frequency_penalty"] = self.frequency_penalty
        body.update({k: v for k, v in self.extra.items() if k != "seed"})
        return body

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class ChatResult:
    text: str
    model: str                          # the name that produced it: "base" or an adapter version
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    time_to_first_token_s: float | None
    finish_reason: str | None           # "stop", "length", or "cancelled" when the caller closed the stream


class ChatStream:
    """Iterate for text chunks; `.result` is set once the stream ends (also after close())."""

    def __init__(self, client: ChatClient, body: dict[str, Any], deadline_s: float, kind: str = "user"):
        self._client = client
        self._body = body
        self._kind = kind
        self._deadline_s = deadline_s
        self._cm = None
        self._response: httpx.Response | None = None
        self._gen = self._run()
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and close the HTTP stream (vLLM aborts the request)."""
        self._gen.close()
        if self.result is None:  # closed before the first read: nothing was sent
            self.result = ChatResult("", self._body["model"], None, None, 0.0, None, "cancelled")

    def text(self) -> str:
        """Consume the stream and return the whole answer."""
        return "".join(self)

    def _run(self) -> Iterator[str]:
        with slot(self._client.admission, self._kind):
            yield from self._stream()

    def _stream(self) -> Iterator[str]:
        t0 = time.monotonic()
        ttft = None
        parts: list[str] = []
        model = self._body["model"]
        finish = None
        usage: dict[str, Any] = {}
        url = f"{self._client.base_url}/v1/chat/completions"
        try:
            with self._client._http.stream("POST", url, json=self._body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise _http_error(resp)
                for line in resp.iter_lines():
                    if time.monotonic() - t0 > self._deadline_s:
                        raise ServerUnavailable(f"answer took longer than {self._deadline_s:.0f}s")
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ChatError(f"vLLM error mid-stream: {chunk['error']}")
                    model = chunk.get("model", model)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                        if piece:
                            if ttft is None:
                                ttft = time.monotonic() - t0
                            parts.append(piece)
                            yield piece
        except GeneratorExit:
            finish = finish or "cancelled"
            raise
        except httpx.TimeoutException as e:
            raise ServerUnavailable(f"vLLM server at {self._client.base_url} timed out ({type(e).__name__})") from e
        except (httpx.TransportError, httpx.RemoteProtocolError) as e:
            raise ServerUnavailable(f"vLLM server at {self._client.base_url} is unavailable: {e}") from e
        finally:
            self.result = ChatResult(text="".join(parts), model=model, prompt_tokens=usage.get("prompt_tokens"),
                                     completion_tokens=usage.get("completion_tokens"),
                                     latency_s=time.monotonic() - t0, time_to_first_token_s=ttft,
                                     finish_reason=finish)


def _http_error(resp: httpx.Response) -> ChatError:
    try:
        err = resp.json().get("error", {})
        msg = (err.get("message") if isinstance(err, dict) else str(err)) or resp.text
    except (ValueError, AttributeError):   # not JSON, or not an object ({"error": "Unauthorized"} is)
        msg = resp.text
    if resp.status_code >= 500:
        return ServerUnavailable(f"vLLM returned HTTP {resp.status_code}: {msg}")
    return ChatError(f"vLLM refused the request (HTTP {resp.status_code}): {msg}")


class ChatClient:
    """Thread-safe (one pooled httpx.Client). `read_timeout` = longest silence between two chunks. `api_key`: the
    server's (VLLMServer.api_key), sent with every request; vLLM refuses /v1 requests without it."""

    def __init__(self, base_url: str, connect_timeout: float = 5.0, read_timeout: float = 120.0,
                 total_timeout: float = 600.0, max_connections: int = 256, admission: Admission | None = None,
                 api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.admission = admission
        self.total_timeout = total_timeout
        self._http = httpx.Client(
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=30.0, pool=read_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=32),
            headers=auth_header(api_key))

    def stream_chat(self, messages: list[dict[str, str]], model: str, sampling: SamplingParams | None = None,
                    kind: str = "user") -> ChatStream:
        """Start a streamed answer; nothing is sent until the first iteration. `kind`: "user", or "background"
        for the product's own requests (held back while people chat when the client has an Admission)."""
        if kind not in KINDS:
            raise ValueError(f"request kind must be one of {KINDS}, got {kind!r}")
        body = {"model": model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **(sampling or SamplingParams()).to_request()}
        return ChatStream(self, body, self.total_timeout, kind)

    def chat(self, messages: list[dict[str, str]], model: str, sampling: SamplingParams | None = None,
             kind: str = "user") -> ChatResult:
        stream = self.stream_chat(messages, model, sampling, kind)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def models(self) -> list[str]:
        """Names the server serves now (base + loaded adapters)."""
        try:
            r = self._http.get(f"{self.base_url}/v1/models", timeout=10)
        except httpx.HTTPError as e:
            raise ServerUnavailable(f"vLLM server at {self.base_url} is unavailable: {e}") from e
        if r.status_code != 200:
            raise _http_error(r)
        return [m["id"] for m in r.json().get("data", [])]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
