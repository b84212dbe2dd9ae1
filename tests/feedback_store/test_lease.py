"""The leader lease: on the DuckDB file the one process leads; on PostgreSQL exactly one of the processes sharing
the store leads, and when it is killed another takes over within a poll, clearing what the dead one left open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from feedback_store import FeedbackStore
from feedback_store.lease import LeaderLease

POLL_S = 0.1
TAKEOVER_BOUND_S = 5.0   # the survivor's next poll after the server ends the killed session (at once, for kill -9)

# one app process's lease loop: on becoming leader it opens a run and begins a promotion it never finishes
_HOLDER = r"""
import os, sys, time
from pathlib import Path
from feedback_store import FeedbackStore
from feedback_store.lease import LeaderLease

url, me, out, poll = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
store = FeedbackStore(url)
lease = LeaderLease(store)
polls = 0
while True:
    if lease.refresh() and not (out / f"leader-{me}").exists():
        (out / f"took-over-{me}").write_text("\n".join(lease.took_over))
        run = store.start_run("schedule")
        store.register_adapter(f"v-{me}", "/nowhere", run_id=run)
        store.begin_promotion(f"v-{me}")
        tmp = out / f".leader-{me}"
        tmp.write_text(f"{run} {time.time()}")
        os.replace(tmp, out / f"leader-{me}")
    polls += 1
    tmp = out / f".polls-{me}"
    tmp.write_text(str(polls))
    os.replace(tmp, out / f"polls-{me}")
    time.sleep(poll)
"""


def _polls(out: Path, me: str) -> int:
    try:
        return int((out / f"polls-{me}").read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_the_one_process_of_a_duckdb_file_leads(tmp_path):
    with FeedbackStore(tmp_path / "fb.duckdb") as store:
        lease = LeaderLease(store)
        assert not lease.shared and lease.refresh() and lease.held
        assert f"pid {os.getpid()}" in lease.holder()
        lease.close()
        assert lease.refresh()


def test_one_of_two_processes_leads_and_the_other_takes_over_when_it_is_killed(pg_url, tmp_path):
    procs = {me: subprocess.Popen([sys.executable, "-c", _HOLDER, pg_url, me, str(tmp_path), str(POLL_S)],
                                  cwd=Path(__file__).parents[2], stderr=subprocess.PIPE, text=True)
             for me in ("a", "b")}
    try:
        # both alive and polling the lease many times over: exactly one ever became leader
        _wait(lambda: all(_polls(tmp_path, me) >= 10 for me in procs), 60, "both processes to poll the lease")
        leaders = [me for me in procs if (tmp_path / f"leader-{me}").exists()]
        assert len(leaders) == 1, leaders
        first = leaders[0]
        other = "b" if first == "a" else "a"
        run = (tmp_path / f"leader-{first}").read_text().split()[0]
        with FeedbackStore(pg_url) as store:
            holder = LeaderLease(store).holder()
            assert holder == f"kto-loop leader {os.uname().nodename} pid {procs[first].pid}"[:63]
            assert store.get_run(run)["status"] == "running" and store.pending_promotions() == [f"v-{first}"]

        procs[first].send_signal(signal.SIGKILL)
        killed_at = time.time()
        procs[first].wait(10)
        took = _wait(lambda: (tmp_path / f"leader-{other}").exists(), TAKEOVER_BOUND_S, "the survivor to lead")
        assert took
        assert float((tmp_path / f"leader-{other}").read_text().split()[1]) - killed_at < TAKEOVER_BOUND_S
        assert (tmp_path / f"took-over-{other}").read_text().splitlines() == [
            "marked 1 run(s) of a stopped process failed", f"aborted the interrupted promotion of v-{first}"]
        with FeedbackStore(pg_url) as store:
            dead = store.get_run(run)
            assert dead["status"] == "failed" and "another took over the realignment loop" in dead["error"]
            events = [(e["event"], e["to_version"]) for e in store.adapter_events()]
            assert ("aborted", f"v-{first}") in events
            # the new leader's own run is open (its lock held), the old one's promotion closed, nothing else
            assert store.pending_promotions() == [f"v-{other}"]
            new_run = (tmp_path / f"leader-{other}").read_text().split()[0]
            assert store.get_run(new_run)["status"] == "running"
            assert LeaderLease(store).holder().endswith(f"pid {procs[other].pid}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(10)


def test_a_leader_that_loses_its_session_takes_the_role_again_and_keeps_its_own_open_run(pg_url):
    """The lease's connection drops (server restart, network): the role is lost with it and taken again at the next
    refresh; the take-over clean-up runs on the lease's own session, so this process's open run (whose lock its
    store connection holds) is not mistaken for a dead one's."""
    with FeedbackStore(pg_url) as store, FeedbackStore(pg_url) as other_store:
        lease, other = LeaderLease(store), LeaderLease(other_store)
        assert lease.refresh() and not other.refresh()
        run = store.start_run("operator")
        store.register_adapter("v1", "/nowhere", run_id=run)
        store.begin_promotion("v1")          # this live process is promoting: nobody may abort that
        pid = lease._conn._c.info.backend_pid
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        assert lease.refresh() and lease._conn._c.info.backend_pid != pid
        assert not other.refresh()
        assert store.get_run(run)["status"] == "running" and lease.runs_in_flight() == [run]
        assert lease.took_over == [] and store.pending_promotions() == ["v1"]
        lease.close()
        assert other.refresh() and not lease.refresh()
        # the other leader leaves a live process's run, and the promotion inside it, alone
        assert store.get_run(run)["status"] == "running" and store.pending_promotions() == ["v1"]
        other.close()
