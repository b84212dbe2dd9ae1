"""The console's DuckDB copy of a PostgreSQL store: the same answers as the store itself, never older than its
interval once refreshed, never written, one moment of every table, and deletions gone after the next copy."""

from __future__ import annotations

import os
import threading
import time

import psycopg
import pytest

from app.loop import next_run
from feedback_store import FeedbackStore, ReadOnlyStore
from feedback_store.mirror import DashboardCopy, build


def _history(store: FeedbackStore) -> dict[str, str]:
    """Ratings by several users and addresses on two served versions, withdrawn and changed ones, reasons and
    comments with the characters CSV must carry (quotes, commas, newlines, an empty string), a finished run."""
    answers = {}
    for i in range(12):
        conv = store.new_conversation(f"u{i % 4}", system_prompt="Be brief.")
        msg = store.add_user_message(conv, f"q{i} ünïcödé")
        answers[f"a{i}"] = store.add_answer(conv, msg, [{"role": "user", "content": f"q{i}"}], f"answer {i}",
                                            adapter="base" if i < 6 else "v1")
        if i == 5:
            run = store.start_run("cli")
            store.register_adapter("v1", "/adapters/v1", run_id=run)
            store.finish_run(run, "promoted", n_desirable=3, n_undesirable=4, lambda_d=1.0, lambda_u=0.8,
                             metrics={"reason": "gain 0.2"}, adapter_version="v1")
            store.mark_promoted("v1", reason="gate passed")
    items = [(f"r{j}", a, "up" if (i + j) % 3 else "down",
              "wrong" if (i + j) % 3 == 0 and j == 1 else None,
              ['he said "no", then\nleft', "", "plain, with comma"][j] if (i + j) % 3 == 0 else None,
              f"10.0.0.{j % 2}") for i, a in enumerate(answers.values()) for j in range(3)]
    store.rate_many(items)
    store.rate("r0", answers["a0"], None)                        # withdrawn
    store.rate("r1", answers["a1"], "up", reason="changed my mind")
    return answers


def _dashboard(store: FeedbackStore) -> dict:
    """Every figure the console reads from the copy (app/web/console.py, Operator)."""
    nxt = next_run.next_run(store, mode="continue", max_examples=2000).as_dict()
    return {"counts": store.counts(), "by_hour": store.counts_by_time("hour"), "by_day": store.counts_by_time("day"),
            "by_adapter": store.counts_by_adapter(), "by_user": store.counts_by_user(),
            "since_last_run": store.ratings_since_last_run(), "next": nxt,
            "unseen": store.training_counts(since="v1", max_user_share=None, max_addr_share=None),
            "shares": store.snapshot_shares(since=nxt["since"], max_examples=2000, top=5),
            "capped": store.training_counts(max_user_share=0.34, max_addr_share=0.5),
            "runs": store.runs(), "adapters": store.adapters(), "events": store.adapter_events(),
            "current": store.current_adapter(), "rows": store._read_dicts(
                "SELECT * FROM ratings ORDER BY id")}


def test_the_copy_answers_every_console_figure_exactly_as_postgresql_does(pg_url, tmp_path):
    with FeedbackStore(pg_url, max_user_share=0.5) as pg:
        _history(pg)
        n = build(pg, tmp_path / "copy.duckdb")
        with FeedbackStore(tmp_path / "copy.duckdb", read_only=True, max_user_share=0.5) as copy:
            assert n == 36
            want, got = _dashboard(pg), _dashboard(copy)
            assert got == want
            assert {"he said \"no\", then\nleft", "", "plain, with comma", None} <= set(
                r["comment"] for r in copy._read_dicts("SELECT comment FROM ratings"))


def test_a_run_with_megabytes_of_metrics_is_copied_whole(pg_url, tmp_path):
    with FeedbackStore(pg_url) as pg:
        run = pg.start_run("cli")
        metrics = {"checkpoints": [{"step": i, "note": "x" * 1000} for i in range(3000)]}   # about 3 MB of JSON
        pg.finish_run(run, "rejected", metrics=metrics)
        build(pg, tmp_path / "copy.duckdb")
        with FeedbackStore(tmp_path / "copy.duckdb", read_only=True) as copy:
            assert copy.get_run(run)["metrics"] == metrics == pg.get_run(run)["metrics"]


def test_only_the_stores_deployment_is_copied(pg_url, tmp_path):
    with FeedbackStore(pg_url, deployment="other") as other:
        _history(other)
    with FeedbackStore(pg_url) as pg:
        conv = pg.new_conversation("u")
        a = pg.add_answer(conv, pg.add_user_message(conv, "q"), [{"role": "user", "content": "q"}], "a")
        pg.rate("u", a, "up")
        assert build(pg, tmp_path / "copy.duckdb") == 1
        with FeedbackStore(tmp_path / "copy.duckdb", read_only=True) as copy:
            assert copy.counts() == pg.counts() == {"up": 1, "down": 0, "withdrawn": 0, "total": 1}
            assert copy.adapters() == []


def test_the_console_reads_a_copy_no_older_than_its_interval_and_never_waits_for_one(pg_url, tmp_path):
    now = [1000.0]
    with FeedbackStore(pg_url) as pg:
        answers = _history(pg)
        mirror = DashboardCopy(pg, tmp_path / "dash", max_age_s=30, clock=lambda: now[0])
        try:
            assert mirror.store() is pg             # no copy yet: the store itself, and one is being made
            mirror.refresh()
            first = mirror.store()
            assert first is not pg and first.counts() == pg.counts() and mirror.as_of() == 1000.0
            pg.rate("late", answers["a3"], "up")
            now[0] += 29
            assert mirror.store() is first and first.counts()["up"] == pg.counts()["up"] - 1   # within 30 s
            now[0] += 1
            stale = mirror.store()                  # stale: a refresh starts, this read does not wait for it
            assert stale is first
            mirror.refresh()
            assert mirror.store().counts() == pg.counts() and mirror.as_of() == 1030.0
            assert sorted(p.name for p in (tmp_path / "dash").iterdir()) == ["dashboard-1.duckdb",
                                                                             "dashboard-2.duckdb"]
            mirror.refresh()                        # the oldest copy is closed and deleted, the previous one kept
            assert sorted(p.name for p in (tmp_path / "dash").iterdir()) == ["dashboard-2.duckdb",
                                                                             "dashboard-3.duckdb"]
        finally:
            mirror.close()
        assert not (tmp_path / "dash").exists()


def test_the_copy_is_read_only_and_the_share_caps_follow_the_operator(pg_url, tmp_path):
    with FeedbackStore(pg_url) as pg:
        answers = _history(pg)
        mirror = DashboardCopy(pg, tmp_path / "dash", max_age_s=60)
        try:
            mirror.refresh()
            with pytest.raises(ReadOnlyStore):
                mirror.store().rate("x", answers["a0"], "up")
            assert pg.get_rating("x", answers["a0"]) is None
            pg.set_share_caps(0.34, 0.5)            # the operator changes the caps while the app runs
            assert mirror.store().training_counts() == pg.training_counts()
            assert mirror.store().training_counts() != pg.training_counts(max_user_share=None, max_addr_share=None)
        finally:
            mirror.close()


def test_a_failing_copy_keeps_the_last_one_then_falls_back_to_the_store(pg_url, tmp_path, monkeypatch):
    now = [0.0]
    with FeedbackStore(pg_url) as pg:
        _history(pg)
        mirror = DashboardCopy(pg, tmp_path / "dash", max_age_s=10, clock=lambda: now[0])
        try:
            mirror.refresh()
            good = mirror.store()
            monkeypatch.setattr(pg._conn, "url", pg_url + "_no_such_db")
            now[0] = 15
            with pytest.raises(RuntimeError, match="no_such_db"):
                mirror.refresh()
            tries = mirror._n
            for now[0] in (15, 20, 24.9):               # a failed copy is not retried for one interval
                assert mirror.store() is good and mirror.as_of() == 0.0     # stale but within 4 intervals
                mirror._building.join()
            assert mirror._n == tries
            now[0] = 40
            assert mirror.store() is pg and mirror.as_of() is None      # too old to show: the store itself
            mirror._building.join()
            assert mirror._n == tries + 1 and "no_such_db" in mirror.last_error
        finally:
            mirror.close()


def test_a_copy_is_one_moment_of_every_table(pg_url, tmp_path, monkeypatch):
    """A run finishing while the copy is made is in both its tables or in neither (one REPEATABLE READ
    transaction): the copy never shows an adapter whose run is still running."""
    import feedback_store.mirror as mirror_mod

    with FeedbackStore(pg_url) as pg:
        _history(pg)
        run = pg.start_run("cli")
        copied: list[str] = []
        real = mirror_mod.TABLES

        def finish_between(table: str) -> None:
            copied.append(table)
            if table == "adapters":        # runs is copied, adapters not yet: the run finishes now
                with psycopg.connect(pg_url, autocommit=True) as c:
                    c.execute("UPDATE runs SET status = 'promoted', adapter_version = 'v2' WHERE id = %s", [run])
                    c.execute("INSERT INTO adapters VALUES ('default', 'v2', '/a/v2', NULL, 'v1', %s, now(), "
                              "NULL, NULL)", [run])

        class Spy(tuple):
            def __iter__(self):
                for t in real:
                    finish_between(t)
                    yield t
        monkeypatch.setattr(mirror_mod, "TABLES", Spy(real))
        build(pg, tmp_path / "copy.duckdb")
        assert copied == list(real)
        with FeedbackStore(tmp_path / "copy.duckdb", read_only=True) as copy:
            assert [a["version"] for a in copy.adapters()] == ["v1"]
            assert copy.get_run(run)["status"] == "running"
        assert [a["version"] for a in pg.adapters()] == ["v1", "v2"]


def test_forgotten_users_leave_the_next_copy(pg_url, tmp_path):
    with FeedbackStore(pg_url) as pg:
        _history(pg)
        mirror = DashboardCopy(pg, tmp_path / "dash", max_age_s=60)
        try:
            mirror.refresh()
            assert any(r["user_id"] == "r2" for r in mirror.store().counts_by_user())
            pg.forget_user("r2")
            mirror.refresh()
            assert not any(r["user_id"] == "r2" for r in mirror.store().counts_by_user())
            assert mirror.store().counts() == pg.counts()
        finally:
            mirror.close()


def test_readers_during_refreshes_never_fail(pg_url, tmp_path):
    """Console refreshes in several threads while copies replace each other: every read answers."""
    with FeedbackStore(pg_url) as pg:
        _history(pg)
        mirror = DashboardCopy(pg, tmp_path / "dash", max_age_s=0.01)
        errors: list[BaseException] = []
        stop = time.monotonic() + 3

        def read() -> None:
            while time.monotonic() < stop:
                try:
                    assert mirror.store().counts()["total"] == 36
                    mirror.store().counts_by_time("hour")
                except BaseException as e:  # noqa: BLE001 - collected for the assert below
                    errors.append(e)
                    return
        try:
            threads = [threading.Thread(target=read) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            mirror.close()
        assert not errors, errors[:3]
        assert mirror._n >= 3


def test_a_copy_stuck_behind_a_lock_ends_instead_of_waiting_forever(pg_url, tmp_path):
    """Someone holds the ratings table (a migration, a manual LOCK): the copy gives up after its timeout, so the
    console's refresh thread is never wedged and the next refresh tries again."""
    with FeedbackStore(pg_url) as pg:
        _history(pg)
        done: list[BaseException | int] = []
        with psycopg.connect(pg_url) as holder:
            holder.execute("LOCK TABLE ratings IN ACCESS EXCLUSIVE MODE")
            worker = threading.Thread(target=lambda: done.append(_try(lambda: build(pg, tmp_path / "c.duckdb",
                                                                                     timeout_s=1))))
            worker.start()
            worker.join(15)
            stuck = worker.is_alive()
            holder.rollback()
        worker.join()
        assert not stuck and isinstance(done[0], psycopg.errors.QueryCanceled), done
        assert build(pg, tmp_path / "c.duckdb", timeout_s=1) == 36


def _try(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - returned for the assert
        return e


def test_app_processes_sharing_a_data_dir_keep_their_own_copies(pg_url, tmp_path):
    """Each process's copies in a folder of its own (removed on close); a folder left by a process that died,
    untouched for a day, is removed by the next one to start, a live one's is not."""
    parent = tmp_path / "dashboard"
    dead = parent / "copy-dead"
    dead.mkdir(parents=True)
    (dead / "dashboard-7.duckdb").write_bytes(b"x")
    day_old = time.time() - 86_401
    os.utime(dead / "dashboard-7.duckdb", (day_old, day_old))
    with FeedbackStore(pg_url) as pg:
        _history(pg)
        a = DashboardCopy.own_folder(pg, parent, 30)
        b = DashboardCopy.own_folder(pg, parent, 30)
        try:
            assert not dead.exists() and a.folder != b.folder and a.folder.parent == b.folder.parent == parent
            a.refresh()
            b.refresh()
            assert [p.name for p in a.folder.iterdir()] == [p.name for p in b.folder.iterdir()] == [
                "dashboard-1.duckdb"]
            assert a.store().counts() == b.store().counts() == pg.counts()
        finally:
            a.close()
        assert not a.folder.exists() and b.folder.exists() and b.store().counts() == pg.counts()
        b.close()


def test_a_duckdb_store_needs_no_copy(tmp_path):
    with FeedbackStore(tmp_path / "fb.duckdb") as s, pytest.raises(ValueError, match="PostgreSQL"):
        build(s, tmp_path / "copy.duckdb")

