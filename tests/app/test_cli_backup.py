"""`kto-loop backup` and `kto-loop restore` on real DuckDB files: offline, and online through a running app
(real FastAPI app over HTTP) while ratings keep arriving."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import uvicorn

from app.cli import main
from app.config import Config
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import RUNTIME_FILE, SettingsStore, write_json_atomic
from feedback_store import FeedbackStore, check_backup, list_backups


def _fill(store: FeedbackStore, n: int = 50) -> str:
    conv = store.new_conversation("host")
    msg = store.add_user_message(conv, "hi")
    a = store.add_answer(conv, msg, [{"role": "user", "content": "hi"}], "answer")
    store.rate_many([(f"u{i}", a, "up" if i % 2 else "down") for i in range(n)])
    return a


def test_backup_then_restore_after_the_file_is_damaged(tmp_path, capsys):
    data = tmp_path / "data"
    db = data / "feedback.duckdb"
    with FeedbackStore(db) as s:
        _fill(s)
    assert main(["backup", "--data-dir", str(data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["via"] == "file" and Path(out["path"]) in list_backups(data / "backups")
    with open(db, "r+b") as f:
        f.write(b"\0" * 8192)
    assert main(["stats", "--json", "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and f"kto-loop restore {out['path']}" in err and "Traceback" not in err
    assert main(["restore", out["path"], "--data-dir", str(data)]) == 0
    done = json.loads(capsys.readouterr().out)
    assert Path(done["previous"]).exists()
    with FeedbackStore(db, read_only=True) as s:
        assert s.counts()["total"] == 50
    assert main(["restore", str(tmp_path / "nope.duckdb"), "--data-dir", str(data)]) == 1
    assert "no backup file" in capsys.readouterr().err


class _Server:
    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout=2.0):
        return True


class _Registry:
    def current(self):
        return "base"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backup_goes_through_the_running_app_while_it_writes(tmp_path, capsys):
    """The app holds the file (DuckDB: one writer process): the CLI asks the app over its admin API, and the
    copy holds every rating acknowledged before the request while writes go on; restore is refused."""
    cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model").resolved()
    store = FeedbackStore(cfg.db_path)
    reg = _Registry()
    st = Stack(_Server(), store, reg, None, Realigner(store, reg, model_dir=cfg.model_dir, work_dir=tmp_path / "r"),
               SettingsStore(tmp_path, default_settings(cfg)), cfg)
    app, _ = create_app(st, "pw")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    a = _fill(store, 1)
    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.rate(f"w{i}", a, "up")
            acked.append(f"w{i}")
            i += 1

    w = threading.Thread(target=writer)
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        write_json_atomic(tmp_path / RUNTIME_FILE, {"url": f"http://127.0.0.1:{port}", "pid": os.getpid(),
                                                     "admin_user": "admin", "admin_password": "pw"}, mode=0o600)
        w.start()
        time.sleep(0.3)
        before = list(acked)
        to = tmp_path / "manual.duckdb"
        assert main(["backup", "--to", str(to), "--data-dir", str(tmp_path)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["via"] == "app" and Path(out["path"]) == to.resolve()
        assert main(["backup", "--to", str(to), "--data-dir", str(tmp_path)]) == 1     # never overwritten
        assert "never overwrites" in capsys.readouterr().err
        assert main(["restore", str(to), "--data-dir", str(tmp_path)]) == 2
        assert "stop it first" in capsys.readouterr().err
    finally:
        stop.set()
        if w.is_alive():
            w.join()
        server.should_exit = True
        serving.join(timeout=30)
        store.close()
    check_backup(to)
    with FeedbackStore(to, read_only=True) as b:
        users = {r[0] for r in b._read("SELECT user_id FROM ratings")}
    assert len(before) > 10 and set(before) <= users


def test_restore_leaves_a_postgres_store_to_the_servers_tools(tmp_path, capsys):
    """With db_url set the store is on PostgreSQL: restoring the DuckDB file beside it would restore nothing the app
    reads, so it is refused and the file is left as it was."""
    data = tmp_path / "data"
    with FeedbackStore(data / "feedback.duckdb") as s:
        _fill(s)
        backup = s.backup(tmp_path / "b.duckdb").path
    before = (data / "feedback.duckdb").read_bytes()
    assert main(["restore", str(backup), "--data-dir", str(data), "--db-url", "postgresql://kto@/kto"]) == 2
    assert "pg_restore" in capsys.readouterr().err
    assert (data / "feedback.duckdb").read_bytes() == before
