"""Attacks on the operator's side of the app: forged admin requests (CSRF) and settings that could stop it starting.

Requests go through the real FastAPI + Gradio app `create_app` builds, with the operator's valid basic-auth
credentials attached as a browser would attach its cached ones; the store is a real DuckDB file, the settings a
real JSON file. vLLM and the registry are stand-ins (nothing here needs a model). The last test drives the CLI's
remote path against the app served by uvicorn on a real socket.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Config
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import RUNTIME_FILE, SETTINGS_FILE, SettingsStore, write_json_atomic
from app.web.admin_api import ADMIN_HEADER, admin_refusal
from app.web.auth import basic_header
from feedback_store import FeedbackStore
from tests.conftest import free_port

PASSWORD = "s3cret"
AUTH = {"Authorization": basic_header("admin", PASSWORD)}
EVIL = "https://evil.example"


class Server:
    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout=2.0):
        return True


class Registry:
    """Serves kto-v2 with kto-v1 before it; records every rollback it is asked for."""

    def __init__(self):
        self.served, self.calls = "kto-v2", []

    def current(self):
        return self.served

    def rollback(self, version=None):
        self.calls.append(version)
        self.served = version or "kto-v1"
        return self.served


@pytest.fixture
def stack(tmp_path):
    cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model", schedule_interval_minutes=60,
                 admin_password=PASSWORD).resolved()
    store = FeedbackStore(cfg.db_path)
    for v in ("kto-v1", "kto-v2"):
        store.register_adapter(v, tmp_path / v)
    reg = Registry()
    st = Stack(Server(), store, reg, None, Realigner(store, reg, model_dir=cfg.model_dir, work_dir=tmp_path / "runs"),
               SettingsStore(tmp_path, default_settings(cfg)), cfg)
    yield st
    store.close()


@pytest.fixture
def web(stack):
    app, scheduler = create_app(stack, PASSWORD)
    scheduler.start()
    with TestClient(app, base_url="http://testserver") as client:
        yield client, scheduler
    scheduler.shutdown()


def _settings_file(stack) -> Path:
    return Path(stack.cfg.data_dir) / SETTINGS_FILE


# ---------------------------------------------------------------- CSRF

FORGED = [  # what a page on another site can make the operator's browser send without a CORS preflight
    ("form post, evil origin", {"data": {"version": "base"}, "headers": {"Origin": EVIL}}),
    ("no-cors fetch, no content type", {"content": b'{"version": "base"}', "headers": {"Origin": EVIL}}),
    ("text/plain JSON, no origin", {"content": b'{"version": "base"}', "headers": {"Content-Type": "text/plain"}}),
    ("empty form, same-site subdomain", {"data": {}, "headers": {"Sec-Fetch-Site": "same-site"}}),
]


@pytest.mark.parametrize("path", ["/api/admin/rollback", "/api/admin/align", "/api/admin/schedule"])
@pytest.mark.parametrize("name,req", FORGED, ids=[n for n, _ in FORGED])
def test_forged_admin_posts_with_valid_credentials_are_refused_and_change_nothing(web, stack, path, name, req):
    client, scheduler = web
    before = _settings_file(stack).read_text() if _settings_file(stack).exists() else None
    headers = AUTH | req["headers"]
    body = {k: v for k, v in req.items() if k != "headers"}
    if path.endswith("schedule") and "data" in body:
        body["data"] = {"enabled": "false", "interval_minutes": "1"}
    r = client.post(path, headers=headers, **body)
    assert r.status_code == 403, (name, r.status_code, r.text)
    assert stack.registry.calls == [] and stack.registry.current() == "kto-v2"
    assert stack.store.runs() == [] and not stack.realigner.running
    after = _settings_file(stack).read_text() if _settings_file(stack).exists() else None
    assert after == before


def test_json_with_the_admin_header_from_another_origin_is_refused(web, stack):
    client, _ = web
    r = client.post("/api/admin/rollback", json={}, headers=AUTH | {ADMIN_HEADER: "1", "Origin": EVIL})
    assert r.status_code == 403 and "origin" in r.text.lower()
    r = client.post("/api/admin/rollback", json={}, headers=AUTH)          # JSON but no custom header
    assert r.status_code == 403 and ADMIN_HEADER in r.text
    assert stack.registry.calls == []


def test_a_same_origin_json_request_with_the_header_goes_through(web, stack):
    client, _ = web
    ok = AUTH | {ADMIN_HEADER: "1"}
    r = client.post("/api/admin/rollback", json={}, headers=ok | {"Origin": "http://testserver"})
    assert r.status_code == 200 and stack.registry.calls == [None] and r.json()["served"] == "kto-v1"
    # behind a reverse proxy the browser's origin is the proxy's public name, which the proxy forwards
    r = client.post("/api/admin/rollback", json={"version": "kto-v2"},
                    headers=ok | {"Origin": "https://ops.example.org", "X-Forwarded-Host": "ops.example.org"})
    assert r.status_code == 200 and stack.registry.calls == [None, "kto-v2"]


def test_the_console_s_own_gradio_endpoints_refuse_forged_posts_too(web):
    client, _ = web
    r = client.post("/admin/gradio_api/queue/join", content=b'{"fn_index": 0, "data": []}',
                    headers=AUTH | {"Content-Type": "text/plain", "Origin": EVIL})
    assert r.status_code == 403
    r = client.post("/admin/gradio_api/queue/join", json={"fn_index": 0, "data": [], "session_hash": "x"},
                    headers=AUTH | {"Origin": "http://testserver"})
    assert r.status_code != 403                      # the console's own same-origin JSON call is let through
    assert client.post("/api/admin/rollback", data={}, headers={"Origin": EVIL}).status_code == 401


def test_admin_refusal_rules():
    ok = {"content-type": "application/json", ADMIN_HEADER.lower(): "1", "host": "127.0.0.1:7860"}
    assert admin_refusal("POST", "/api/admin/align", ok) is None
    assert admin_refusal("POST", "/api/admin/align", ok | {"origin": "http://127.0.0.1:7860"}) is None
    assert admin_refusal("POST", "/api/admin/align", ok | {"origin": "http://127.0.0.1:7861"})
    assert admin_refusal("POST", "/api/admin/align", ok | {"origin": "null"})
    assert admin_refusal("POST", "/api/admin/align", ok | {"sec-fetch-site": "cross-site"})
    assert admin_refusal("POST", "/api/admin/align", ok | {"sec-fetch-site": "same-origin"}) is None
    assert admin_refusal("POST", "/admin/gradio_api/queue/join", ok | {ADMIN_HEADER.lower(): ""}) is None
    assert admin_refusal("GET", "/api/admin/stats", {}) is None
    assert admin_refusal("POST", "/gradio_api/queue/join", {}) is None       # the public chat is not admin


# ---------------------------------------------------------------- settings

ADMIN = AUTH | {ADMIN_HEADER: "1"}


@pytest.mark.parametrize("body,field", [({"interval_minutes": "30"}, "interval_minutes"),
                                        ({"enabled": "false"}, "enabled"),
                                        ({"interval_minutes": True}, "interval_minutes"),
                                        ({"min_new_ratings": 2.5}, "min_new_ratings"),
                                        ({"cron": 5}, "cron")])
def test_mistyped_schedule_values_are_refused_and_nothing_is_written(web, stack, body, field):
    client, scheduler = web
    assert not _settings_file(stack).exists()
    r = client.post("/api/admin/schedule", json=body, headers=ADMIN)
    assert r.status_code == 400 and field in r.json()["detail"]
    assert not _settings_file(stack).exists()
    s = stack.settings.load()
    assert s.enabled is True and s.interval_minutes == 60 and scheduler.next_run_time() is not None


def test_enabled_false_as_a_real_bool_turns_the_schedule_off(web, stack):
    client, scheduler = web
    r = client.post("/api/admin/schedule", json={"enabled": False}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["next_run"] is None
    assert scheduler.next_run_time() is None


@pytest.mark.parametrize("content,field", [
    ('{"interval_minutes": "30", "min_new_ratings": 7}', "interval_minutes"),
    ('{"enabled": "false", "interval_minutes": 30}', "enabled"),
    ('{"cron": "61 * * * *"}', "cron"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_a_bad_settings_file_names_the_field_and_the_app_starts_with_the_schedule_off(stack, content, field):
    _settings_file(stack).write_text(content)
    app, scheduler = create_app(stack, PASSWORD)
    scheduler.start()                                  # raised TypeError on a persisted "30" before
    try:
        with TestClient(app) as client:
            assert client.get("/api/health").status_code == 200
            got = client.get("/api/admin/schedule", headers=AUTH).json()
        assert got["enabled"] is False and got["next_run"] is None and scheduler.next_run_time() is None
        assert field in got["settings_error"] and str(_settings_file(stack)) in got["settings_error"]
        if field == "interval_minutes":
            assert got["min_new_ratings"] == 7                  # the good fields of the file still count
        # saving a good schedule replaces the bad file (kept beside it) and turns scheduling back on
        s = scheduler.update(interval_minutes=15, cron="", enabled=True)
        assert s.interval_minutes == 15 and scheduler.next_run_time() is not None and stack.settings.error is None
        assert json.loads(_settings_file(stack).read_text())["interval_minutes"] == 15
        assert (_settings_file(stack).parent / (SETTINGS_FILE + ".bad")).read_text() == content
    finally:
        scheduler.shutdown()


# ---------------------------------------------------------------- the CLI against a running app

def test_the_cli_still_drives_a_running_app(stack, capsys):
    import uvicorn

    from app.cli import build_parser
    from app.cli import rollback as rollback_cmd
    from app.cli import schedule as schedule_cmd

    app, scheduler = create_app(stack, PASSWORD)
    scheduler.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        write_json_atomic(Path(stack.cfg.data_dir) / RUNTIME_FILE,
                          {"url": f"http://127.0.0.1:{port}", "pid": os.getpid(), "admin_user": "admin",
                           "admin_password": PASSWORD}, mode=0o600)
        parser = build_parser()
        args = parser.parse_args(["schedule", "--every", "45", "--min-new", "3"])
        assert schedule_cmd.run(args, stack.cfg) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["interval_minutes"] == 45 and out["min_new_ratings"] == 3 and out["next_run"]
        assert stack.settings.load().interval_minutes == 45
        assert rollback_cmd.run(parser.parse_args(["rollback"]), stack.cfg) == 0
        assert "Now serving kto-v1" in capsys.readouterr().out and stack.registry.calls == [None]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        scheduler.shutdown()
