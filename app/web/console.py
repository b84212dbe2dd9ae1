"""The operator console: imbalance dashboard, realign now, schedule editor, run history, adapters and rollback.

Mounted under /admin behind the admin login (app.web.auth); the same actions are exposed as a JSON API under
/api/admin (app.main) for the headless CLI. `Operator` holds the actions and the dashboard queries, Gradio-free.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from typing import Any

import gradio as gr
import pandas as pd

from app.loop.realign import NotCancellable, Realigner, RunInProgress
from app.loop.scheduler import RealignScheduler, new_ratings
from app.operator_settings import SettingsStore


def records(x: Any) -> list[dict[str, Any]]:
    """Store query results (list of dicts/dataclasses/named tuples, DataFrame, dict of lists) as dicts."""
    if x is None:
        return []
    if isinstance(x, pd.DataFrame):
        return x.to_dict("records")
    if isinstance(x, dict):
        if x and all(isinstance(v, list) for v in x.values()):
            return pd.DataFrame(x).to_dict("records")
        return [x]
    out = []
    for r in x:
        if isinstance(r, dict):
            out.append(dict(r))
        elif dataclasses.is_dataclass(r):
            out.append(dataclasses.asdict(r))
        elif hasattr(r, "_asdict"):
            out.append(r._asdict())
        else:
            out.append(dict(vars(r)))
    return out


def _get(obj: Any, *names: str, default: Any = 0) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat(sep=" ", timespec="seconds") if isinstance(v, dt.datetime) else v.isoformat()
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)[:300]
    return v


class Operator:
    """Everything the console and the admin API do, in one place."""

    def __init__(self, store, registry, realigner: Realigner, scheduler: RealignScheduler, settings: SettingsStore):
        self.store, self.registry, self.realigner = store, registry, realigner
        self.scheduler, self.settings = scheduler, settings

    # ---- dashboard
    def summary(self) -> dict[str, Any]:
        c = self.store.counts()
        up, down = int(_get(c, "up")), int(_get(c, "down"))
        withdrawn = int(_get(c, "withdrawn"))
        s = self.settings.load()
        nxt = self.realigner.next_run(s.max_examples).as_dict()  # what a run now would train on (next_run.py)
        return {"up": up, "down": down, "withdrawn": withdrawn,
                "like_rate": up / (up + down) if up + down else None,
                "n_desirable": nxt["n_desirable"], "n_undesirable": nxt["n_undesirable"],
                "lambda_d": nxt["lambda_d"], "lambda_u": nxt["lambda_u"], "lambda_note": nxt["note"],
                "next": nxt, "new_since_last_run": new_ratings(self.store),
                "served": self.registry.current(), "run": self.realigner.status.as_dict(),
                "schedule": dataclasses.asdict(s), "next_run": self.scheduler.next_run_time(),
                "last_tick": self.scheduler.last_tick}

    def by_time(self, bucket: str = "hour") -> pd.DataFrame:
        """Up and down per bucket, as bar labels: a bar stays visible when all ratings share one bucket."""
        rows = records(self.store.counts_by_time(bucket=bucket))
        fmt = "%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d"
        out = []
        for r in rows:
            t = pd.Timestamp(_get(r, "bucket", "time", "ts", "t", default=None)).strftime(fmt)
            out.append({"time": t, "rating": "👍 up", "n": int(_get(r, "up"))})
            out.append({"time": t, "rating": "👎 down", "n": int(_get(r, "down"))})
        return pd.DataFrame(out, columns=["time", "rating", "n"])

    def by_adapter(self) -> pd.DataFrame:
        out = []
        for r in records(self.store.counts_by_adapter()):
            up, down = int(_get(r, "up")), int(_get(r, "down"))
            out.append({"adapter": str(_get(r, "adapter", "version", default="?")), "up": up, "down": down,
                        "like rate %": round(100 * up / (up + down), 1) if up + down else 0.0})
        return pd.DataFrame(out, columns=["adapter", "up", "down", "like rate %"])

    def by_user(self) -> pd.DataFrame:
        out = []
        for r in records(self.store.counts_by_user()):
            up, down = int(_get(r, "up")), int(_get(r, "down"))
            out.append({"user": str(_get(r, "user_id", "user", default="?")), "up": up, "down": down,
                        "withdrawn": int(_get(r, "withdrawn")),
                        "like rate %": round(100 * up / (up + down), 1) if up + down else 0.0})
        return pd.DataFrame(out, columns=["user", "up", "down", "withdrawn", "like rate %"])

    def runs(self) -> pd.DataFrame:
        rows = []
        for r in records(self.store.runs()):
            m = r.get("metrics")
            if isinstance(m, str):
                try:
                    m = json.loads(m)
                except ValueError:
                    m = {}
            m = m or {}
            new = ((m.get("heldout") or {}).get("new") or {})
            rows.append({
                "run": r.get("id") or r.get("run_id"), "trigger": r.get("trigger"), "status": r.get("status"),
                "started": _json_safe(r.get("started_at")), "finished": _json_safe(r.get("finished_at")),
                "n_D": r.get("n_desirable"), "n_U": r.get("n_undesirable"),
                "λ_D": _round(r.get("lambda_d")), "λ_U": _round(r.get("lambda_u")),
                "held-out margin": _round(new.get("margin")), "right side": _round(new.get("frac_correct_side")),
                "promoted": m.get("promoted"), "version": m.get("version") or r.get("adapter_version"),
                "why / error": r.get("error") or m.get("reason")})
        cols = ["run", "trigger", "status", "started", "finished", "n_D", "n_U", "λ_D", "λ_U", "held-out margin",
                "right side", "promoted", "version", "why / error"]
        return pd.DataFrame(rows, columns=cols)

    def down_reasons(self, adapter: str | None = None) -> pd.DataFrame:
        """Thumbs-down with their reason or comment (newest first), for one adapter version or all ("" / None)."""
        out = [{"rated": _json_safe(r["rated_at"]), "adapter": r["adapter"], "user": r["user_id"],
                "reason": r["reason"] or "", "comment": r["comment"] or "", "answer": (r["answer"] or "")[:300],
                "answer id": r["answer_id"]}
               for r in self.store.down_reasons(adapter or None)]
        return pd.DataFrame(out, columns=["rated", "adapter", "user", "reason", "comment", "answer", "answer id"])

    def adapters(self) -> pd.DataFrame:
        """Registered versions (the store) with what serves now (the registry)."""
        current = self.registry.current()
        out = [{"version": "base", "serving": current == "base", "run": "", "created": "", "promoted": "",
                "retired": "", "path": ""}]
        for r in records(self.store.adapters()):
            v = str(r.get("version"))
            out.append({"version": v, "serving": v == current, "run": r.get("run_id") or "",
                        "created": _json_safe(r.get("created_at")) or "",
                        "promoted": _json_safe(r.get("promoted_at")) or "",
                        "retired": _json_safe(r.get("retired_at")) or "", "path": r.get("path") or ""})
        return pd.DataFrame(out, columns=["version", "serving", "run", "created", "promoted", "retired", "path"])

    # ---- actions
    def realign_now(self, trigger: str = "operator") -> str:
        s = self.settings.load()
        self.scheduler.start_run(trigger, max_examples=s.max_examples)
        st = self.realigner.status
        if not st.running and st.last.get("status") == "failed":
            return f"Run {st.run_id} failed at once: {st.last.get('reason')}"
        return f"Run {st.run_id} started." if st.run_id else "Realignment started."

    def cancel_run(self) -> str:
        """Stop the run in progress (its aligner child); NotCancellable when there is none or it is promoting."""
        return self.realigner.cancel()

    def rollback(self, version: str | None = None) -> str:
        """Serve an earlier version; a store that cannot record it undoes the switch and raises (served.py)."""
        from app.loop.served import rollback

        before, after = rollback(self.store, self.registry, version or None, reason="operator")
        return f"Now serving {after} (was {before})."


def _round(v: Any, nd: int = 3) -> Any:
    return round(v, nd) if isinstance(v, int | float) and math.isfinite(v) else v


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _next_scope(n: dict[str, Any]) -> str:
    """Where the next run's numbers come from: its snapshot and what the aligner holds out of it."""
    scope = f"continuing `{n['served']}` on the ratings since it" if n["resume"] else "a new adapter on all ratings"
    return (f"{scope}, newest {n['max_examples']} at most: {n['snapshot_desirable']} 👍 / "
            f"{n['snapshot_undesirable']} 👎, of which {n['heldout_desirable']} 👍 / {n['heldout_undesirable']} 👎 "
            f"held out to judge it")


def summary_markdown(s: dict[str, Any]) -> str:
    rate = "—" if s["like_rate"] is None else f"{100 * s['like_rate']:.1f}%"
    lam = (f"λ_D = **{_fmt(s['lambda_d'], '.3f')}**, λ_U = **{_fmt(s['lambda_u'], '.3f')}**"
           if s["lambda_d"] is not None else f"λ: _{s['lambda_note']}_")
    run = s["run"]
    if run["running"]:
        prog = f"{run['step']}/{run['total']}" if run["total"] else "starting"
        loss = f", loss {run['loss']:.4f}" if isinstance(run.get("loss"), float) else ""
        status = f"🔄 **run {run['run_id']} ({run['trigger']}) — {run['phase']} {prog}{loss}**"
    elif run.get("last"):
        last = run["last"]
        verdict = f"promoted as **{last['version']}**" if last.get("promoted") else "not promoted"
        status = f"last run {last['run_id']}: **{last['status']}**, {verdict} — {last.get('reason') or ''}"
    else:
        status = "no run since the app started"
    nxt = s["next_run"] or "not scheduled"
    return (
        f"| 👍 up | 👎 down | withdrawn | like rate | new since last run | serving |\n"
        f"|---|---|---|---|---|---|\n"
        f"| **{s['up']}** | **{s['down']}** | {s['withdrawn']} | {rate} | **{s['new_since_last_run']}** | "
        f"`{s['served']}` |\n\n"
        f"Next run would train on n_D = **{s['n_desirable']}**, n_U = **{s['n_undesirable']}**, {lam} "
        f"({_next_scope(s['next'])}).  \n"
        f"Realignment: {status}.  \nNext scheduled check: {nxt}."
    )


def build_console(op: Operator, refresh_s: float = 3.0) -> gr.Blocks:
    """The console Blocks; mount it at "/admin" behind the admin login."""

    def refresh():
        s = op.summary()
        return (summary_markdown(s), op.by_time(), op.by_adapter(), op.by_user(), op.runs(), op.adapters(),
                gr.update(choices=[v for v in op.adapters()["version"].tolist()]))

    def realign():
        try:
            return "✅ " + op.realign_now()
        except RunInProgress as e:
            return f"⏳ Not started: {e}."
        except Exception as e:
            return f"⚠️ Could not start: {e}"

    def cancel():
        try:
            return "🛑 " + op.cancel_run()
        except NotCancellable as e:
            return f"⚠️ Not cancelled: {e}."

    def save_schedule(interval, cron, min_new, max_ex, enabled):
        try:
            s = op.scheduler.update(interval_minutes=int(interval or 0), cron=(cron or "").strip(),
                                    min_new_ratings=int(min_new or 0), max_examples=int(max_ex or 1),
                                    enabled=bool(enabled))
        except (ValueError, TypeError) as e:
            return f"⚠️ {e}"
        return f"✅ Schedule saved (next check: {op.scheduler.next_run_time() or 'not scheduled'}); " \
               f"min new ratings {s.min_new_ratings}, max examples {s.max_examples}."

    def save_prompt(text):
        text = (text or "").strip()
        if len(text) > 4000:
            return "⚠️ The system prompt is limited to 4000 characters."
        op.settings.update(system_prompt=text)
        return "✅ System prompt saved; it applies to new answers."

    def do_rollback(version):
        try:
            return "✅ " + op.rollback(version or None)
        except Exception as e:
            return f"⚠️ Rollback refused: {e}"

    s0 = op.settings.load()
    with gr.Blocks(title="kto-loop console") as demo:
        gr.Markdown("## 🛠️ kto-loop operator console")
        summary = gr.Markdown(elem_id="kto-summary")
        with gr.Row():
            realign_btn = gr.Button("Realign now", variant="primary", elem_id="kto-realign", scale=1)
            cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="kto-cancel", scale=1)
            realign_msg = gr.Markdown(elem_id="kto-realign-msg")
        with gr.Tab("Dashboard"):
            with gr.Row():
                over_time = gr.BarPlot(x="time", y="n", color="rating", title="Thumbs over time (per hour)",
                                        color_map={"👍 up": "#2e9e44", "👎 down": "#d9413b"},
                                        height=260, elem_id="kto-plot-time")
                per_adapter = gr.BarPlot(x="adapter", y="like rate %", title="Like rate per adapter version",
                                         height=260, elem_id="kto-plot-adapter", y_lim=[0, 100])
            with gr.Row():
                adapter_table = gr.Dataframe(label="Per adapter version", interactive=False)
                user_table = gr.Dataframe(label="Per user", interactive=False, max_height=260)
        with gr.Tab("👎 reasons"):
            reasons_adapter = gr.Dropdown(label="Adapter version (empty = all)", choices=[""], value="",
                                          allow_custom_value=True, elem_id="kto-reasons-adapter")
            reasons_table = gr.Dataframe(label="Thumbs-down with a reason or comment (newest first)",
                                         interactive=False, wrap=True, elem_id="kto-reasons")
        with gr.Tab("Runs"):
            runs_table = gr.Dataframe(label="Realignment runs (newest first)", interactive=False,
                                      elem_id="kto-runs", wrap=True)
        with gr.Tab("Adapters"):
            versions_table = gr.Dataframe(label="Adapter versions", interactive=False, elem_id="kto-versions")
            with gr.Row():
                rb_version = gr.Dropdown(label="Roll back to (empty = previous version)", choices=[],
                                         allow_custom_value=True)
                rb_btn = gr.Button("Roll back", variant="stop", elem_id="kto-rollback")
            rb_msg = gr.Markdown()
        with gr.Tab("Schedule & settings"):
            with gr.Row():
                interval = gr.Number(s0.interval_minutes, label="Every N minutes (0 = off)", precision=0)
                cron = gr.Textbox(s0.cron, label="or cron (e.g. 0 3 * * *)")
                min_new = gr.Number(s0.min_new_ratings, label="Min new ratings", precision=0)
                max_ex = gr.Number(s0.max_examples, label="Max examples per run", precision=0)
                enabled = gr.Checkbox(s0.enabled, label="Scheduling enabled")
            save_btn = gr.Button("Save schedule", elem_id="kto-save-schedule")
            sched_msg = gr.Markdown()
            prompt = gr.Textbox(s0.system_prompt, label="System prompt for chat", lines=3)
            prompt_btn = gr.Button("Save system prompt")
            prompt_msg = gr.Markdown()

        def refresh_with_adapter_table():
            md, t, a, u, r, v, dd = refresh()
            return md, t, a, a, u, r, v, dd

        full = [summary, over_time, per_adapter, adapter_table, user_table, runs_table, versions_table, rb_version]
        demo.load(refresh_with_adapter_table, None, full)

        def reasons(adapter):
            versions = [""] + [str(r.get("adapter")) for r in records(op.store.counts_by_adapter())]
            return op.down_reasons(adapter or None), gr.update(choices=versions)

        demo.load(reasons, [reasons_adapter], [reasons_table, reasons_adapter])
        reasons_adapter.change(reasons, [reasons_adapter], [reasons_table, reasons_adapter])
        gr.Timer(refresh_s * 5).tick(reasons, [reasons_adapter], [reasons_table, reasons_adapter],
                                     concurrency_limit=None, show_progress="hidden")
        gr.Timer(refresh_s).tick(refresh_with_adapter_table, None, full, concurrency_limit=None,
                                 show_progress="hidden")
        realign_btn.click(realign, None, realign_msg).then(refresh_with_adapter_table, None, full)
        cancel_btn.click(cancel, None, realign_msg).then(refresh_with_adapter_table, None, full)
        save_btn.click(save_schedule, [interval, cron, min_new, max_ex, enabled], sched_msg)
        prompt_btn.click(save_prompt, [prompt], prompt_msg)
        rb_btn.click(do_rollback, [rb_version], rb_msg).then(refresh_with_adapter_table, None, full)
    return demo
