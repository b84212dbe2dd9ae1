"""The chat page when the store fails, and the provenance it records, through the real FastAPI + Gradio app and
a real feedback store; events go through Gradio's HTTP API as a browser's would."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.config import Config
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import SettingsStore
from feedback_store import FeedbackStore, StorageFull

PEER = "203.0.113.7"


class Server:
    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout=2.0):
        return True


class Registry:
    def current(self):
        return "base"


class Model:
    def stream_chat(self, messages, model, sampling=None):
        return iter(["ok"])


@pytest.fixture
def app_client(tmp_path):
    cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model").resolved()
    store = FeedbackStore(cfg.db_path)
    reg = Registry()
    st = Stack(Server(), store, reg, Model(), Realigner(store, reg, model_dir=cfg.model_dir, work_dir=tmp_path / "r"),
               SettingsStore(tmp_path, default_settings(cfg)), cfg)
    app, _ = create_app(st, "s3cret")
    with TestClient(app, client=(PEER, 40000)) as c:       # one lifespan: Gradio's queue runs
        assert c.get("/").status_code == 200               # the page sets the signed rater cookie
        yield c, store
    store.close()


def call(client: TestClient, api: str, data: list, event_data: dict | None = None) -> list:
    """One event the way the browser sends it (the queue API: one session, its state kept on the server, the
    event's data carried); returns the outputs it finished with."""
    config = client.get("/config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api)
    r = client.post("/gradio_api/queue/join", json={"data": data, "event_data": event_data, "fn_index": fn,
                                                    "session_hash": "h1", "trigger_id": None})
    assert r.status_code == 200, r.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": "h1"}) as events:
        for line in events.iter_lines():
            msg = json.loads(line[6:]) if line.startswith("data: ") else {}
            if msg.get("msg") == "process_completed":
                assert msg["success"], msg
                return msg["output"]["data"]
    raise AssertionError(f"{api}: no result")


def like(client: TestClient, liked: bool) -> str:
    """A thumb on the first answer; returns the notice shown under the chat."""
    return call(client, "on_like", [None], {"index": 1, "value": "ok", "liked": liked})[1]


def test_a_full_disk_is_named_to_the_user_and_the_rating_records_its_address(app_client, monkeypatch):
    client, store = app_client
    assert "Answered" in call(client, "on_send", ["hello", None])[2]
    assert "Thanks" in like(client, True)
    assert store._read("SELECT client_addr FROM ratings") == [(PEER,)]

    def full(*a, **kw):
        raise StorageFull("the disk holding the feedback database (/srv/secret/feedback.duckdb) is full")

    monkeypatch.setattr(store, "rate", full)
    notice = like(client, False)
    assert "disk is full" in notice and "/srv/secret" not in notice
    monkeypatch.setattr(store, "add_answer", full)
    notice = call(client, "on_send", ["again", None])[2]
    assert "disk is full" in notice
