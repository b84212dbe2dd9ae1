"""Scheduled realignment inside the app process (APScheduler BackgroundScheduler).

The schedule (interval or cron, minimum new ratings, maximum examples) lives in the persisted operator settings,
and the job's next run time in DATA_DIR/schedule_state.json, both surviving restarts: a restart (or saving an
unrelated setting) keeps the next run where it was instead of counting a fresh interval from "now", so a daily
schedule with daily restarts still fires, and a run time missed while the app was down gives one catch-up run
at start (coalesced, however many were missed; no misfire grace limit, so a busy moment never skips a tick).

A scheduled tick only starts a run when enough new ratings arrived since the last run, no run is going, and the
last runs did not fail: after N failed runs in a row the schedule waits BACKOFF_BASE_S·2^(N-1) (capped at
BACKOFF_CAP_S) from the last failure before trying again, instead of failing again on every tick. Runs happen on
a worker thread, so a tick never blocks the scheduler; an operator can always start a run by hand.

Several app processes on one PostgreSQL store (docs/deploy.md, "Several app replicas"): only the holder of the
store's leader lease (feedback_store/lease.py) schedules and starts runs. Every `sync_s` seconds each process
keeps or takes the lease (starting or stopping its schedule) and serves what the store says is served
(app/loop/served.py, `follow`). An operator's "align now" on another process is refused with NotLeader, naming
the leader, rather than forwarded: a replica knows no other replica's address or console credentials, and a
refusal cannot start a run twice. Without a lease (the DuckDB file: one process) all of this is off.

Retention (`retention_days` > 0): once at start-up and then daily, the leader deletes the conversations whose last
activity is older than that, with their ratings (FeedbackStore.expire_before; docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_SUBMITTED
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from app.loop.realign import Realigner, RunInProgress
from app.operator_settings import OperatorSettings, SettingsStore, validate_schedule, write_json_atomic

__all__ = ["NotLeader", "RealignScheduler", "backoff_until", "failure_streak", "first_run_time", "validate_schedule"]

log = logging.getLogger(__name__)

JOB_ID = "realign"
SYNC_JOB_ID = "replica-sync"
RETENTION_JOB_ID = "retention"
SERVING_JOB_ID = "vllm-replicas"
STATE_FILE = "schedule_state.json"
BACKOFF_BASE_S = 600.0          # first wait after a failed run: 10 minutes
BACKOFF_CAP_S = 24 * 3600.0     # never more than a day between tries


def new_ratings(store) -> int:
    """Ratings since the last run, whatever shape the store returns it in."""
    got = store.ratings_since_last_run()
    if isinstance(got, int):
        return got
    if isinstance(got, dict):
        for k in ("total", "n", "count"):
            if k in got:
                return int(got[k])
        return int(sum(v for k, v in got.items() if k in ("up", "down") and isinstance(v, int)))
    return int(getattr(got, "total", 0) or (getattr(got, "up", 0) + getattr(got, "down", 0)))


# ---------------------------------------------------------------- pure rules

def schedule_key(s: OperatorSettings) -> dict[str, Any]:
    """What identifies a schedule: a persisted next run belongs to it only while these stay the same."""
    return {"interval_minutes": s.interval_minutes, "cron": s.cron.strip()}


def first_run_time(trigger, state: Mapping[str, Any] | None, key: Mapping[str, Any], now: datetime) -> datetime | None:
    """When the job fires first after the schedule is (re)applied at `now`.

    The persisted next run when it belongs to this same schedule (if it is already past, the job is due at once:
    one catch-up run); otherwise the trigger's first time after `now`.
    """
    if state and state.get("schedule") == dict(key) and state.get("next_run"):
        try:
            at = datetime.fromisoformat(str(state["next_run"]))
        except ValueError:
            at = None
        if at is not None and at.tzinfo is not None:
            return at
    return trigger.get_next_fire_time(None, now)


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):   # the store keeps naive UTC
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    try:
        return _epoch(datetime.fromisoformat(str(value)))
    except ValueError:
        return None


def failure_streak(runs: list[Mapping[str, Any]]) -> tuple[int, float | None]:
    """How many of the newest runs (newest first) failed in a row, and when the newest of those ended (epoch s).

    A running or cancelled run neither counts nor breaks the streak; any other outcome ends it.
    """
    n, last = 0, None
    for r in runs:
        status = r.get("status")
        if status in ("running", "cancelled"):
            continue
        if status != "failed":
            break
        if last is None:
            last = _epoch(r.get("finished_at")) or _epoch(r.get("started_at"))
        n += 1
    return n, last


def backoff_until(failures: int, last_failed_at: float | None, base_s: float = BACKOFF_BASE_S,
                  cap_s: float = BACKOFF_CAP_S) -> float:
    """Epoch seconds before which a scheduled run must not start after `failures` failed runs in a row."""
    if failures <= 0 or last_failed_at is None:
        return 0.0
    return last_failed_at + min(cap_s, base_s * 2 ** min(failures - 1, 32))


# ---------------------------------------------------------------- the scheduler

class NotLeader(RunInProgress):
    """Another app process holds the leader lease: runs start there. A RunInProgress, so every caller that reports a
    refused trigger (console, API's 409, `kto-loop align --now`) reports this one as it is."""


class RealignScheduler:
    """Owns the BackgroundScheduler; `apply()` re-reads the persisted settings and reschedules."""

    def __init__(self, realigner: Realigner, store, settings: SettingsStore, *, clock: Callable[[], float] = time.time,
                 backoff: tuple[float, float] = (BACKOFF_BASE_S, BACKOFF_CAP_S), lease: Any = None,
                 follow: Callable[[], Any] | None = None, sync_s: float = 5.0, retention_days: float = 0.0,
                 serving_sync: Callable[[], Any] | None = None):
        self.realigner, self.store, self.settings = realigner, store, settings
        self.retention_days = retention_days   # 0: keep for ever
        # lease: feedback_store.LeaderLease when other processes share the store (None: this one leads, always);
        # follow: makes this process serve what the store says; both checked every sync_s seconds (0 = never)
        self.lease, self.follow, self.sync_s = lease, follow, sync_s
        # serving_sync: keeps each vLLM replica behind a router holding the served versions (the leader only: a
        # follower may still name the version before a promotion for up to sync_s)
        self.serving_sync = serving_sync
        self.leader = lease is None
        self.clock, self.backoff = clock, backoff
        self.state_path = Path(settings.path).parent / STATE_FILE
        self.scheduler = BackgroundScheduler(daemon=True, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        self.scheduler.add_listener(self._persist_next_run, EVENT_JOB_SUBMITTED | EVENT_JOB_MAX_INSTANCES)
        self.last_tick: dict[str, Any] = {}
        self._thread: threading.Thread | None = None
        self._apply_lock = threading.Lock()

    def start(self) -> None:
        self.scheduler.start()
        if self.lease is not None:
            self.leader = self._leading()
        self.apply()
        if self.lease is not None and self.sync_s > 0:
            self.scheduler.add_job(self.sync, IntervalTrigger(seconds=self.sync_s), id=SYNC_JOB_ID,
                                   replace_existing=True)
        if self.serving_sync is not None and self.sync_s > 0:
            self.scheduler.add_job(self.check_serving, IntervalTrigger(seconds=self.sync_s), id=SERVING_JOB_ID,
                                   replace_existing=True, max_instances=1, coalesce=True)
        if self.retention_days > 0:   # now (start-up), then daily
            self.scheduler.add_job(self.expire, IntervalTrigger(days=1), id=RETENTION_JOB_ID, replace_existing=True,
                                   next_run_time=datetime.now(self.scheduler.timezone))

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.lease is not None:
            self.lease.close()  # another process takes the role at its next check, not when a timeout runs out

    def _leading(self) -> bool:
        try:
            return bool(self.lease.refresh())
        except Exception as e:  # the store is unreachable: nobody can be sure to lead, so this process does not
            log.error("leader lease: %s", e)
            return False

    def sync(self) -> None:
        """One replica check: keep or take the lease (and start or stop the schedule with it), then serve what the
        store says is served."""
        leading = self._leading()
        if leading != self.leader:
            self.leader = leading
            log.warning("%s the realignment schedule: %s", "running" if leading else "no longer running",
                        "this process holds the leader lease" if leading else "another process leads")
            self.apply()
        if self.follow is not None:
            try:
                self.follow()
            except Exception as e:  # logged; the next check tries again
                log.error("could not serve the version the store names: %s", e)

    def check_serving(self) -> dict[str, Any] | None:
        """The replica job: on the leader, take vLLM replicas that are down or lack the served versions out of the
        router, and put them back once they hold them (serving/registry.py, sync_replicas)."""
        if self.serving_sync is None or not self.leader:
            return None
        try:
            return self.serving_sync()
        except Exception as e:  # logged; the next check tries again
            log.error("could not check the vLLM replicas: %s", e)
            return None

    def expire(self) -> dict[str, Any] | None:
        """The retention job: delete conversations whose last activity is older than retention_days, on the leader
        only (replicas would race for the same rows); what it deleted, or None when it did not run."""
        if self.retention_days <= 0 or not self.leader:
            return None
        cutoff = datetime.fromtimestamp(self.clock(), UTC).replace(tzinfo=None) - timedelta(days=self.retention_days)
        try:
            report = self.store.expire_before(cutoff).as_dict()
        except Exception as e:  # logged; tomorrow's pass tries again
            log.error("retention: could not delete conversations older than %s: %s", cutoff, e)
            return None
        if report["conversations"]:
            log.warning("retention: deleted %d conversations (%d ratings) with no activity since %s",
                        report["conversations"], report["ratings"], cutoff)
        return report

    def not_leader_reason(self) -> str | None:
        """Why this process may not start a run (another leads), or None when it may."""
        if self.lease is None:
            return None
        if self._leading():  # a role change itself is sync's to apply (the schedule starts or stops there)
            return None
        holder = self.lease.holder() if self.lease.shared else None
        return (f"this app process does not run the realignment loop: {holder or 'another app process'} holds "
                f"the store's leader lease; start the run there, or wait for its schedule")

    def _run_elsewhere(self) -> str | None:
        """A run open in the store that is not this process's (another process, still alive, runs it)."""
        if self.lease is None or self.realigner.running:
            return None
        running = self.lease.runs_in_flight()
        return f"run {running[0]} is in progress in another app process" if running else None

    def update(self, **changes: Any) -> OperatorSettings:
        """Check and persist schedule changes (SettingsError, nothing written, on a bad value), then reschedule."""
        s = self.settings.update(**changes)
        self.apply()
        return s

    def apply(self) -> None:
        with self._apply_lock:
            s = self.settings.load()
            if self.scheduler.get_job(JOB_ID):
                self.scheduler.remove_job(JOB_ID)
            trigger = self.trigger_for(s)
            if trigger is None:
                self._write_state(None)
                return
            if not self.scheduler.running or not self.leader:  # a process without the lease schedules nothing
                return
            key = schedule_key(s)
            first = first_run_time(trigger, self._read_state(), key, datetime.now(self.scheduler.timezone))
            # written before the job exists: once added it may fire at once, and its listener's newer time wins
            self._write_state({"schedule": key, "next_run": first.isoformat() if first else None})
            self.scheduler.add_job(self.tick, trigger, id=JOB_ID, replace_existing=True, next_run_time=first)

    @staticmethod
    def trigger_for(s: OperatorSettings):
        if not s.enabled:
            return None
        if s.cron.strip():
            return CronTrigger.from_crontab(s.cron.strip())
        if s.interval_minutes > 0:
            return IntervalTrigger(minutes=s.interval_minutes)
        return None

    def next_run_time(self) -> str | None:
        job = self.scheduler.get_job(JOB_ID) if self.scheduler.running else None
        return job.next_run_time.isoformat(timespec="seconds") if job and job.next_run_time else None

    def backoff_state(self) -> dict[str, Any]:
        """Failed runs in a row and until when scheduled runs wait because of them (epoch s; 0 = no wait)."""
        failures, last = failure_streak(self.store.runs(limit=64))
        until = backoff_until(failures, last, *self.backoff)
        return {"failures_in_a_row": failures, "wait_until": until if until > self.clock() else 0.0}

    def tick(self) -> dict[str, Any]:
        """One scheduled check: start a run on a worker thread if enough new ratings arrived and no backoff holds."""
        s = self.settings.load()
        n = new_ratings(self.store)
        now = self.clock()
        info: dict[str, Any] = {"at": now, "new_ratings": n, "min_new_ratings": s.min_new_ratings}
        wait = self.backoff_state()
        refused = self.not_leader_reason()
        elsewhere = None if refused else self._run_elsewhere()
        if refused:
            info["started"], info["why"] = False, refused
        elif self.realigner.running:
            info["started"], info["why"] = False, "a run is already in progress"
        elif elsewhere:
            info["started"], info["why"] = False, elsewhere
        elif wait["wait_until"]:
            at = datetime.fromtimestamp(wait["wait_until"], UTC).isoformat(timespec="seconds")
            info["started"], info["why"] = False, (
                f"backing off after {wait['failures_in_a_row']} failed run(s) in a row: next try after {at}")
        elif n < s.min_new_ratings:
            info["started"], info["why"] = False, f"only {n} new ratings (need {s.min_new_ratings})"
        else:
            info["started"], info["why"] = True, f"{n} new ratings"
            try:
                self.start_run("schedule", max_examples=s.max_examples)
            except RunInProgress as e:
                info["started"], info["why"] = False, str(e)
        self.last_tick = info
        return info

    def start_run(self, trigger: str, max_examples: int | None = None) -> None:
        """Start a run in the background; raises RunInProgress at once if one is going."""
        refused = self.not_leader_reason()
        if refused:
            raise NotLeader(refused)
        if self.realigner.running:
            raise RunInProgress("a realignment run is already in progress")
        elsewhere = self._run_elsewhere()
        if elsewhere:
            raise RunInProgress(elsewhere)
        started = threading.Event()
        error: list[BaseException] = []

        def work() -> None:
            try:
                self.realigner.run(trigger, progress=lambda ev: started.set(), max_examples=max_examples)
            except RunInProgress as e:
                error.append(e)
            finally:
                started.set()

        self._thread = threading.Thread(target=work, name=f"realign-{trigger}", daemon=True)
        self._thread.start()
        started.wait(timeout=10)
        if error:
            raise error[0]

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the persisted next run -----------------------------------------------------------------------------
    def _persist_next_run(self, event) -> None:
        """After each firing: the job's new next run (APScheduler updates it before it reports the submission)."""
        if getattr(event, "job_id", None) != JOB_ID:
            return
        with self._apply_lock:   # APScheduler reports events outside its job-store lock: no lock-order cycle
            job = self.scheduler.get_job(JOB_ID)
            state = self._read_state() or {}
            if job is None or job.next_run_time is None or not state.get("schedule"):
                return
            self._write_state({"schedule": state["schedule"], "next_run": job.next_run_time.isoformat()})

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.error("%s is unreadable (%s): the schedule starts afresh", self.state_path, e)
            return None
        return state if isinstance(state, dict) else None

    def _write_state(self, state: dict[str, Any] | None) -> None:
        try:
            if state is None:
                self.state_path.unlink(missing_ok=True)
            else:
                write_json_atomic(self.state_path, state)
        except OSError as e:  # the schedule still runs; only a restart would lose its place
            log.error("could not persist the schedule's next run to %s: %s", self.state_path, e)
