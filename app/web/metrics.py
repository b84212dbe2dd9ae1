"""Prometheus `/metrics`, behind the operator's basic auth (scrape with `basic_auth` in the scrape config).

Every figure is read at scrape time from where it is kept, the store, the adapter registry and the vLLM server,
so nothing on the chat path has to count and a restart loses nothing: chats by channel, current ratings by value,
the like rate per served version, runs by outcome with their durations, the last swap's load and warm-up time
per version, and whether vLLM answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from app.web.auth import check_basic

log = logging.getLogger("kto_loop.metrics")
RUNS_READ = 1000          # the newest runs summarised per scrape


def run_summary(runs: list[dict]) -> dict[str, tuple[int, float]]:
    """Per outcome: (runs, seconds they took in total), for runs that finished."""
    out: dict[str, tuple[int, float]] = {}
    for r in runs:
        start, end = r.get("started_at"), r.get("finished_at")
        if start is None or end is None:
            continue
        n, total = out.get(r["status"], (0, 0.0))
        out[r["status"]] = (n + 1, total + max(0.0, (end - start).total_seconds()))
    return out


class StackCollector:
    """A prometheus_client collector over a Stack (store, registry, server)."""

    def __init__(self, st: Any):
        self.st = st

    def describe(self) -> list[Metric]:
        return []            # figures come from the store at scrape time: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        store, registry = self.st.store, self.st.registry
        chats = CounterMetricFamily("kto_loop_chats", "answers stored, by where the chat came from",
                                    labels=["channel"])
        for channel, n in store.answer_counts().items():
            chats.add_metric([channel], n)
        yield chats
        dashboard = getattr(self.st, "dashboard", None)   # on PostgreSQL: the console's copy (feedback_store/mirror)
        counted = dashboard.store() if dashboard is not None else store
        ratings = GaugeMetricFamily("kto_loop_ratings", "current ratings by value (withdrawn: taken back)",
                                    labels=["value"])
        for value, n in counted.counts().items():
            if value != "total":
                ratings.add_metric([value], n)
        yield ratings
        like = GaugeMetricFamily("kto_loop_like_rate", "thumbs-up share of the up/down ratings of each version's "
                                 "answers", labels=["version"])
        for a in counted.counts_by_adapter():
            if a["approval"] is not None:
                like.add_metric([a["adapter"]], a["approval"])
        yield like
        served = GaugeMetricFamily("kto_loop_served", "1 for the version served now", labels=["version"])
        served.add_metric([registry.current()], 1)
        yield served
        runs = SummaryMetricFamily("kto_loop_run_duration_seconds", "realignment runs that finished, by outcome",
                                   labels=["status"])
        for status, (n, total) in sorted(run_summary(store.runs(limit=RUNS_READ)).items()):
            runs.add_metric([status], n, total)
        yield runs
        swap = GaugeMetricFamily("kto_loop_swap_seconds", "time to load a version into vLLM and warm it up, as "
                                 "measured when it was promoted", labels=["version", "phase"])
        for v in getattr(registry, "versions", lambda: [])():
            for phase in ("load", "warm"):
                if isinstance(v.get(f"{phase}_s"), int | float):
                    swap.add_metric([v["name"], phase], v[f"{phase}_s"])
        yield swap
        up = GaugeMetricFamily("kto_loop_vllm_up", "1 when the vLLM server answers its health check")
        try:
            ok = bool(self.st.server.is_healthy(timeout=2.0))
        except Exception:
            ok = False
        up.add_metric([], 1.0 if ok else 0.0)
        yield up


def metrics_router(st: Any, admin_user: str, admin_password: str) -> APIRouter:
    """GET /metrics in Prometheus' text format, for the operator's credentials only (it tells who uses what)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StackCollector(st))
    router = APIRouter()

    @router.get("/metrics")
    def metrics(request: Request) -> Response:
        if not check_basic(request.headers.get("authorization"), admin_user, admin_password):
            return PlainTextResponse("operator login required", status_code=401,
                                     headers={"WWW-Authenticate": 'Basic realm="kto-loop metrics"'})
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
