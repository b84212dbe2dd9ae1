"""Attacks on the public chat, through the real FastAPI + Gradio app and the real feedback store.

Each test plays an attacker with a script (forged rater ids, many ids from one address, message floods, uploads,
session floods, an endless conversation) against the app `create_app` builds; events go through Gradio's own HTTP
API, the way a browser's or a script's would. The model is a scripted stand-in (nothing here is about generation).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

import app.web.chat as chat
from app.config import Config
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import SettingsStore
from app.web.auth import SECRET_FILE, USER_COOKIE, Raters, load_secret
from feedback_store import FeedbackStore

A, B, PROXY = "203.0.113.7", "198.51.100.9", "10.0.0.2"


class Server:
    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout=2.0):
        return True


class Registry:
    def current(self):
        return "base"


class Model:
    """Answers "ok <n>"; records every prompt it was sent; `fail` makes every request fail before any token."""

    def __init__(self):
        self.prompts: list[list[dict]] = []
        self.fail = False

    def stream_chat(self, messages, model, sampling=None):
        if self.fail:
            raise ConnectionError("model request failed")
        self.prompts.append(messages)
        return iter([f"ok {len(self.prompts)}"])


def with_test_peer(app):
    """The app behind a socket whose peer address the test picks (header x-test-peer), as uvicorn would set it."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            peer = dict(scope["headers"]).get(b"x-test-peer")
            if peer:
                scope = dict(scope, client=(peer.decode(), 40000))
        await app(scope, receive, send)
    return wrapped


class Browser:
    """One browser at one client address: its own cookies; each Gradio event runs in a page (`tab`), as a page
    load's session does. All browsers share one TestClient, so Gradio's queue runs in one event loop."""

    def __init__(self, client: TestClient, peer: str, name: str):
        self.client, self.peer, self.name = client, peer, name
        self.cookie: str | None = None

    def request(self, method: str, url: str, headers: dict | None = None, **kw):
        self.client.cookies.clear()
        if self.cookie is not None:
            self.client.cookies.set(USER_COOKIE, self.cookie)
        r = self.client.request(method, url, headers={"x-test-peer": self.peer, **(headers or {})}, **kw)
        if r.cookies.get(USER_COOKIE):
            self.cookie = r.cookies.get(USER_COOKIE)
        return r

    def visit(self, cookie: str | None = None, **kw) -> str | None:
        """Load the chat page as a fresh browser (only `cookie`, if any); returns the rater id it was given."""
        self.cookie = cookie
        r = self.request("GET", "/", **kw)
        assert r.status_code == 200
        return r.cookies.get(USER_COOKIE)

    def call(self, api: str, data: list, tab: str = "t1", event_data: Any = None, **kw) -> list:
        """Run a Gradio event through its HTTP API; returns the last outputs sent."""
        body: dict[str, Any] = {"data": data, "session_hash": f"{self.name}-{tab}"}
        if event_data is not None:
            return self._join(api, body | {"event_data": event_data}, **kw)
        r = self.request("POST", f"/gradio_api/call/{api}", json=body, **kw)
        assert r.status_code == 200, r.text
        text = self.request("GET", f"/gradio_api/call/{api}/{r.json()['event_id']}", **kw).text
        outs = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        assert outs and outs[-1] is not None, text
        return outs[-1]

    def _join(self, api: str, body: dict, **kw) -> list:
        """The browser's own route (the queue), which also carries an event's data (which answer, which thumb)."""
        deps = self.request("GET", "/config").json()["dependencies"]
        body["fn_index"] = next(d["id"] for d in deps if d.get("api_name") == api)
        r = self.request("POST", "/gradio_api/queue/join", json=body, **kw)
        assert r.status_code == 200, r.text
        text = self.request("GET", f"/gradio_api/queue/data?session_hash={body['session_hash']}").text
        msgs = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
        done = next(m for m in msgs if m.get("msg") == "process_completed")
        assert done.get("success"), done
        return done["output"]["data"]

    def send(self, text: str, tab: str = "t1", **kw) -> str:
        """Send a chat message; returns the notice line shown under the chat."""
        return self.call("on_send", [text, None], tab=tab, **kw)[2]

    def undo(self, tab: str = "t1") -> str:
        """Undo in a page: the last user message of its session ("" when the session is gone)."""
        return self.call("on_undo", [None], tab=tab)[1]


@pytest.fixture
def make_app(tmp_path):
    """make_app(**config fields) → (browser(peer) → a new Browser at that address, stack, model); apps made in one
    test share the data dir (so the rater-id key, as replicas must) and, with db_url, the PostgreSQL store."""
    stores, running = [], []

    def make(**fields):
        cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model", **fields).resolved()
        store = FeedbackStore(cfg.db_url or cfg.db_path)
        stores.append(store)
        reg, model = Registry(), Model()
        st = Stack(Server(), store, reg, model, Realigner(store, reg, model_dir=cfg.model_dir,
                                                          work_dir=tmp_path / "runs"),
                   SettingsStore(tmp_path, default_settings(cfg)), cfg)
        app, _ = create_app(st, "s3cret")
        client = TestClient(with_test_peer(app)).__enter__()
        running.append(client)
        names = iter(range(10**6))

        def browser(peer: str = A) -> Browser:
            return Browser(client, peer, f"b{next(names)}")

        return browser, st, model

    yield make
    for c in running:
        c.__exit__(None, None, None)
    for s in stores:
        s.close()


def sql(store: FeedbackStore, query: str) -> list[tuple]:
    return store._read(query)


# ---------------------------------------------------------------- hole 1: who is rating

def test_forged_tampered_and_unsigned_ids_are_refused_and_replaced(make_app):
    browser, st, model = make_app()
    b = browser(A)
    good = b.visit()
    uid, _, mac = good.partition(".")
    assert uid.startswith("anon-") and len(mac) == 32 and verifies(st, good)
    other = "anon-" + ("0" if uid[5] != "0" else "1") + uid[6:]
    forged = [uid,                                        # the old unsigned format
              "anon-0123456789abcdef",                    # made up
              f"{other}.{mac}",                           # another id under my signature
              f"{uid}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}",   # tampered signature
              f"{uid}.", "session-abc"]
    for bad in forged:
        fresh = b.visit(bad)                              # the page replaces it with a new signed id
        assert fresh and fresh not in (bad, good) and verifies(st, fresh), bad
        b.cookie = bad
        assert "no valid rater id" in b.send("I am someone else"), bad
    b.cookie = None
    assert "no valid rater id" in b.send("no cookie at all")   # no fallback to Gradio's session hash
    assert sql(st.store, "SELECT count(*) FROM conversations")[0][0] == 0
    assert sql(st.store, "SELECT count(*) FROM messages")[0][0] == 0
    assert model.prompts == []

    b.cookie = good
    assert "Answered" in b.send("hello")
    assert sql(st.store, "SELECT DISTINCT user_id FROM conversations") == [(uid,)]


def verifies(st: Stack, cookie: str) -> bool:
    return Raters(load_secret(st.cfg.data_dir / SECRET_FILE)).verify(cookie) is not None


def test_the_signing_key_is_made_once_private_and_kept(tmp_path):
    path = tmp_path / "home" / SECRET_FILE
    key = load_secret(path)
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_secret(path) == key                       # a restart keeps every id valid
    path.chmod(0o644)
    assert load_secret(path) == key and (path.stat().st_mode & 0o777) == 0o600
    other = Raters(load_secret(tmp_path / "elsewhere" / SECRET_FILE))
    assert Raters(key).verify(other.sign("anon-0123456789abcdef")) is None   # another key's ids are not ours
    path.write_text("short\n")
    with pytest.raises(ValueError, match="rater-id key"):
        load_secret(path)


def test_one_address_cannot_be_a_hundred_raters(make_app):
    browser, st, _ = make_app(address_new_ids_per_hour=10)
    ids = [browser(A).visit() for _ in range(100)]
    # an X-Forwarded-For the client wrote is not believed: no trusted proxy is configured
    ids += [browser(A).visit(headers={"X-Forwarded-For": f"192.0.2.{i}"}) for i in range(50)]
    issued = [i for i in ids if i]
    assert len(issued) == 10 and len(set(issued)) == 10
    late = browser(A)                                     # past the limit: no id, so every event is refused
    assert late.visit() is None
    assert "no valid rater id" in late.send("let me in")
    elsewhere = browser(B)                                # another address is not affected
    assert elsewhere.visit()
    assert "Answered" in elsewhere.send("hi")
    assert sql(st.store, "SELECT count(DISTINCT user_id) FROM conversations")[0][0] == 1


def test_trusted_proxy_forwards_addresses_and_sign_in_only_from_its_own_address(make_app):
    browser, st, _ = make_app(trusted_proxies=PROXY, rater_user_header="X-Forwarded-User",
                              address_new_ids_per_hour=2)
    # behind the proxy each real client has its own budget; a hop the client wrote (left of it) is ignored
    got = [browser(PROXY).visit(headers={"X-Forwarded-For": f"6.6.6.6, {ip}"}) for ip in (A, A, A, B, B)]
    assert [bool(x) for x in got] == [True, True, False, True, True]
    alice = browser(PROXY)
    assert "Answered" in alice.send("signed in", headers={"X-Forwarded-User": "alice", "X-Forwarded-For": A})
    mallory = browser(A)                                  # the same header straight from a client is ignored
    assert "no valid rater id" in mallory.send("I am alice", headers={"X-Forwarded-User": "alice"})
    assert sql(st.store, "SELECT user_id FROM conversations") == [("user:alice",)]


# ---------------------------------------------------------------- limits on messages and ratings

def test_a_message_flood_is_refused_per_rater_and_per_address(make_app):
    browser, st, model = make_app(messages_per_minute=5, address_messages_per_minute=8)
    spammer = browser(A)
    spammer.visit()
    notices = [spammer.send(f"spam {i}") for i in range(8)]
    assert all("Answered" in n for n in notices[:5])
    assert all("very quickly" in n for n in notices[5:])
    second = browser(A)                                   # another id at the same address: 3 messages left there
    second.visit()
    notices = [second.send(f"more {i}") for i in range(5)]
    assert all("Answered" in n for n in notices[:3])
    assert all("your network" in n for n in notices[3:])
    real = browser(B)
    real.visit()
    assert "Answered" in real.send("a real user")
    assert len(model.prompts) == 9
    assert sql(st.store, "SELECT count(*) FROM messages WHERE role = 'user'")[0][0] == 9


def test_ratings_are_limited_per_address_across_identities(make_app):
    browser, st, _ = make_app(ratings_per_minute=60, address_ratings_per_minute=3)
    notices = []
    for i in range(3):
        b = browser(A)
        b.visit()
        b.send(f"q{i}")
        for liked in (True, False):
            out = b.call("on_like", [None], event_data={"index": 1, "value": f"ok {i + 1}", "liked": liked})
            notices.append(out[1])
    assert [("Thanks" in n) for n in notices] == [True, True, True, False, False, False], notices
    assert all("your network" in n for n in notices[3:])
    assert sql(st.store, "SELECT count(*) FROM ratings")[0][0] == 2
    assert sql(st.store, "SELECT DISTINCT client_addr FROM ratings") == [(A,)]   # recorded for the share cap


# ---------------------------------------------------------------- hole 5: bounded work

def test_uploads_are_refused_and_bodies_are_bounded(make_app):
    browser, _, _ = make_app()
    b = browser(A)
    b.visit()
    assert b.request("POST", "/gradio_api/upload", files={"files": ("x.bin", b"\0" * 4096)}).status_code == 403
    assert b.request("POST", "/gradio_api/upload/", files={"files": ("x.bin", b"x")}).status_code == 403
    big = json.dumps({"data": ["x" * (2 << 20), None]})
    r = b.request("POST", "/gradio_api/call/on_send", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413

    def chunks():
        yield b'{"data": ["hi", null]}'

    r = b.request("POST", "/gradio_api/call/on_send", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 411
    assert "Answered" in b.send("still fine")


def test_a_session_flood_replaces_only_the_flooding_address_sessions(make_app):
    browser, _, _ = make_app(sessions_per_address=3, messages_per_minute=0, address_messages_per_minute=0)
    real = browser(B)
    real.visit()
    real.send("my real conversation")
    flood = browser(A)
    flood.visit()
    for i in range(50):
        flood.send(f"flood {i}", tab=f"f{i}")
    # the 3 newest are kept (looked at first: opening a dropped page's session again replaces one of them)
    assert [flood.undo(f"f{i}") for i in (47, 48, 49, 46, 0)] == ["flood 47", "flood 48", "flood 49", "", ""]
    assert real.undo() == "my real conversation"


def test_at_the_global_bound_the_busiest_address_loses_sessions_not_others(make_app, monkeypatch):
    monkeypatch.setattr(chat, "MAX_SESSIONS", 5)
    browser, _, _ = make_app(sessions_per_address=0, messages_per_minute=0, address_messages_per_minute=0)
    real = browser(B)
    real.visit()
    real.send("my real conversation")
    flood = browser(A)
    flood.visit()
    for i in range(20):
        flood.send(f"flood {i}", tab=f"f{i}")
    assert real.undo() == "my real conversation"
    assert flood.undo("f19") == "flood 19" and flood.undo("f0") == ""


def test_an_over_long_conversation_is_trimmed_with_a_notice(make_app):
    browser, st, model = make_app(vllm_max_model_len=700, max_tokens=100, system_prompt="Be brief.")
    budget = 700 - 100
    b = browser(A)
    b.visit()
    notices = [b.send(f"{i} " + "word " * 30) for i in range(12)]      # ~160 tokens each by the byte bound
    assert all("Answered" in n for n in notices)                       # every turn answered
    assert "left out" not in notices[0] and "left out" in notices[-1]
    for prompt in model.prompts:
        assert chat.byte_bound(prompt) <= budget
        assert prompt[0] == {"role": "system", "content": "Be brief."} and prompt[1]["role"] == "user"
    last = model.prompts[-1]
    assert last[-1]["content"].startswith("11 ") and 4 <= len(last) < 2 * 12
    stored = json.loads(sql(st.store, "SELECT prompt_messages FROM answers ORDER BY created_at DESC LIMIT 1")[0][0])
    assert stored == last                                              # training sees what the model saw
    n_user = sql(st.store, "SELECT count(*) FROM messages WHERE role = 'user'")[0][0]
    assert "too long for the model" in b.send("x" * 3999)             # alone over the window: refused
    assert sql(st.store, "SELECT count(*) FROM messages WHERE role = 'user'")[0][0] == n_user


def test_failed_tries_leave_no_orphan_messages(make_app):
    browser, st, model = make_app()
    b = browser(A)
    b.visit()
    model.fail = True
    for _ in range(5):
        assert "failed" in b.send("please answer")
    assert sql(st.store, "SELECT count(*) FROM messages WHERE role = 'user'")[0][0] == 0
    assert sql(st.store, "SELECT count(*) FROM conversations")[0][0] == 0
    model.fail = False
    assert "Answered" in b.send("please answer")
    assert sql(st.store, "SELECT count(*) FROM messages WHERE role = 'user'")[0][0] == 1
