"""Admission control on the client side: while people chat, the product's own requests go a few at a time.

vLLM's priority orders only its waiting queue, and running requests share every step, so the limit must sit where
requests start. The app's one `Admission` counts requests by kind: "user" is never held back; "background" (the
capability guard, the simulator's measurements) goes at most `while_users` at a time while a user request is in
flight or ended less than `quiet_s` ago, all at once otherwise. Requests already in flight are not recalled.
Measured: docs/experiments/2026-11-30-probe-priority-and-admission.md.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

KINDS = ("user", "background")


class Admission:
    """Thread-safe counter of requests in flight by kind; `slot(kind)` holds one place for one request."""

    def __init__(self, while_users: int = 2, quiet_s: float = 5.0) -> None:
        if while_users < 1:
            raise ValueError(f"while_users must be at least 1 (background work must progress), got {while_users}")
        if quiet_s < 0:
            raise ValueError(f"quiet_s must be >= 0, got {quiet_s}")
        self.while_users, self.quiet_s = while_users, quiet_s
        self._cv = threading.Condition()
        self._in_flight = {k: 0 for k in KINDS}
        self._last_user_end = float("-inf")
        self._waits = 0
        self._wait_s = 0.0

    def _quiet_left(self) -> float:
        """Seconds until users count as gone: 0 when none is in flight and the quiet time has passed."""
        if self._in_flight["user"]:
            return float("inf")
        return max(0.0, self._last_user_end + self.quiet_s - time.monotonic())

    def users_active(self) -> bool:
        with self._cv:
            return self._quiet_left() > 0

    @contextlib.contextmanager
    def slot(self, kind: str) -> Iterator[None]:
        """Hold a place for one request of `kind` for the duration of the block (waiting first if it must)."""
        if kind not in KINDS:
            raise ValueError(f"request kind must be one of {KINDS}, got {kind!r}")
        with self._cv:
            if kind == "background":
                t0, waited = time.monotonic(), False
                while self._in_flight["background"] >= self.while_users and (left := self._quiet_left()) > 0:
                    waited = True
                    self._cv.wait(None if left == float("inf") else left)
                if waited:
                    self._waits += 1
                    self._wait_s += time.monotonic() - t0
            self._in_flight[kind] += 1
        try:
            yield
        finally:
            with self._cv:
                self._in_flight[kind] -= 1
                if kind == "user":
                    self._last_user_end = time.monotonic()
                self._cv.notify_all()

    def stats(self) -> dict[str, Any]:
        """In flight by kind, and how often / how long background requests waited for users."""
        with self._cv:
            return {"in_flight": dict(self._in_flight), "users_active": self._quiet_left() > 0,
                    "background_waits": self._waits, "background_wait_s": round(self._wait_s, 3),
                    "while_users": self.while_users, "quiet_s": self.quiet_s}


def slot(admission: Admission | None, kind: str) -> contextlib.AbstractContextManager[None]:
    """`admission.slot(kind)`, or nothing to hold when the caller has no admission control."""
    return admission.slot(kind) if admission is not None else contextlib.nullcontext()
