"""Scheduled realignment inside the app process (APScheduler BackgroundScheduler).

The schedule (interval or cron, minimum new ratings, maximum examples) lives in the persisted operator settings,
so it survives restarts. A scheduled tick only starts a run when enough new ratings arrived since the last run
and no run is going; runs happen on a worker thread, so a tick never blocks the scheduler.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from app.loop.realign import Realigner, RunInProgress
from app.operator_settings import OperatorSettings, SettingsStore

JOB_ID = "realign"


def validate_schedule(interval_minutes: int, cron: str) -> None:
    """Raise ValueError with a clear message for a schedule APScheduler would refuse."""
    if interval_minutes < 0:
        raise ValueError("interval must be 0 (off) or a positive number of minutes")
    if interval_minutes and cron.strip():
        raise ValueError("choose either an interval or a cron expression, not both")
    if cron.strip():
        try:
            CronTrigger.from_crontab(cron.strip())
        except ValueError as e:
            raise ValueError(f"bad cron expression {cron!r}: {e}") from None


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


class RealignScheduler:
    """Owns the BackgroundScheduler; `apply()` re-reads the persisted settings and reschedules."""

    def __init__(self, realigner: Realigner, store, settings: SettingsStore):
        self.realigner, self.store, self.settings = realigner, store, settings
        self.scheduler = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
        self.last_tick: dict[str, Any] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.scheduler.start()
        self.apply()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def update(self, **changes: Any) -> OperatorSettings:
        s = self.settings.load()
        merged = {"interval_minutes": s.interval_minutes, "cron": s.cron} | {
            k: v for k, v in changes.items() if k in ("interval_minutes", "cron")}
        validate_schedule(int(merged["interval_minutes"]), str(merged["cron"]))
        for k in ("min_new_ratings", "max_examples"):
            if k in changes and int(changes[k]) < (0 if k == "min_new_ratings" else 1):
                raise ValueError(f"{k.replace('_', ' ')} must be {'≥ 0' if k == 'min_new_ratings' else '≥ 1'}")
        s = self.settings.update(**changes)
        self.apply()
        return s

    def apply(self) -> None:
        s = self.settings.load()
        if self.scheduler.get_job(JOB_ID):
            self.scheduler.remove_job(JOB_ID)
        trigger = self.trigger_for(s)
        if trigger is not None and self.scheduler.running:
            self.scheduler.add_job(self.tick, trigger, id=JOB_ID, replace_existing=True)

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

    def tick(self) -> dict[str, Any]:
        """One scheduled check: start a run on a worker thread if enough new ratings arrived."""
        s = self.settings.load()
        n = new_ratings(self.store)
        info: dict[str, Any] = {"at": time.time(), "new_ratings": n, "min_new_ratings": s.min_new_ratings}
        if self.realigner.running:
            info["started"], info["why"] = False, "a run is already in progress"
        elif n < s.min_new_ratings:
            info["started"], info["why"] = False, f"only {n} new ratings (need {s.min_new_ratings})"
        else:
            info["started"], info["why"] = True, f"{n} new ratings"
            self.start_run("schedule", max_examples=s.max_examples)
        self.last_tick = info
        return info

    def start_run(self, trigger: str, max_examples: int | None = None) -> None:
        """Start a run in the background; raises RunInProgress at once if one is going."""
        if self.realigner.running:
            raise RunInProgress("a realignment run is already in progress")
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
