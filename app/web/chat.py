"""The chat page: streaming answers from vLLM, thumbs up/down on every answer, all of it recorded in the store.

`ChatService` holds the logic and knows nothing about Gradio, so tests drive it directly; `build_chat_ui` wires
it to Gradio components. Each browser session owns a server-side `ChatSession` whose turns carry the stored
answer id, so a rating always lands on the answer the user saw, whatever undo/regenerate did to the list.
Conversations live in the store, keyed by the signed rater id: a page load lists the user's own (and only their
own), reopens the latest, and any of them can be continued; regenerated answers stay as siblings to page through.

What one visitor can make it do is bounded: messages and ratings per rater and per client address, sessions per
address (a flood from one address replaces that address's own sessions, nobody else's), and the prompt trimmed to
the model's context window. A user message is stored together with its answer, so failed tries leave nothing.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from app.web.auth import NO_IDENTITY, Buckets, Raters, memory_buckets
from feedback_store.errors import UnknownConversation

log = logging.getLogger("kto_loop.chat")

REASONS = ["inaccurate", "unhelpful", "off-topic", "unsafe", "too long", "too short", "other"]
MAX_COMMENT_CHARS = 1000
MAX_SESSIONS = 5000               # all addresses together; past it the busiest address loses its oldest session
TEMPLATE_TOKENS = 64              # chat-template tokens outside the messages (markers, a template's default prompt)
MESSAGE_TOKENS = 8                # chat-template tokens around each message
MAX_LISTED = 50                   # conversations listed per user, the most recently answered first
TITLE_CHARS = 48                  # a listed conversation's title: the start of its first user message
JOINERS = "\u200c\u200d"          # ZWNJ, ZWJ: format characters that written languages and emoji sequences need
NOT_YOURS = "That conversation is not among yours (or no longer exists)."
BUSY = "Please wait for the answer to finish (or press Stop) first."


class InputError(ValueError):
    """A user-facing problem with what was typed; the message is shown as is."""


class Refused(InputError):
    """A budget is spent (too many messages from this rater or address); shown as is, nothing stored."""


class RatingError(ValueError):
    """A user-facing problem with a rating (unknown answer, rate limit)."""


@dataclass
class Turn:
    role: str                     # "user" | "assistant"
    content: str
    msg_id: str | None = None     # store id: user message id or answer id
    rating: str | None = None     # "up" | "down" | None, as last stored
    stopped: bool = False
    adapter: str | None = None    # the served version that produced an answer
    dropped: int = 0              # earliest messages left out of this answer's prompt to fit the context window
    siblings: list[str] = field(default_factory=list)   # an answer's: every answer to its user message, oldest first


@dataclass(frozen=True)
class Limits:
    """Budgets per minute (0 = none): per rater and per client address; sessions kept per address (this process's
    open chat sessions, so that one stays per process on a shared store)."""
    messages_per_minute: int = 0
    address_messages_per_minute: int = 0
    address_ratings_per_minute: int = 0
    sessions_per_address: int = 0


@dataclass
class ChatSession:
    user_id: str
    addr: str | None = None       # the client address of the latest event (None: an in-process caller)
    conv_id: str | None = None
    turns: list[Turn] = field(default_factory=list)
    focus: int | None = None      # the answer whose siblings the ‹ › buttons page through (None: the latest such)
    streaming: int = 0            # answers being generated: the shown conversation cannot be swapped meanwhile
    listed_top: str | None = None  # the conversation the page lists first: while it is the one shown, no relisting
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def history(self) -> list[dict[str, str]]:
        return [{"role": t.role, "content": t.content} for t in self.turns]

    def feedback(self) -> list[str | None]:
        """Per assistant message, the thumb to show ("Like"/"Dislike"/None), in order."""
        return [{"up": "Like", "down": "Dislike"}.get(t.rating) for t in self.turns if t.role == "assistant"]


def clean_message(text: str | None, max_chars: int) -> str:
    """Return the message to send, or raise InputError with a friendly explanation."""
    text = (text or "").strip()
    if not text:
        raise InputError("Please type a message first.")
    if len(text) > max_chars:
        raise InputError(f"Your message is {len(text):,} characters long; the limit is {max_chars:,}. "
                         "Please shorten it.")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") and c not in "\n\t" + JOINERS]
    if bad:
        raise InputError(f"Your message contains {len(bad)} invisible control character(s) "
                         f"(first: U+{ord(bad[0]):04X}). Please remove them and send again.")
    return text


def clean_comment(text: str | None) -> str | None:
    text = "".join(c for c in (text or "") if c in "\n\t" + JOINERS or unicodedata.category(c)[0] != "C").strip()
    if len(text) > MAX_COMMENT_CHARS:
        raise InputError(f"Comments are limited to {MAX_COMMENT_CHARS} characters.")
    return text or None


def title_of(first_message: str | None) -> str:
    """A listed conversation's title: its first user message on one line, control characters dropped, cut short
    (plain text: the list shows it as text, never as markup)."""
    text = "".join(c if c in JOINERS or unicodedata.category(c)[0] != "C" else " " for c in first_message or "")
    text = " ".join(text.split())
    if len(text) > TITLE_CHARS:
        text = text[:TITLE_CHARS - 1].rstrip() + "…"
    return text or "(untitled)"


def thread(nodes: list[dict], through: str) -> list[dict]:
    """The line of a conversation tree that passes through node `through`: its ancestors, itself, then at each
    step down its most recent child (what the user last saw there). `nodes` come oldest first."""
    by_id = {n["id"]: n for n in nodes}
    children: dict[str | None, list[dict]] = {}
    for n in nodes:
        children.setdefault(n["parent_id"], []).append(n)
    line: list[dict] = []
    seen: set[str] = set()
    node = by_id.get(through)
    while node is not None and node["id"] not in seen:
        seen.add(node["id"])
        line.append(node)
        node = by_id.get(node["parent_id"])
    line.reverse()
    node = by_id.get(through)
    while node is not None and (kids := [k for k in children.get(node["id"], []) if k["id"] not in seen]):
        node = kids[-1]
        seen.add(node["id"])
        line.append(node)
    return line


def turns_of(nodes: list[dict], line: list[dict]) -> list[Turn]:
    """The turns to show for `line` (from `thread`), each answer with its siblings and the user's rating."""
    siblings: dict[str, list[str]] = {}
    for n in nodes:
        if n["role"] == "assistant":
            siblings.setdefault(n["parent_id"], []).append(n["id"])
    return [Turn(n["role"], n["content"], msg_id=n["id"], rating=n.get("rating"), adapter=n.get("adapter"),
                 siblings=list(siblings.get(n["parent_id"], [])) if n["role"] == "assistant" else [])
            for n in line]


def byte_bound(messages: list[dict[str, str]]) -> int:
    """Tokens a prompt can take at most, without its tokenizer: byte-level BPE and byte-fallback tokenizers never
    make more tokens than UTF-8 bytes; plus the chat template's markers."""
    return TEMPLATE_TOKENS + sum(len(m["content"].encode()) + MESSAGE_TOKENS for m in messages)


def fit_context(system: list[dict[str, str]], turns: list[dict[str, str]], budget: int,
                count: Callable[[list[dict[str, str]]], int]) -> tuple[list[dict[str, str]], int]:
    """The prompt to send: the system message and the latest turns that fit in `budget` tokens, the oldest
    exchanges left out first (a kept part always starts at a user message). Returns (messages, how many turns were
    left out); raises InputError when the last user message alone does not fit."""
    if count(system + turns) <= budget:
        return system + turns, 0
    starts = [i for i, m in enumerate(turns) if m["role"] == "user"]

    def fits(i: int) -> bool:
        return count(system + turns[i:]) <= budget

    if not starts or not fits(starts[-1]):
        raise InputError(f"Your message is too long for the model, which reads at most about {budget:,} tokens "
                         "(with the system prompt). Please shorten it.")
    lo, hi = 0, len(starts) - 1                      # the earliest start that fits; fewer turns never take more
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(starts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return system + turns[starts[lo]:], starts[lo]


class PromptTokens:
    """A prompt's length in the served model's tokens: its own tokenizer and chat template once loaded (in the
    background, so neither start-up nor the first chat waits), the byte bound before that or if it cannot load."""

    MARGIN = 16   # a template rendered here and in vLLM may differ by a marker or two

    def __init__(self, model_dir: Path | str | None = None):
        self._tokenizer: Any = None
        if model_dir is not None and (Path(model_dir) / "tokenizer_config.json").exists():
            threading.Thread(target=self._load, args=(Path(model_dir),), name="chat-tokenizer", daemon=True).start()

    def _load(self, model_dir: Path) -> None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
            _template_len(tok, [{"role": "user", "content": "hi"}])
        except Exception as e:  # no template, broken files: the bound still keeps prompts inside the window
            log.warning("chat: counting prompt tokens by bytes (tokenizer of %s not usable: %r)", model_dir, e)
            return
        self._tokenizer = tok

    def __call__(self, messages: list[dict[str, str]]) -> int:
        tok = self._tokenizer
        if tok is not None:
            try:
                return _template_len(tok, messages) + self.MARGIN
            except Exception:
                pass
        return byte_bound(messages)


def _template_len(tok: Any, messages: list[dict[str, str]]) -> int:
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _consume_stream(stream: Iterator[Any]) -> Iterator[tuple[str | None, Any]]:
    """Yield (chunk, None) per text chunk, then (None, ChatResult) once (yielded last or returned)."""
    result = None
    while True:
        try:
            item = next(stream)
        except StopIteration as stop:
            result = stop.value if stop.value is not None else result
            break
        if isinstance(item, str):
            yield item, None
        else:
            result = item
    yield None, result


class ChatService:
    """Chat, regenerate and rate, writing through the feedback store; thread-safe per session."""

    def __init__(self, store, client, registry, *, system_prompt: Callable[[], str],
                 sampling: Callable[[], Any], max_chars: int, ratings_per_minute: int,
                 health: Callable[[], bool] | None = None, limits: Limits = Limits(),
                 context_tokens: int = 0, count_tokens: Callable[[list[dict[str, str]]], int] = byte_bound,
                 buckets: Buckets = memory_buckets):
        """context_tokens: the model's window (prompt + answer), 0 = never trim; count_tokens: a prompt's length;
        buckets: where the rate limits' buckets live (app/web/auth.py buckets_for)."""
        self.store, self.client, self.registry = store, client, registry
        self.system_prompt, self.sampling = system_prompt, sampling
        self.max_chars = max_chars
        self.limits = limits
        self.limiter = buckets("ratings", ratings_per_minute, 60.0)
        self.address_ratings = buckets("address-ratings", limits.address_ratings_per_minute, 60.0)
        self.messages = buckets("messages", limits.messages_per_minute, 60.0)
        self.address_messages = buckets("address-messages", limits.address_messages_per_minute, 60.0)
        self.context_tokens, self.count_tokens = context_tokens, count_tokens
        self.health = health
        self._sessions: dict[tuple[str, str], tuple[ChatSession, str | None]] = {}   # → (session, address opened from)
        self._by_addr: dict[str | None, OrderedDict[tuple[str, str], None]] = {}   # least recent first
        self._lock = threading.Lock()

    # ---- sessions
    def session(self, key: str, user_id: str, addr: str | None = None) -> ChatSession:
        """The session `key` of this user (a key is only ever looked up with its own user's id)."""
        skey = (user_id, key)
        with self._lock:
            found = self._sessions.get(skey)
            if found is not None:
                sess, home = found
                self._by_addr[home].move_to_end(skey)
                if addr is not None:
                    sess.addr = addr
                return sess
            sess = ChatSession(user_id=user_id, addr=addr)
            self._sessions[skey] = (sess, addr)
            mine = self._by_addr.setdefault(addr, OrderedDict())
            mine[skey] = None
            cap = self.limits.sessions_per_address
            while addr is not None and cap > 0 and len(mine) > cap:
                self._evict(addr)
            while len(self._sessions) > MAX_SESSIONS:
                self._evict(max(self._by_addr, key=lambda a: len(self._by_addr[a])))
            return sess

    def _evict(self, addr: str | None) -> None:
        """Under self._lock: drop the least recently used session of `addr` (counted where it was opened)."""
        per = self._by_addr[addr]
        skey, _ = per.popitem(last=False)
        del self._sessions[skey]
        if not per:
            del self._by_addr[addr]

    def session_count(self, addr: str | None = None) -> int:
        with self._lock:
            return len(self._by_addr.get(addr, ()))

    def server_ok(self) -> bool:
        if self.health is None:
            return True
        try:
            return bool(self.health())
        except Exception:
            return False

    # ---- chat
    def _charge_message(self, sess: ChatSession) -> None:
        """Take one message from the rater's and the address's budgets, or refuse."""
        if not self.messages.allow(sess.user_id):
            raise Refused("You're sending messages very quickly; please wait a moment and try again.")
        if sess.addr is not None and not self.address_messages.allow(sess.addr):
            raise Refused("Too many messages from your network right now; please wait a moment and try again.")

    def send(self, sess: ChatSession, text: str) -> Iterator[str]:
        """Stream the answer to a new user message (stored with the answer); yields the growing answer text."""
        text = clean_message(text, self.max_chars)
        self._charge_message(sess)
        with sess.lock:
            user_turn = Turn("user", text)
            sess.turns.append(user_turn)
            sess.streaming += 1
            sess.focus = None
        try:
            yield from self._answer(sess)
        except BaseException:
            with sess.lock:  # failed before any answer: the text goes back to the box, not twice into history
                if sess.turns and sess.turns[-1] is user_turn:
                    sess.turns.pop()
            raise
        finally:
            with sess.lock:
                sess.streaming -= 1

    def regenerate(self, sess: ChatSession) -> Iterator[str]:
        """Answer the last user message again; the earlier answer stays in the store as a sibling."""
        with sess.lock:
            last_user = max((i for i, t in enumerate(sess.turns) if t.role == "user"), default=None)
            if last_user is None:
                raise InputError("There is nothing to regenerate yet.")
        self._charge_message(sess)
        with sess.lock:
            old = sess.turns[last_user + 1] if len(sess.turns) > last_user + 1 else None
            earlier = (old.siblings or [old.msg_id]) if old is not None and old.msg_id is not None else []
            del sess.turns[last_user + 1:]
            sess.streaming += 1
            sess.focus = None
        try:
            yield from self._answer(sess, earlier)
        finally:
            with sess.lock:
                sess.streaming -= 1

    def undo(self, sess: ChatSession) -> str:
        """Drop the last exchange from the view (the store keeps it); returns the user text to edit."""
        with sess.lock:
            last_user = max((i for i, t in enumerate(sess.turns) if t.role == "user"), default=None)
            if last_user is None:
                return ""
            text = sess.turns[last_user].content
            del sess.turns[last_user:]
            return text

    def new_conversation(self, sess: ChatSession) -> None:
        with sess.lock:
            if sess.streaming:
                raise InputError(BUSY)
            sess.conv_id, sess.turns, sess.focus = None, [], None

    # ---- stored conversations
    def conversations(self, sess: ChatSession) -> list[tuple[str, str]]:
        """(title, id) of this user's own conversations, the most recently answered first, at most MAX_LISTED."""
        return [(title_of(r["first_message"]), r["id"])
                for r in self.store.user_conversations(sess.user_id, MAX_LISTED)]

    def _nodes(self, sess: ChatSession, conv_id: Any) -> list[dict]:
        """The stored turns of `conv_id` if this session's user owns it; InputError otherwise."""
        if not isinstance(conv_id, str):
            raise InputError(NOT_YOURS)
        try:
            return self.store.user_conversation(sess.user_id, conv_id)
        except UnknownConversation:
            raise InputError(NOT_YOURS) from None

    def open_conversation(self, sess: ChatSession, conv_id: Any) -> None:
        """Show one of the user's own conversations at its latest turn; what is sent next continues it."""
        nodes = self._nodes(sess, conv_id)
        latest = nodes[-1]["id"] if nodes else None
        turns = turns_of(nodes, thread(nodes, latest)) if latest is not None else []
        with sess.lock:
            if sess.streaming:
                raise InputError(BUSY)
            sess.conv_id, sess.turns, sess.focus = conv_id, turns, None

    def sibling_nav(self, sess: ChatSession) -> tuple[int, int, int] | None:
        """(turn index, 1-based position, count) of the answer the ‹ › buttons page through: the focused one, else
        the latest answer that has siblings; None when no answer shown has any."""
        with sess.lock:
            turns = sess.turns
            candidates = [i for i, t in enumerate(turns)
                          if t.role == "assistant" and t.msg_id in t.siblings and len(t.siblings) > 1]
            if not candidates:
                return None
            i = sess.focus if sess.focus in candidates else candidates[-1]
            return i, turns[i].siblings.index(turns[i].msg_id) + 1, len(turns[i].siblings)

    def focus(self, sess: ChatSession, index: Any) -> None:
        """Point the ‹ › buttons at the answer the user clicked (if it has siblings)."""
        with sess.lock:
            if isinstance(index, int) and 0 <= index < len(sess.turns) and len(sess.turns[index].siblings) > 1:
                sess.focus = index

    def switch_answer(self, sess: ChatSession, step: int) -> Turn:
        """Show the previous (step -1) or next (+1) sibling of the navigated answer, with the turns that followed
        it; ratings then land on the shown sibling's own id. Returns the answer now shown."""
        nav = self.sibling_nav(sess)
        if nav is None or sess.conv_id is None:
            raise InputError("This answer has no other versions.")
        index, pos, count = nav
        target = pos - 1 + step
        if not 0 <= target < count:
            raise InputError("There is no other version in that direction.")
        with sess.lock:
            if sess.streaming:
                raise InputError(BUSY)
            answer_id = sess.turns[index].siblings[target]
        nodes = self._nodes(sess, sess.conv_id)
        turns = turns_of(nodes, thread(nodes, answer_id))
        index = next(i for i, t in enumerate(turns) if t.msg_id == answer_id)
        with sess.lock:
            if sess.streaming:
                raise InputError(BUSY)
            sess.turns, sess.focus = turns, index
            return turns[index]

    def _prompt(self, sess: ChatSession, sampling: Any) -> tuple[list[dict[str, str]], int]:
        """The messages to send, trimmed to the context window less the answer's room; and how many were left out."""
        system = self.system_prompt()
        msgs = [{"role": "system", "content": system}] if system else []
        turns = [{"role": t.role, "content": t.content} for t in sess.turns]
        if self.context_tokens <= 0:
            return msgs + turns, 0
        budget = self.context_tokens - (_max_tokens(sampling) or 0)
        return fit_context(msgs, turns, budget, self.count_tokens)

    def _store_user_turns(self, sess: ChatSession, user_turn: Turn) -> None:
        """Under sess.lock: store the conversation and the user messages up to `user_turn` not stored yet (only
        once an answer to them is about to be stored, so failed tries leave no orphan messages)."""
        upto = next(i for i, t in enumerate(sess.turns) if t is user_turn)
        for i, t in enumerate(sess.turns[:upto + 1]):
            if t.role != "user" or t.msg_id is not None:
                continue
            if sess.conv_id is None:
                sess.conv_id = self.store.new_conversation(sess.user_id, system_prompt=self.system_prompt())
            prev = sess.turns[i - 1] if i else None
            parent = prev.msg_id if prev is not None and prev.role == "assistant" else None  # None: the latest turn
            t.msg_id = self.store.add_user_message(sess.conv_id, t.content, parent_id=parent)

    def _answer(self, sess: ChatSession, earlier: list[str] | None = None) -> Iterator[str]:
        """Stream and store an answer to the last user turn; `earlier`: the answers it regenerates (its siblings)."""
        sampling = self.sampling()
        prompt, dropped = self._prompt(sess, sampling)
        user_turn = sess.turns[-1]
        model = self.registry.current()
        sess.stop.clear()
        turn = Turn("assistant", "", dropped=dropped)
        sess.turns.append(turn)
        t0 = time.perf_counter()
        result, parts, stopped, stream = None, [], False, None
        try:
            stream = self.client.stream_chat(prompt, model, sampling)
            for chunk, res in _consume_stream(stream):
                if res is not None:
                    result = res
                if chunk:
                    parts.append(chunk)
                    turn.content = "".join(parts)
                    yield turn.content
                if sess.stop.is_set():
                    stopped = True
                    _close(stream)
                    break
            result = result or getattr(stream, "result", None)
            text = "".join(parts)
            latency_ms = (time.perf_counter() - t0) * 1000
            turn.stopped = stopped
            turn.adapter = getattr(result, "model", None) or model
            if stopped and not text:  # stopped before the first token: nothing to keep or rate
                with sess.lock:
                    sess.turns.remove(turn)
                return
            with sess.lock:
                self._store_user_turns(sess, user_turn)
            turn.msg_id = self.store.add_answer(
                sess.conv_id, parent_id=user_turn.msg_id, prompt_messages=prompt, text=text,
                adapter=turn.adapter,
                sampling=_sampling_dict(sampling) | ({"stopped": True} if stopped else {})
                | ({"finish_reason": finish} if (finish := getattr(result, "finish_reason", None)) else {}),
                prompt_tokens=getattr(result, "prompt_tokens", None),
                completion_tokens=getattr(result, "completion_tokens", None),
                latency_ms=latency_ms,
            )
            turn.siblings = [*(earlier or []), turn.msg_id]
        except BaseException:  # failure, or the browser went away (GeneratorExit): abort the vLLM request
            _close(stream)
            with sess.lock:
                if turn in sess.turns:
                    sess.turns.remove(turn)
            raise
        yield text

    # ---- ratings
    def rate(self, sess: ChatSession, index: int, liked: Any, shown_text: Any = None) -> Turn:
        """Apply a like event: liked True/False = up/down, ""/None = withdraw. Returns the rated turn."""
        if not isinstance(index, int) or not 0 <= index < len(sess.turns):
            raise RatingError("That answer is no longer in this conversation.")
        turn = sess.turns[index]
        if turn.role != "assistant" or turn.msg_id is None:
            raise RatingError("Please wait until the answer has finished, then rate it.")
        shown = " ".join(_text_of(shown_text).split())
        if shown and shown != " ".join(turn.content.split()):
            raise RatingError("That answer changed while you rated it; please rate it again.")
        value = {True: "up", False: "down"}.get(liked) if isinstance(liked, bool) else None
        if value == turn.rating:
            return turn
        self._charge_rating(sess)
        self.store.rate(sess.user_id, turn.msg_id, value, client_addr=sess.addr)
        turn.rating = value
        return turn

    def _charge_rating(self, sess: ChatSession) -> None:
        """Take one rating from the rater's and the address's budgets, or refuse."""
        if not self.limiter.allow(sess.user_id):
            raise RatingError("You're rating very quickly; please wait a moment and try again.")
        if sess.addr is not None and not self.address_ratings.allow(sess.addr):
            raise RatingError("Too many ratings from your network right now; please wait a moment and try again.")

    def comment(self, sess: ChatSession, answer_id: str, reason: str | None, comment: str | None) -> None:
        """Attach a reason tag and comment to this user's thumbs-down on `answer_id`."""
        turn = next((t for t in sess.turns if t.msg_id == answer_id and t.role == "assistant"), None)
        if turn is None:
            raise RatingError("That answer is no longer in this conversation.")
        if reason is not None and reason not in REASONS:
            raise InputError("Please pick one of the listed reasons.")
        comment = clean_comment(comment)
        self._charge_rating(sess)
        self.store.rate(sess.user_id, answer_id, "down", reason=reason, comment=comment, client_addr=sess.addr)
        turn.rating = "down"


def _close(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


def _text_of(value: Any) -> str:
    """The plain text of a like event's value (a string, a list of parts, or {"type":"text","text":...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("text") or value.get("value") or "")
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    return ""


def _max_tokens(sampling: Any) -> int | None:
    """The answer's token allowance in whatever form the sampling settings come."""
    value = sampling.get("max_tokens") if isinstance(sampling, dict) else getattr(sampling, "max_tokens", None)
    return value if isinstance(value, int) else None


def _sampling_dict(sampling: Any) -> dict[str, Any]:
    if sampling is None:
        return {}
    if hasattr(sampling, "as_dict"):
        return dict(sampling.as_dict())
    if isinstance(sampling, dict):
        return dict(sampling)
    if hasattr(sampling, "__dataclass_fields__"):
        return {k: getattr(sampling, k) for k in sampling.__dataclass_fields__}
    return dict(vars(sampling))


# ---------------------------------------------------------------- Gradio wiring

SERVER_DOWN = ("⚠️ **The model server is not reachable right now.** Your messages are kept; "
               "try again in a moment, this page recovers by itself when the server is back.")

# The chatbot's own toolbar holds only its trash icon (buttons=["copy"] leaves out share and copy-all), which would
# duplicate "+ New conversation": hidden. Message buttons (👍 👎 copy undo) are 44×44 CSS px, the touch target size
# of Apple's HIG and WCAG 2.5.5 (tests/e2e/test_browser.py measures them at 390 px).
CSS = """
#kto-banner p {background:#fff4e5;border:1px solid #f0b37e;border-radius:8px;padding:8px 12px;margin:0}
#kto-notice p {color:#8a4b00;margin:0}
#kto-convs .wrap {flex-direction:column;align-items:stretch}
#kto-siblings {align-items:center}
footer {display:none !important}
#kto-chat .top-panel {display:none !important}
#kto-chat .message-buttons button {min-width:44px;min-height:44px;justify-content:center;align-items:center}
"""

# After a 👎 the reason panel, just under the chat, is scrolled into view if the page put it below the fold (a phone).
SHOW_DOWN_PANEL_JS = """() => { const show = () => { const p = document.querySelector('#kto-down-panel');
  if (p && p.offsetParent !== null) p.scrollIntoView({block: 'nearest'}); };
  for (const ms of [50, 250, 600]) setTimeout(show, ms); }"""


def trimmed_notice(dropped: int) -> str:
    return (f" ℹ️ This conversation is longer than the model can read at once: its {dropped} earliest "
            "message(s) were left out of this answer. Start a new conversation for a fresh context.")


def build_chat_ui(service: ChatService, raters: Raters, title: str = "kto-loop chat") -> gr.Blocks:
    """The chat Blocks; mount it at "/". Every event is refused unless `raters` knows who sent it."""

    def sess_of(key: str, request: gr.Request | None) -> ChatSession:
        """This page's session: keyed by Gradio's session hash, which a page sends with its very first event (the
        key state is only set by a load event, so a quick first message or the restoring load could miss it)."""
        rater = raters.of_request(request)
        if rater.user_id is None:
            raise InputError(NO_IDENTITY)
        page = getattr(request, "session_hash", None)
        return service.session(page if isinstance(page, str) and page else str(key), rater.user_id, rater.addr)

    def view(sess: ChatSession):
        return gr.update(value=sess.history(), feedback_value=sess.feedback())

    def side(sess: ChatSession, listed: list[tuple[str, str]] | None = None, relist: bool = True):
        """The conversation list and the ‹ n/m › row (outputs `side_io`), as the store and the session have them;
        relist=False leaves the list as it is."""
        if listed is None and relist and (sess.conv_id is None or sess.conv_id != sess.listed_top):
            try:
                listed = service.conversations(sess)
            except Exception as e:  # the chat itself still works without its list
                log.warning("chat: listing conversations failed: %r", e)
        convs_update = gr.update() if listed is None else gr.update(
            choices=listed, value=sess.conv_id if sess.conv_id in {c for _, c in listed} else None)
        if listed is not None:
            sess.listed_top = listed[0][1] if listed else None
        nav = service.sibling_nav(sess)
        if nav is None:
            return convs_update, gr.update(visible=False), gr.update(), gr.update(), gr.update()
        index, pos, count = nav
        nth = sum(1 for t in sess.turns[:index + 1] if t.role == "assistant")
        return (convs_update, gr.update(visible=True), f"Answer {nth}, version **{pos}/{count}**",
                gr.update(interactive=pos > 1), gr.update(interactive=pos < count))

    def unchanged_side():
        return (gr.update(),) * 5

    with gr.Blocks(title=title) as demo:
        key = gr.State(lambda: secrets.token_hex(8))
        pending_down = gr.State(None)
        gr.Markdown("## 💬 kto-loop\nChat with the model and rate its answers 👍 / 👎 — every rating helps "
                    "realign it. Click a thumb again to withdraw it.")
        banner = gr.Markdown("", elem_id="kto-banner", visible=False)
        with gr.Row():
            with gr.Column(scale=1, min_width=200):
                new = gr.Button("+ New conversation", size="sm", elem_id="kto-new")
                convs = gr.Radio([], value=None, label="Your conversations", elem_id="kto-convs",
                                 info=f"the latest {MAX_LISTED}, most recent first")
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(height=460, feedback_options=("Like", "Dislike"), elem_id="kto-chat",
                                     group_consecutive_messages=False, buttons=["copy"], layout="bubble",
                                     placeholder="Ask anything. Answers stream from the served model.")
                with gr.Row(visible=False, elem_id="kto-siblings") as sib_row:
                    prev = gr.Button("‹", size="sm", scale=0, min_width=40, elem_id="kto-prev")
                    sib_label = gr.Markdown("", elem_id="kto-sibling")
                    nxt = gr.Button("›", size="sm", scale=0, min_width=40, elem_id="kto-next")
                with gr.Group(visible=False, elem_id="kto-down-panel") as down_panel:   # under the rated answer
                    gr.Markdown("**What was wrong with this answer?** (optional)")
                    reason = gr.Radio(REASONS, label="Reason", elem_id="kto-reason")
                    comment = gr.Textbox(label="Comment", placeholder="Tell us more (optional)", max_lines=4,
                                         elem_id="kto-comment")
                    with gr.Row():
                        send_comment = gr.Button("Send feedback", size="sm", variant="primary",
                                                 elem_id="kto-send-comment")
                        skip_comment = gr.Button("Skip", size="sm")
                with gr.Row():
                    box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                     elem_id="kto-input", max_lines=8)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="kto-send")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="kto-stop")
                with gr.Row():
                    regen = gr.Button("↻ Regenerate", size="sm", elem_id="kto-regen")
                notice = gr.Markdown("", elem_id="kto-notice")
        side_io = [convs, sib_row, sib_label, prev, nxt]

        def stream(sess: ChatSession, gen: Iterator[str], restore: str = ""):
            """Yield `chat_io` as the answer grows (the list and ‹ › once it is stored); errors become messages."""
            try:
                for _ in gen:
                    yield view(sess), "", gr.update(), gr.update(), *unchanged_side()
                last = sess.turns[-1] if sess.turns else None
                done = (f"Answered by `{last.adapter}`{' (stopped)' if last.stopped else ''}. "
                        "Rate it with 👍 / 👎." + (trimmed_notice(last.dropped) if last.dropped else "")
                        if last is not None and last.role == "assistant" else "")
                yield view(sess), "", done, gr.update(value="", visible=False), *side(sess)
            except InputError as e:
                yield view(sess), restore, f"⚠️ {e}", gr.update(), *side(sess)
            except Exception as e:  # server down, timeouts: a message, never a traceback
                log.warning("chat answer failed: %r", e, exc_info=not isinstance(e, OSError))
                if not service.server_ok():
                    yield view(sess), restore, "", gr.update(value=SERVER_DOWN, visible=True), *side(sess)
                else:
                    why = getattr(e, "user_message", type(e).__name__)  # e.g. "the server's disk is full"
                    yield view(sess), restore, f"⚠️ The answer failed ({why}). Please try again.", gr.update(), \
                        *side(sess)

        def on_send(text: str, k: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError as e:
                yield gr.update(), text, f"⚠️ {e}", gr.update(), *unchanged_side()
                return
            try:
                clean_message(text, service.max_chars)
            except InputError as e:
                yield view(sess), text, f"⚠️ {e}", gr.update(), *unchanged_side()
                return
            hist = sess.history() + [{"role": "user", "content": text.strip()}]
            yield gr.update(value=hist, feedback_value=sess.feedback()), "", "", gr.update(), *unchanged_side()
            yield from stream(sess, service.send(sess, text), restore=text)

        def on_regen(k: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError as e:
                yield gr.update(), "", f"⚠️ {e}", gr.update(), *unchanged_side()
                return
            yield from stream(sess, service.regenerate(sess))

        def on_stop(k: str, request: gr.Request):
            try:
                sess_of(k, request).stop.set()
            except InputError:
                pass

        def on_undo(k: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError:
                return gr.update(), gr.update()
            text = service.undo(sess)
            return view(sess), text

        def on_new(k: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
                service.new_conversation(sess)
            except InputError as e:
                return gr.update(), f"⚠️ {e}", gr.update(visible=False), None, *unchanged_side()
            return view(sess), "", gr.update(visible=False), None, *side(sess)

        def on_load(k: str, request: gr.Request):
            """A page load: list the user's conversations and reopen the latest one."""
            try:
                sess = sess_of(k, request)
            except InputError as e:
                return gr.update(), f"⚠️ {e}", *unchanged_side()
            try:
                listed = service.conversations(sess)
                if listed and sess.conv_id is None and not sess.turns:
                    service.open_conversation(sess, listed[0][1])
            except Exception as e:  # a fresh chat rather than a broken page
                log.warning("chat: restoring conversations failed: %r", e)
                listed = None
            return view(sess), "", *side(sess, listed)

        def on_open(conv_id: str | None, k: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError as e:
                return gr.update(), f"⚠️ {e}", gr.update(), gr.update(), *unchanged_side()
            try:
                service.open_conversation(sess, conv_id)
            except InputError as e:
                sess.listed_top = None          # relist: the list goes back to the conversation still shown
                return view(sess), f"⚠️ {e}", gr.update(), gr.update(), *side(sess)
            return view(sess), "", gr.update(visible=False), None, *side(sess)

        def switch(step: int, k: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError as e:
                return gr.update(), f"⚠️ {e}", gr.update(), gr.update(), *unchanged_side()
            try:
                turn = service.switch_answer(sess, step)
            except InputError as e:
                return view(sess), f"⚠️ {e}", gr.update(), gr.update(), *side(sess)
            shown = f"Showing an earlier answer by `{turn.adapter}`." if turn.adapter else "Showing an earlier answer."
            return view(sess), shown, gr.update(visible=False), None, *side(sess)

        def on_prev(k: str, request: gr.Request):
            return switch(-1, k, request)

        def on_next(k: str, request: gr.Request):
            return switch(+1, k, request)

        def on_pick(k: str, data: gr.SelectData, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError:
                return unchanged_side()
            service.focus(sess, data.index)
            return side(sess, relist=False)

        def on_side(k: str, request: gr.Request):
            try:
                return side(sess_of(k, request))
            except InputError:
                return unchanged_side()

        def on_like(k: str, data: gr.LikeData, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError as e:
                return gr.update(), f"⚠️ {e}", gr.update(visible=False), None
            try:
                turn = service.rate(sess, data.index, data.liked, data.value)
            except (RatingError, InputError) as e:
                return view(sess), f"⚠️ {e}", gr.update(visible=False), None
            except Exception as e:
                why = getattr(e, "user_message", type(e).__name__)  # e.g. "the server's disk is full"
                return view(sess), f"⚠️ Your rating could not be saved ({why}).", gr.update(), None
            if turn.rating == "down":
                return view(sess), "Thanks! Tell us what was wrong (optional).", \
                    gr.update(visible=True), turn.msg_id
            msg = {"up": "Thanks for the 👍!", None: "Rating withdrawn."}[turn.rating]
            return view(sess), msg, gr.update(visible=False), None

        def on_comment(k: str, answer_id: str | None, why: str | None, text: str, request: gr.Request):
            try:
                sess = sess_of(k, request)
            except InputError as e:
                return f"⚠️ {e}", gr.update(), gr.update(), why, text
            if not answer_id:
                return "⚠️ Pick 👎 on an answer first.", gr.update(), gr.update(), None, None
            try:
                service.comment(sess, answer_id, why, text)
            except (RatingError, InputError) as e:
                return f"⚠️ {e}", gr.update(), gr.update(), why, text
            return "Thanks, your feedback was saved.", gr.update(visible=False), view(sess), None, ""

        def on_tick():
            ok = service.server_ok()
            return gr.update(value="" if ok else SERVER_DOWN, visible=not ok)

        chat_io = [chatbot, box, notice, banner] + side_io
        panel_io = [chatbot, notice, down_panel, pending_down]
        quiet = dict(concurrency_limit=None, show_progress="hidden")
        answering = dict(concurrency_limit=None, show_progress_on=[chatbot])   # not over the list while it streams
        box.submit(on_send, [box, key], chat_io, **answering)
        send.click(on_send, [box, key], chat_io, **answering)
        regen.click(on_regen, [key], chat_io, **answering)   # no chatbot.retry: its icon would duplicate this button
        chatbot.undo(on_undo, [key], [chatbot, box], concurrency_limit=None).then(on_side, [key], side_io, **quiet)
        stop.click(on_stop, [key], None, queue=False)
        new.click(on_new, [key], panel_io + side_io, concurrency_limit=None)
        convs.input(on_open, [convs, key], panel_io + side_io, concurrency_limit=None)
        prev.click(on_prev, [key], panel_io + side_io, concurrency_limit=None)
        nxt.click(on_next, [key], panel_io + side_io, concurrency_limit=None)
        chatbot.select(on_pick, [key], side_io, **quiet)
        chatbot.like(on_like, [key], panel_io, concurrency_limit=None).then(None, None, None, js=SHOW_DOWN_PANEL_JS)
        send_comment.click(on_comment, [key, pending_down, reason, comment],
                           [notice, down_panel, chatbot, reason, comment], concurrency_limit=None)
        skip_comment.click(lambda: (gr.update(visible=False), None, None, ""), None,
                           [down_panel, pending_down, reason, comment])
        gr.Timer(5.0).tick(on_tick, None, [banner], concurrency_limit=None)
        demo.load(on_tick, None, [banner])
        demo.load(on_load, [key], [chatbot, notice] + side_io, **quiet)
    return demo
