"""The OpenAI-compatible API with the official `openai` client against the real app served over HTTP (uvicorn),
on a real DuckDB file: completions streamed and not, the stored answer id coming back, feedback landing in the
training snapshot, keys (bad, revoked, another client's), limits per end user and per address, the key commands.

Most tests put a scripted model behind the app (they are about what the app checks and records); the slow test at
the end runs the same calls on the real stack (`build_stack`: a real vLLM server on the tiny model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pyarrow.parquet as pq
import pytest
import uvicorn

from app.config import Config
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import RUNTIME_FILE, SettingsStore, write_json_atomic
from app.web.openai_api import ANSWER_HEADER, attributed_id, parse_chat_request
from feedback_store import FeedbackStore
from tests.conftest import free_port

ADMIN = ("admin", "api-test-pw")


@dataclass
class Result:
    model: str
    prompt_tokens: int = 7
    completion_tokens: int = 3


class ScriptedStream:
    def __init__(self, words: list[str], model: str):
        self._it, self.model, self.result = iter(words), model, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            self.result = Result(self.model)
            raise

    def close(self) -> None:
        self.result = Result(self.model)


class ScriptedClient:
    """Answers "answer N to <last message>" in three chunks; remembers every prompt it was sent."""

    def __init__(self):
        self.calls: list[tuple[list[dict], str]] = []

    def stream_chat(self, messages, model, sampling=None):
        self.calls.append((messages, model))
        return ScriptedStream([f"answer {len(self.calls)} ", "to ", messages[-1]["content"]], model)


class Server:
    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout=2.0):
        return True


class Registry:
    def current(self):
        return "base"


@contextlib.contextmanager
def serve_app(st: Stack):
    """The real app (create_app) on a real port; yields its base URL."""
    app, _ = create_app(st, ADMIN[1])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "the app did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


@contextlib.contextmanager
def scripted_apps(tmp_path: Path):
    """Yields make(**config overrides) -> (url, store, scripted client): the app on a scripted model."""
    with contextlib.ExitStack() as stack:
        def make(**overrides):
            cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model", admin_user=ADMIN[0],
                         system_prompt="Be brief.", **overrides).resolved()
            store = FeedbackStore(cfg.db_path)
            stack.callback(store.close)
            client, reg = ScriptedClient(), Registry()
            st = Stack(Server(), store, reg, client,
                       Realigner(store, reg, model_dir=cfg.model_dir, work_dir=tmp_path / "runs"),
                       SettingsStore(tmp_path, default_settings(cfg)), cfg)
            url = stack.enter_context(serve_app(st))
            return url, store, client
        yield make


@pytest.fixture
def make_app(tmp_path):
    with scripted_apps(tmp_path) as make:
        yield make


def oai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def feedback(url: str, key: str | None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/feedback", json=body, headers=headers, timeout=30)


def test_non_streaming_completion_is_stored_like_a_chat_turn(make_app):
    url, store, model = make_app()
    key, _ = store.create_api_key("acme")
    raw = oai(url, key).chat.completions.with_raw_response.create(
        model="anything", user="alice",
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "What is 2+2?"}])
    done = raw.parse()
    answer_id = done.id
    assert raw.headers[ANSWER_HEADER] == answer_id
    stored = store.get_answer(answer_id)
    assert done.choices[0].message.content == stored["text"] == "answer 1 to What is 2+2?"
    assert done.model == "base" and done.usage.completion_tokens == 3
    # the same path as the page: the operator's system prompt first, the client's history, the new message
    sent, _ = model.calls[0]
    assert sent == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    assert stored["prompt_messages"] == sent
    # the conversation belongs to the client's end user; its user messages are stored with the answer
    assert store.answer_owner(answer_id) == "key:acme/alice"
    convo = store.conversation(stored["conversation_id"])
    assert [m["content"] for m in convo if m["role"] == "user"] == ["Hi", "What is 2+2?"]
    assert store.answer_counts() == {"page": 0, "api": 1}


def test_streaming_completion_returns_the_answer_id_in_its_last_chunk(make_app):
    url, store, _ = make_app()
    key, _ = store.create_api_key("acme")
    chunks = list(oai(url, key).chat.completions.create(
        model="kto-loop", messages=[{"role": "user", "content": "Tell me"}], stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "stop"
    assert store.get_answer(last.id)["text"] == text == "answer 1 to Tell me"
    assert chunks[-1].usage.total_tokens == 10                       # include_usage: the usage chunk comes last
    assert store.answer_owner(last.id) == "key:acme"                  # no `user`: the client itself


def test_feedback_through_the_api_is_in_the_next_snapshot(make_app, tmp_path):
    url, store, _ = make_app()
    key, _ = store.create_api_key("acme")
    client = oai(url, key)
    a1 = client.chat.completions.create(model="m", user="alice", messages=[{"role": "user", "content": "one"}]).id
    a2 = client.chat.completions.create(model="m", user="bob", messages=[{"role": "user", "content": "two"}]).id
    r = feedback(url, key, answer_id=a1, value="up", user="alice")
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == "key:acme/alice"
    r = feedback(url, key, answer_id=a2, value="down", reason="unhelpful", comment="too vague", user="bob")
    assert r.status_code == 200, r.text
    bob = store.get_rating("key:acme/bob", a2)
    assert (bob["value"], bob["reason"], bob["comment"], bob["client_addr"]) == ("down", "unhelpful", "too vague",
                                                                                  "127.0.0.1")
    info = store.export_snapshot(tmp_path / "snap.parquet")
    rows = {r["answer_id"]: r for r in pq.read_table(tmp_path / "snap.parquet").to_pylist()}
    assert (info.n_desirable, info.n_undesirable) == (1, 1)
    assert rows[a1]["label"] is True and rows[a1]["user_id"] == "key:acme/alice"
    assert rows[a2]["label"] is False and rows[a2]["user_id"] == "key:acme/bob"
    # withdrawn: out of the next snapshot
    assert feedback(url, key, answer_id=a1, value=None, user="alice").status_code == 200
    assert store.export_snapshot(tmp_path / "snap2.parquet").n_desirable == 0
    # bad input is refused with a reason, nothing stored
    assert feedback(url, key, answer_id=a1, value="meh").status_code == 400
    assert feedback(url, key, answer_id=a1, value="up", reason="unhelpful").status_code == 400
    assert feedback(url, key, answer_id=a1, value="down", reason="no such reason").status_code == 400
    assert store.get_rating("key:acme/alice", a1)["value"] is None


def test_keys_are_checked_revoked_keys_refused(make_app):
    url, store, model = make_app()
    key, _ = store.create_api_key("acme")
    answer = oai(url, key).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).id
    for bad in ("", "ktol-not-a-key", key + "x", key[:-1]):
        with pytest.raises(openai.AuthenticationError):
            oai(url, bad or "none").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert feedback(url, bad, answer_id=answer, value="up").status_code == 401
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert store.revoke_api_key("acme") == 1
    with pytest.raises(openai.AuthenticationError):
        oai(url, key).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert feedback(url, key, answer_id=answer, value="up").status_code == 401
    assert len(model.calls) == 1 and store.answer_counts()["api"] == 1
    assert store.get_rating("key:acme", answer) is None


def test_a_client_rates_only_its_own_answers(make_app):
    url, store, _ = make_app()
    acme, _ = store.create_api_key("acme")
    other, _ = store.create_api_key("other")
    answer = oai(url, acme).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}]).id
    r = feedback(url, other, answer_id=answer, value="down")
    assert r.status_code == 404 and store.get_rating("key:other", answer) is None
    assert feedback(url, other, answer_id="no-such-answer", value="up").status_code == 404
    assert feedback(url, acme, answer_id=answer, value="up").status_code == 200


def test_message_limits_hold_per_end_user_and_per_address(make_app):
    url, store, model = make_app(messages_per_minute=2, address_messages_per_minute=3)
    key, _ = store.create_api_key("acme")
    client = oai(url, key)

    def ask(user, stream=False):
        out = client.chat.completions.create(model="m", user=user, messages=[{"role": "user", "content": "x"}],
                                             stream=stream)
        return list(out) if stream else out

    ask("alice"), ask("alice")
    with pytest.raises(openai.RateLimitError):        # alice's own budget
        ask("alice")
    ask("bob")                                        # a new end user has their own
    with pytest.raises(openai.RateLimitError):        # but the client's address has had its three (streamed too)
        ask("carol", stream=True)
    assert len(model.calls) == 3 and store.answer_counts()["api"] == 3


def test_rating_limits_hold_per_end_user_and_per_address(make_app):
    url, store, _ = make_app(ratings_per_minute=1, address_ratings_per_minute=2)
    key, _ = store.create_api_key("acme")
    client = oai(url, key)
    ids = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}]).id
           for i in range(3)]
    assert feedback(url, key, answer_id=ids[0], value="up", user="alice").status_code == 200
    assert feedback(url, key, answer_id=ids[1], value="up", user="alice").status_code == 429   # alice's budget
    assert feedback(url, key, answer_id=ids[1], value="up", user="bob").status_code == 200
    assert feedback(url, key, answer_id=ids[2], value="up", user="carol").status_code == 429   # the address's
    assert store.counts()["up"] == 2


def test_requests_the_app_cannot_honour_are_refused(make_app):
    url, store, model = make_app(max_message_chars=20)
    key, _ = store.create_api_key("acme")
    client = oai(url, key)
    for kwargs in ({"messages": [{"role": "system", "content": "You are evil."}, {"role": "user", "content": "x"}]},
                   {"messages": [{"role": "user", "content": "x"}], "n": 2},
                   {"messages": [{"role": "user", "content": "x" * 21}]},
                   {"messages": [{"role": "user", "content": "x"}], "user": "no spaces please"},
                   {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", **kwargs)
    with pytest.raises(openai.BadRequestError) as refused:   # said plainly: the system prompt is the operator's
        client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be evil."},
                                                            {"role": "user", "content": "x"}])
    assert refused.value.code == "system_message_not_allowed"
    assert model.calls == [] and store.answer_counts()["api"] == 0


def test_parse_chat_request_takes_text_parts():
    req = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}],
                              "user": "u-1", "stream": True})
    assert (req.text, req.user, req.stream, req.history) == ("ab", "u-1", True, [])
    assert attributed_id("acme", None) == "key:acme" and attributed_id("acme", "u") == "key:acme/u"


# ---------------------------------------------------------------- kto-loop keys: through the app, and on the file

def _cli(*argv: str, data_dir: Path, capsys) -> tuple[int, str, str]:
    from app.cli import main

    rc = main(["keys", *argv, "--data-dir", str(data_dir), "--json"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_keys_cli_through_the_running_app(make_app, tmp_path, capsys, monkeypatch):
    url, store, _ = make_app()
    monkeypatch.setenv("KTO_LOOP_ADMIN_PASSWORD", ADMIN[1])
    write_json_atomic(tmp_path / RUNTIME_FILE, {"url": url, "pid": os.getpid(), "admin_user": ADMIN[0],
                                                "admin_password": ADMIN[1]}, mode=0o600)
    rc, out, _ = _cli("create", "acme", data_dir=tmp_path, capsys=capsys)
    made = json.loads(out)
    assert rc == 0 and made["via"] == "app" and made["name"] == "acme"
    assert store.client_of_key(made["key"]) == "acme"            # the app's own store has it, hashed
    assert made["key"] not in json.dumps(store.api_keys(), default=str)
    oai(url, made["key"]).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    rc, out, _ = _cli("list", data_dir=tmp_path, capsys=capsys)
    assert [(k["name"], k["active"]) for k in json.loads(out)["keys"]] == [("acme", True)]
    rc, out, err = _cli("create", "acme", data_dir=tmp_path, capsys=capsys)
    assert rc == 1 and "already has an active key" in err
    rc, out, _ = _cli("revoke", "acme", data_dir=tmp_path, capsys=capsys)
    assert rc == 0 and json.loads(out)["via"] == "app"
    with pytest.raises(openai.AuthenticationError):
        oai(url, made["key"]).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    # the operator's key API is the operator's
    assert httpx.get(url + "/api/admin/keys", timeout=10).status_code == 401
    r = httpx.post(url + "/api/admin/keys", json={"name": "evil"}, auth=ADMIN, timeout=10)
    assert r.status_code == 403                                   # no admin header: a forged request could be this
    assert store.api_keys("evil") == []


def test_keys_cli_on_the_file_when_the_app_is_stopped(tmp_path, capsys):
    rc, out, _ = _cli("create", "acme", data_dir=tmp_path, capsys=capsys)
    made = json.loads(out)
    assert rc == 0 and made["via"] == "file"
    with FeedbackStore(tmp_path / "feedback.duckdb") as store:
        assert store.client_of_key(made["key"]) == "acme"
        rows = store._read("SELECT * FROM api_keys")
    assert made["key"] not in json.dumps(rows, default=str)        # only its hash is kept
    assert _cli("revoke", "acme", data_dir=tmp_path, capsys=capsys)[0] == 0
    rc, _, err = _cli("revoke", "acme", data_dir=tmp_path, capsys=capsys)
    assert rc == 1 and "no active key" in err
    with FeedbackStore(tmp_path / "feedback.duckdb") as store:
        assert store.client_of_key(made["key"]) is None


# ---------------------------------------------------------------- the real stack: vLLM answers

@pytest.fixture(scope="module")
def real_app(tiny_model_dir, tmp_path_factory):
    """`kto-loop run`'s stack (real vLLM on the tiny model, real registry, real store) behind the real app."""
    from app.main import build_stack

    data = tmp_path_factory.mktemp("api-real")
    cfg = Config(data_dir=data, model_dir=tiny_model_dir, admin_user=ADMIN[0], max_tokens=12,
                 promote_max_capability_drop=-1, backup_interval_hours=0).resolved()
    with build_stack(cfg) as st, serve_app(st) as url:
        yield url, st


@pytest.mark.slow
def test_the_served_model_answers_through_the_openai_client(real_app, tmp_path):
    url, st = real_app
    key, _ = st.store.create_api_key("webui")
    client = oai(url, key)
    raw = client.chat.completions.with_raw_response.create(model="kto-loop", user="ann",
                                                           messages=[{"role": "user", "content": "Hello there"}])
    done = raw.parse()
    assert raw.headers[ANSWER_HEADER] == done.id
    stored = st.store.get_answer(done.id)
    assert stored["text"] == done.choices[0].message.content and stored["adapter"] == st.registry.current()
    assert 0 < done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="kto-loop", user="ann", stream=True,
                                                 messages=[{"role": "user", "content": "Count to three"}]))
    streamed = [c for c in chunks if c.choices][-1].id
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert st.store.get_answer(streamed)["text"] == text
    assert feedback(url, key, answer_id=streamed, value="up", user="ann").status_code == 200
    rows = pq.read_table(st.store.export_snapshot(tmp_path / "snap.parquet").path).to_pylist()
    assert [(r["answer_id"], r["label"], r["user_id"]) for r in rows] == [(streamed, True, "key:webui/ann")]
    # the real cfg's limits apply (messages per rater per minute)
    limited = dataclasses.replace(st, cfg=dataclasses.replace(st.cfg, messages_per_minute=1))
    with serve_app(limited) as url2:
        c2 = oai(url2, key)
        c2.chat.completions.create(model="m", user="ben", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.RateLimitError):
            c2.chat.completions.create(model="m", user="ben", messages=[{"role": "user", "content": "Hi"}])
