"""`log_format = json`: every line the app writes on stderr is one JSON object (app/logs.py), from the formatter
itself up to the real `kto-loop run` entry and `serve` with the real web app; vLLM is a stand-in."""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime

import pytest

from app.cli import main
from app.config import Config
from app.logs import configure_logging


@pytest.fixture
def json_logs():
    """JSON logging for one test; the default (text) again afterwards, so no other test sees the handler."""
    configure_logging("json")
    yield
    configure_logging("text")


def _records(err: str) -> list[dict]:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing was written on stderr"
    return [json.loads(line) for line in lines]   # fails on the first line that is not JSON


def test_each_record_is_one_json_line_with_time_level_logger_message_and_extras(json_logs, capsys):
    log = logging.getLogger("kto_loop.test")
    log.info("served %s", "v3", extra={"run_id": "r1", "examples": 12})
    log.warning("multi\nline «message»")
    got = _records(capsys.readouterr().err)
    assert len(got) == 2
    first = got[0]
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "kto_loop.test", "served v3")
    assert (first["run_id"], first["examples"]) == ("r1", 12)
    assert datetime.fromisoformat(first["time"]).utcoffset().total_seconds() == 0   # ISO-8601, UTC
    assert got[1]["message"] == "multi\nline «message»" and "exception" not in got[1]


def test_an_exception_is_one_line_with_its_traceback(json_logs, capsys):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("kto_loop.test").exception("restart hook failed")
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    (rec,) = _records(err)
    assert rec["level"] == "ERROR" and rec["message"] == "restart hook failed"
    assert "Traceback" in rec["exception"] and "ValueError: boom" in rec["exception"]


def test_text_is_the_default_and_leaves_python_logging_as_it_was(capsys):
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    configure_logging("json")
    configure_logging("json")   # again: still one handler
    assert len(root.handlers) == len(before[0]) + 1
    configure_logging("text")
    assert (list(root.handlers), root.level) == before
    logging.getLogger("kto_loop.test").warning("plain")
    assert capsys.readouterr().err == ""   # no JSON handler left writing


def test_the_run_entry_with_the_flag_writes_its_lines_as_json(tmp_path, monkeypatch, capsys):
    """`kto-loop run --log-format json` with no network: the fetch step and the error that ends it are JSON."""
    import serving.model_fetch

    def no_network(models_dir, progress=True):
        assert not progress   # tqdm's bars would be lines that are not JSON
        raise serving.model_fetch.ModelFetchError("offline")

    monkeypatch.setattr(serving.model_fetch, "ensure_default_model", no_network)
    try:
        rc = main(["run", "--log-format", "json", "--home", str(tmp_path / "home"),
                   "--data-dir", str(tmp_path / "data")])
    finally:
        configure_logging("text")
    got = _records(capsys.readouterr().err)
    assert rc == 2
    assert [r["level"] for r in got] == ["INFO", "ERROR"]
    assert "fetching the default model" in got[0]["message"] and got[1]["message"] == "offline"


def test_serve_with_env_json_writes_every_start_up_line_as_json(tmp_path, monkeypatch, capsys):
    """The real `serve` (store, web app, scheduler, uvicorn) with KTO_LOOP_LOG_FORMAT=json: stdout and stderr hold
    JSON only, the start-up lines carry their fields, and the admin password is not in them."""
    import serving.server
    from app.config import config_from
    from app.main import serve
    from tests.app.test_served_truth import FakeVLLM

    fake = FakeVLLM()
    fake.log_path = tmp_path / "data" / "vllm.log"
    fake.is_healthy = lambda timeout=2.0: True
    monkeypatch.setattr(serving.server, "VLLMServer", lambda spec: fake)
    monkeypatch.setenv("KTO_LOOP_LOG_FORMAT", "json")
    monkeypatch.setattr("app.web.auth.new_password", lambda: "not-in-logs")   # the random password it would print
    cfg = config_from(None)
    assert cfg.log_format == "json"
    cfg = Config(data_dir=tmp_path / "data", model_dir=tmp_path / "model", promote_max_capability_drop=-1.0,
                 log_format=cfg.log_format, backup_interval_hours=0, port=0).resolved()
    ready, stop = threading.Event(), threading.Event()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(serve(cfg, ready=ready, stop=stop)), daemon=True)
    try:
        t.start()
        assert ready.wait(120), "the app did not start"
        logging.getLogger("uvicorn.error").warning("from uvicorn")   # as uvicorn's own set-up left its loggers
        stop.set()
        t.join(30)
    finally:
        stop.set()
        fake.close()
        configure_logging("text")
    out = capsys.readouterr()
    assert result == [0]
    got = _records(out.out + out.err)
    messages = [r["message"] for r in got]
    assert any(m.startswith("starting vLLM with") for m in messages), messages
    start = next(r for r in got if r["message"].startswith("starting vLLM with"))
    assert start["logger"] == "kto_loop" and start["vllm_log"] == str(fake.log_path)
    url = next(r for r in got if r["message"].startswith("chat at"))
    assert any((r["logger"], r["message"]) == ("uvicorn.error", "from uvicorn") for r in got), messages
    assert url["url"].startswith("http://") and "not-in-logs" not in out.out + out.err


def test_uvicorn_lines_reach_the_json_handler_after_a_text_setup_in_the_same_process(capsys):
    """uvicorn's text config stops its loggers from propagating; the JSON config must undo that."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    from app.logs import uvicorn_log_config

    logging.config.dictConfig(LOGGING_CONFIG)          # an earlier text-mode server in this process
    try:
        configure_logging("json")
        if (cfg := uvicorn_log_config("json")) is not None:    # what uvicorn.Config does with it
            logging.config.dictConfig(cfg)
        logging.getLogger("uvicorn.error").warning("after text")
        logging.getLogger("uvicorn.access").info("GET / 200")
    finally:
        configure_logging("text")
    got = _records(capsys.readouterr().err)
    assert [(r["logger"], r["message"]) for r in got] == [("uvicorn.error", "after text"),
                                                          ("uvicorn.access", "GET / 200")]
