"""The operator console: imbalance dashboard, realign now, schedule editor, run history, adapters and rollback.

Mounted under /admin behind the admin login (app.web.auth); the same actions are exposed as a JSON API under
/api/admin (app.main) for the headless CLI. `Operator` holds the actions and the dashboard queries, Gradio-free.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from typing import TYPE_CHECKING, Any

import gradio as gr
import pandas as pd

from app.cli import stats
from app.loop.next_run import TooFewRatings, refusal
from app.loop.realign import NotCancellable, Realigner, RunInProgress
from app.loop.scheduler import NotLeader, RealignScheduler, new_ratings
from app.operator_settings import SETTINGS_FILE, OperatorSettings, SettingsStore, has_schedule

if TYPE_CHECKING:
    from feedback_store.mirror import DashboardCopy

EXAMPLE_COLUMNS = ["rated", "thumb", "prompt", "answer", "reason", "comment", "user", "rating id"]
EXAMPLES_SHOWN = 200  # rows of a run's examples the console shows; the label gives the full count
ROLE_NAMES = {"trained": "trained on", "heldout": "held out (the gate judged on them)",
              "dropped": "dropped by the aligner"}


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

    def __init__(self, store, registry, realigner: Realigner, scheduler: RealignScheduler, settings: SettingsStore,
                 dashboard: DashboardCopy | None = None):
        self.store, self.registry, self.realigner = store, registry, realigner
        self.scheduler, self.settings, self.dashboard = scheduler, settings, dashboard

    def counted(self) -> Any:
        """The store the dashboard's aggregates read: its DuckDB copy on PostgreSQL (feedback_store/mirror.py)."""
        return self.dashboard.store() if self.dashboard is not None else self.store

    # ---- dashboard
    def summary(self) -> dict[str, Any]:
        agg = self.counted()
        c = agg.counts()
        up, down = int(_get(c, "up")), int(_get(c, "down"))
        withdrawn = int(_get(c, "withdrawn"))
        s = self.settings.load()
        # what a run now would train on (next_run.py)
        nxt = self.realigner.next_run(s.max_examples, store=agg).as_dict()
        return {"up": up, "down": down, "withdrawn": withdrawn,
                "like_rate": up / (up + down) if up + down else None,
                "n_desirable": nxt["n_desirable"], "n_undesirable": nxt["n_undesirable"],
                "lambda_d": nxt["lambda_d"], "lambda_u": nxt["lambda_u"], "lambda_note": nxt["note"],
                "next": nxt, "new_since_last_run": new_ratings(agg),
                "unseen_by_served": self.unseen_by_served(nxt["served"], agg),
                "counted_at": self.dashboard.as_of() if self.dashboard is not None else None,
                "counted_every_s": self.dashboard.max_age_s if self.dashboard is not None else None,
                "served": self.registry.current(), "run": self.realigner.status.as_dict(),
                "schedule": dataclasses.asdict(s), "scheduled": has_schedule(s) and s.enabled,
                "next_run": self.scheduler.next_run_time(), "last_tick": self.scheduler.last_tick,
                "settings_error": self.settings.error, "shares": self.shares(nxt, store=agg),
                "last_run_checks": self.last_run_checks()}

    def unseen_by_served(self, served: str, store: Any = None) -> int | None:
        """Final ratings the served version has not trained on (all of them under the base model). Unlike "new
        since the last run", a run the gate refused does not reset it: its ratings are still to be learned."""
        try:
            n_d, n_u = (store or self.store).training_counts(since=None if served in (None, "base") else served,
                                                  max_user_share=None, max_addr_share=None)
        except Exception:  # a served version the store does not know: no honest number
            return None
        return n_d + n_u

    def shares(self, nxt: dict[str, Any], top: int = 5, store: Any = None) -> dict[str, Any]:
        """The next run's top contributors and what the share caps cut (app/cli/stats.py, shares)."""
        return stats.shares(store or self.store, nxt, top)

    def last_run_checks(self) -> dict[str, Any] | None:
        """The newest finished run's gate reason, per-rater check and caps (app/cli/stats.py)."""
        return stats.last_run_checks(self.store)

    def by_time(self, bucket: str = "hour") -> pd.DataFrame:
        """Up and down per bucket, as bar labels: a bar stays visible when all ratings share one bucket."""
        rows = records(self.counted().counts_by_time(bucket=bucket))
        fmt = "%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d"
        out = []
        for r in rows:
            t = pd.Timestamp(_get(r, "bucket", "time", "ts", "t", default=None)).strftime(fmt)
            out.append({"time": t, "rating": "👍 up", "n": int(_get(r, "up"))})
            out.append({"time": t, "rating": "👎 down", "n": int(_get(r, "down"))})
        return pd.DataFrame(out, columns=["time", "rating", "n"])

    def by_adapter(self) -> pd.DataFrame:
        out = []
        for r in records(self.counted().counts_by_adapter()):
            up, down = int(_get(r, "up")), int(_get(r, "down"))
            out.append({"adapter": str(_get(r, "adapter", "version", default="?")), "up": up, "down": down,
                        "like rate %": round(100 * up / (up + down), 1) if up + down else 0.0})
        return pd.DataFrame(out, columns=["adapter", "up", "down", "like rate %"])

    def by_user(self) -> pd.DataFrame:
        out = []
        for r in records(self.counted().counts_by_user()):
            up, down = int(_get(r, "up")), int(_get(r, "down"))
            out.append({"user": str(_get(r, "user_id", "user", default="?")), "up": up, "down": down,
                        "withdrawn": int(_get(r, "withdrawn")),
                        "like rate %": round(100 * up / (up + down), 1) if up + down else 0.0})
        return pd.DataFrame(out, columns=["user", "up", "down", "withdrawn", "like rate %"])

    def runs(self) -> pd.DataFrame:
        """One row per run, short columns (the reason is the one that needs the width; see RUNS_WIDTHS)."""
        rows = []
        for r in records(self.store.runs()):
            m = _decoded(r.get("metrics"))
            new = ((m.get("heldout") or {}).get("new") or {})
            rows.append({
                "run": str(r.get("id") or r.get("run_id") or "")[:8], "trigger": r.get("trigger"),
                "status": r.get("status"), "started": _short_time(r.get("started_at")),
                "n_D": r.get("n_desirable"), "n_U": r.get("n_undesirable"),
                "λ_D": _round(r.get("lambda_d")), "λ_U": _round(r.get("lambda_u")),
                "margin": _round(new.get("margin")), "right": _round(new.get("frac_correct_side")),
                "version": m.get("version") or r.get("adapter_version"),
                "why / error": r.get("error") or m.get("reason")})
        return pd.DataFrame(rows, columns=RUNS_COLUMNS)

    def share_table(self, shares: dict[str, Any]) -> pd.DataFrame:
        """The shares as one table: signed users, then client addresses."""
        out = []
        for kind, key, cap in (("user", "user_id", "user_cap"), ("address", "client_addr", "addr_cap")):
            for r in shares.get(f"top_{'users' if kind == 'user' else 'addrs'}") or []:
                out.append({"by": kind, "who": str(r.get(key)), "kept": r["kept"],
                            "share %": round(100 * r["share"], 1),
                            "cut by cap": (f"{r['dropped']} (≤ {shares.get(cap)} kept)" if r["dropped"] else "—")})
        return pd.DataFrame(out, columns=SHARE_COLUMNS)

    def down_reasons(self, adapter: str | None = None) -> pd.DataFrame:
        """Thumbs-down with their reason or comment (newest first), for one adapter version or all ("" / None)."""
        out = [{"rated": _json_safe(r["rated_at"]), "adapter": r["adapter"], "user": short_user(r["user_id"]),
                "reason": r["reason"] or "", "comment": r["comment"] or "", "answer": (r["answer"] or "")[:300],
                "answer id": r["answer_id"]}
               for r in self.store.down_reasons(adapter or None)]
        return pd.DataFrame(out, columns=["rated", "adapter", "user", "reason", "comment", "answer", "answer id"])

    def run_examples(self, run_id: str, role: str = "trained", limit: int = EXAMPLES_SHOWN,
                     offset: int = 0) -> dict[str, Any]:
        """One page of a run's examples in one role (trained, heldout, dropped), rater ids shortened: what the
        console's Runs tab and GET /api/admin/runs/{id}/examples show."""
        page = self.store.run_example_rows(run_id, role, limit=limit, offset=offset)
        page["examples"] = [{**{k: v for k, v in r.items() if k != "user_id"}, "user": short_user(r["user_id"]),
                             "label": "up" if r["label"] else "down"} for r in page["examples"]]
        return page

    def run_examples_table(self, run_id: str | None, role: str = "trained") -> tuple[pd.DataFrame, str]:
        """The console's examples table for a run and role, and a label that says how many of how many it shows."""
        if not run_id:
            return pd.DataFrame(columns=EXAMPLE_COLUMNS), "Pick a run to see the ratings it used"
        page = self.run_examples(run_id, role)
        rows = [{"rated": _json_safe(r["rated_at"]) or "", "thumb": "👍" if r["label"] == "up" else "👎",
                 "prompt": (r["prompt"] or "")[:300], "answer": (r["answer"] or "(deleted since)")[:300],
                 "reason": r["reason"] or "", "comment": r["comment"] or "", "user": r["user"] or "",
                 "rating id": r["rating_id"]} for r in page["examples"]]
        c = page["counts"]
        shown = f"the newest {len(rows)} of {page['total']}" if page["total"] > len(rows) else f"all {len(rows)}"
        label = (f"Run {run_id[:8]}: {ROLE_NAMES[role]}, {shown} (trained {c['trained']}, held out {c['heldout']}, "
                 f"dropped {c['dropped']})")
        return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS), label

    def run_choices(self) -> list[tuple[str, str]]:
        """(label, run id) of the newest finished runs that recorded a snapshot, for the console's run picker; a
        running one is left out: which of its ratings are held out or dropped is recorded when it finishes."""
        return [(f"{r['id'][:8]} · {r['status']} · {_short_time(r['started_at'])}", r["id"])
                for r in records(self.store.runs(100))
                if r.get("status") != "running" and (r.get("snapshot_at") or r.get("snapshot_sha256"))]

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
    def cannot_run(self, s: OperatorSettings) -> str | None:
        """Why a run started now would be refused for its data (app/loop/next_run.py, `refusal`), else None."""
        return refusal(self.realigner.next_run(s.max_examples), self.realigner.extra_args, s.min_new_ratings)

    def realign_now(self, trigger: str = "operator") -> str:
        """Start a run; TooFewRatings, before anything is recorded or trained, when it could not be judged."""
        s = self.settings.load()
        refused = self.scheduler.not_leader_reason()
        if refused:  # another app process runs realignment: say where, before judging this one's data
            raise NotLeader(refused)
        if not self.realigner.running:  # a run going is reported as RunInProgress by start_run
            why = self.cannot_run(s)
            if why:
                raise TooFewRatings(why)
        self.scheduler.start_run(trigger, max_examples=s.max_examples)
        st = self.realigner.status
        if not st.running and st.last.get("status") == "failed":
            return f"Run {st.run_id} failed at once: {st.last.get('reason')}"
        return f"Run {st.run_id} started." if st.run_id else "Realignment started."

    def run_outcome(self, run_id: str | None) -> str | None:
        """How run `run_id` ended, in a line for the console (None while it is still going or unknown)."""
        if not run_id:
            return None
        st = self.realigner.status
        last = st.last if st.last.get("run_id") == run_id else None
        if last is None:
            try:
                r = self.store.get_run(run_id)
            except Exception:
                return None
            if r.get("status") == "running":
                return None
            m = _decoded(r.get("metrics"))
            last = {"status": r.get("status"), "promoted": r.get("status") == "promoted",
                    "reason": r.get("error") or m.get("reason"), "version": r.get("adapter_version")}
        return outcome_line(run_id, last)

    def cancel_run(self) -> str:
        """Stop the run in progress (its aligner child); NotCancellable when there is none or it is promoting."""
        return self.realigner.cancel()

    def rollback(self, version: str | None = None) -> str:
        """Serve an earlier version; a store that cannot record it undoes the switch and raises (served.py)."""
        from app.loop.served import rollback

        before, after = rollback(self.store, self.registry, version or None, reason="operator")
        return f"Now serving {after} (was {before})."


RUNS_COLUMNS = ["run", "trigger", "status", "started", "n_D", "n_U", "λ_D", "λ_U", "margin", "right", "version",
                "why / error"]
# pixels per column: the short ones fit their header on one line, the reason takes the rest (visible at 1400 px)
EXAMPLE_WIDTHS = ["120px", "55px", "230px", "330px", "110px", "160px", "110px", "120px"]
RUNS_WIDTHS = ["95px", "95px", "95px", "120px", "55px", "55px", "60px", "60px", "75px", "65px", "85px", "330px"]
SHARE_COLUMNS = ["by", "who", "kept", "share %", "cut by cap"]
SHARES_LABEL = "Who supplies the next run's ratings (top signed users and client addresses)"
CSS = """
#kto-runs th, #kto-shares th, #kto-versions th { white-space: nowrap; }
#kto-runs th .header-content, #kto-runs th span { white-space: nowrap; word-break: normal; overflow-wrap: normal; }
#kto-runs td, #kto-runs td span { white-space: normal; overflow-wrap: anywhere; }
#kto-warning { border: 2px solid #d9413b; border-radius: 6px; padding: 4px 12px; background: #fdecea; }
"""


def short_user(user_id: str | None) -> str | None:
    """A rater id cut to its first 10 characters: enough to tell raters apart on one screen, not to copy one."""
    if user_id is None or len(user_id) <= 12:
        return user_id
    return user_id[:10] + "…"


def _short_time(v: Any) -> Any:
    """A run's start as month-day hour:minute: the year and seconds cost the runs table width."""
    return v.strftime("%m-%d %H:%M") if isinstance(v, dt.datetime) else _json_safe(v)


def _decoded(v: Any) -> dict[str, Any]:
    """A run's JSON column as a dict (the store decodes it; an older or odd row may hold text or nothing)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            return {}
    return v if isinstance(v, dict) else {}


def outcome_line(run_id: str, last: dict[str, Any]) -> str:
    """A finished run as the console says it: what happened and the gate's or the error's words."""
    why = last.get("reason") or ""
    status = last.get("status")
    if status == "promoted" or last.get("promoted"):
        return f"✅ Run {run_id} finished: promoted as **{last.get('version')}** — {why}"
    if status == "cancelled":
        return f"🛑 Run {run_id} was cancelled."
    if status == "failed":
        return f"❌ Run {run_id} failed: {why}"
    return f"⛔ Run {run_id} finished: not promoted — {why}"


def settings_warning(error: str | None) -> str:
    """The console's banner for an unusable operator settings file: what is wrong and the two ways out."""
    if not error:
        return ""
    return (f"⚠️ **Scheduled realignment is off: the operator settings could not be used.** {error}.  \n"
            f"To fix it, save the schedule in *Schedule & settings* (or run `kto-loop schedule --every MINUTES` "
            f"or `--cron EXPR`): that rewrites the file and keeps the bad one beside it as `{SETTINGS_FILE}.bad`. "
            f"Or correct the file by hand and restart the app.")


def schedule_state(s: OperatorSettings, next_run: str | None) -> str:
    """One line saying whether scheduled runs happen, matching the checkbox."""
    what = (f"cron `{s.cron}`" if s.cron.strip() else f"every {s.interval_minutes} minutes"
            if s.interval_minutes > 0 else None)
    if what is None:
        return ("Scheduling is **off**: no interval or cron expression is set. Set one, tick *Scheduling enabled* "
                "and save.")
    if not s.enabled:
        return f"Scheduling is **off** (paused; {what} is kept). Tick *Scheduling enabled* and save to resume."
    return (f"Scheduling is **on**: {what}, next check {next_run or 'not scheduled'}; a scheduled run starts after "
            f"{s.min_new_ratings} new ratings.")


def trust_markdown(s: dict[str, Any]) -> str:
    """The share caps on the next run and the last run's per-rater check, in plain words."""
    sh, lines = s["shares"], []
    caps = []
    for name, cap, what in (("max_user_share", "user_cap", "signed user"), ("max_addr_share", "addr_cap",
                                                                              "client address")):
        if sh.get(name) is None:
            caps.append(f"{name} off")
        else:
            limit = f", at most {sh[cap]} ratings per {what}" if sh.get(cap) is not None else ", nobody over it"
            caps.append(f"{name} {100 * sh[name]:g}%{limit}")
    cut = sh["n_dropped"]
    lines.append(f"**Share caps on the next run:** {'; '.join(caps)}. "
                 + (f"They cut **{cut}** of its {sh['n_candidates']} ratings." if cut else
                    f"They cut nothing from its {sh['n_candidates']} ratings."))
    lines += [f"_{why}._" for why in sh.get("inactive") or []]
    last = s.get("last_run_checks")
    if last is None:
        lines.append("**Last run's gate:** no run has finished yet.")
    else:
        rc = last.get("rater_check")
        if rc is None:
            rater = ("not applied (the held-out answers came from fewer than two raters, no rater held two or more "
                     "of them, or the run never reached the gate)")
        else:
            left = "not measurable" if rc.get("gain_without") is None else f"{rc['gain_without']:+.4f}"
            share = f"{rc['n']} of {rc['n_heldout']} held-out answers"
            rater = (f"passed — without the most influential rater `{rc['most_influential']}` ({share}) the gain "
                     f"is still {left}, above {rc['min_gain']:+.4f}" if rc.get("ok") else
                     f"**refused** — the gain rests on one rater: without `{rc['most_influential']}` ({share}) it "
                     f"is {left}, not above {rc['min_gain']:+.4f}")
        lines.append(f"**Last run ({str(last['run_id'])[:8]}, {last['status']}):** {last.get('reason') or ''}  \n"
                     f"Per-rater check: {rater}.")
        caps = last.get("caps") or {}
        if caps.get("n_dropped"):
            lines.append(f"Its snapshot's share caps cut {caps['n_dropped']} of {caps['n_candidates']} ratings.")
    return "  \n".join(lines)


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


def _clock(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%H:%M:%S")


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
    unseen = "—" if s["unseen_by_served"] is None else s["unseen_by_served"]
    return (
        f"| 👍 up | 👎 down | withdrawn | like rate | not yet learned | new since last run | serving |\n"
        f"|---|---|---|---|---|---|---|\n"
        f"| **{s['up']}** | **{s['down']}** | {s['withdrawn']} | {rate} | **{unseen}** | {s['new_since_last_run']} | "
        f"`{s['served']}` |\n\n"
        f"_Not yet learned_: ratings the served version has not trained on (a refused run leaves them there). "
        f"_New since last run_: what a scheduled run waits for (min new ratings).  \n"
        f"Next run would train on n_D = **{s['n_desirable']}**, n_U = **{s['n_undesirable']}**, {lam} "
        f"({_next_scope(s['next'])}).  \n"
        f"Realignment: {status}.  \nNext scheduled check: {nxt}."
        + (f"  \n_Counts as of {_clock(s['counted_at'])} UTC (a copy of the store, refreshed every "
           f"{s['counted_every_s']:g} s)._" if s.get("counted_at") is not None else "")
    )


def build_console(op: Operator, refresh_s: float = 3.0) -> gr.Blocks:
    """The console Blocks; mount it at "/admin" behind the admin login (with CSS)."""

    def refresh(watched: str | None = None):
        s = op.summary()
        runs, users, adapters = op.runs(), op.by_user(), op.adapters()
        outcome, per_adapter, shares = op.run_outcome(watched), op.by_adapter(), op.share_table(s["shares"])
        banner = settings_warning(s["settings_error"])
        return (gr.update(value=banner, visible=bool(banner)), summary_markdown(s), trust_markdown(s),
                gr.update(value=shares, label=SHARES_LABEL if len(shares) else f"{SHARES_LABEL}: none yet"),
                op.by_time(), per_adapter, per_adapter,
                gr.update(value=users, label="Per user" if len(users) else "Per user: no ratings yet"),
                gr.update(value=runs, label="Realignment runs (newest first)" if len(runs) else
                          "Realignment runs: no runs yet — Realign now starts one once there are enough ratings"),
                adapters, gr.update(choices=adapters["version"].tolist()),
                gr.update() if outcome is None else outcome)

    def realign():
        try:
            return "▶️ " + op.realign_now(), op.realigner.status.run_id
        except RunInProgress as e:
            return f"⏳ Not started: {e}.", gr.update()
        except TooFewRatings as e:
            return f"⚠️ Not started: {e}", None
        except Exception as e:
            return f"⚠️ Could not start: {e}", None

    def cancel():
        try:
            return "🛑 " + op.cancel_run()
        except NotCancellable as e:
            return f"⚠️ Not cancelled: {e}."

    def schedule_fields():
        s = op.settings.load()
        return (s.interval_minutes, s.cron, s.min_new_ratings, s.max_examples, s.enabled and has_schedule(s),
                schedule_state(s, op.scheduler.next_run_time()))

    def save_schedule(interval, cron, min_new, max_ex, enabled):
        try:
            s = op.scheduler.update(interval_minutes=int(interval or 0), cron=(cron or "").strip(),
                                    min_new_ratings=int(min_new or 0), max_examples=int(max_ex or 1),
                                    enabled=bool(enabled))
        except (ValueError, TypeError) as e:
            return f"⚠️ Not saved: {e}", gr.update()
        return (f"✅ Schedule saved; min new ratings {s.min_new_ratings}, max examples {s.max_examples}.",
                schedule_state(s, op.scheduler.next_run_time()))

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
        warning = gr.Markdown(elem_id="kto-warning", visible=False)
        gr.Markdown("## 🛠️ kto-loop operator console")
        summary = gr.Markdown(elem_id="kto-summary")
        watched = gr.State(None)  # the run this page started: its outcome replaces the "started" line
        with gr.Row():
            realign_btn = gr.Button("Realign now", variant="primary", elem_id="kto-realign", scale=1)
            cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="kto-cancel", scale=1)
            realign_msg = gr.Markdown(elem_id="kto-realign-msg")
        with gr.Tab("Dashboard"):
            trust = gr.Markdown(elem_id="kto-trust")
            share_table = gr.Dataframe(label=SHARES_LABEL, interactive=False, elem_id="kto-shares")
            with gr.Row():
                over_time = gr.BarPlot(x="time", y="n", color="rating", title="Thumbs over time (per hour)",
                                        color_map={"👍 up": "#2e9e44", "👎 down": "#d9413b"},
                                        height=260, elem_id="kto-plot-time")
                per_adapter = gr.BarPlot(x="adapter", y="like rate %", title="Like rate per adapter version",
                                         height=260, elem_id="kto-plot-adapter", y_lim=[0, 100])
            with gr.Row():
                adapter_table = gr.Dataframe(label="Per adapter version", interactive=False)
                user_table = gr.Dataframe(label="Per user", interactive=False, max_height=260, elem_id="kto-users")
        with gr.Tab("👎 reasons"):
            reasons_adapter = gr.Dropdown(label="Adapter version (empty = all)", choices=[""], value="",
                                          allow_custom_value=True, elem_id="kto-reasons-adapter")
            reasons_table = gr.Dataframe(label="Thumbs-down with a reason or comment (newest first)",
                                         interactive=False, wrap=True, elem_id="kto-reasons")
        with gr.Tab("Runs"):
            runs_table = gr.Dataframe(label="Realignment runs (newest first)", interactive=False,
                                      elem_id="kto-runs", wrap=True, column_widths=RUNS_WIDTHS)
            with gr.Row():
                ex_run = gr.Dropdown(label="A run's examples: run", choices=[], value=None, elem_id="kto-ex-run")
                ex_role = gr.Radio([(v.split(" (")[0], k) for k, v in ROLE_NAMES.items()], value="trained",
                                   label="Which", elem_id="kto-ex-role")
            ex_table = gr.Dataframe(label="Pick a run to see the ratings it used", interactive=False, wrap=True,
                                    elem_id="kto-examples", column_widths=EXAMPLE_WIDTHS)
        with gr.Tab("Adapters"):
            versions_table = gr.Dataframe(label="Adapter versions", interactive=False, elem_id="kto-versions")
            with gr.Row():
                rb_version = gr.Dropdown(label="Roll back to (empty = previous version)", choices=[],
                                         allow_custom_value=True)
                rb_btn = gr.Button("Roll back", variant="stop", elem_id="kto-rollback")
            rb_msg = gr.Markdown()
        with gr.Tab("Schedule & settings"):
            sched_state = gr.Markdown(schedule_state(s0, None), elem_id="kto-schedule-state")
            with gr.Row():
                interval = gr.Number(s0.interval_minutes, label="Every N minutes (0 = off)", precision=0)
                cron = gr.Textbox(s0.cron, label="or cron (e.g. 0 3 * * *)")
                min_new = gr.Number(s0.min_new_ratings, label="Min new ratings", precision=0)
                max_ex = gr.Number(s0.max_examples, label="Max examples per run", precision=0)
                enabled = gr.Checkbox(s0.enabled and has_schedule(s0), label="Scheduling enabled",
                                      elem_id="kto-enabled")
            save_btn = gr.Button("Save schedule", elem_id="kto-save-schedule")
            sched_msg = gr.Markdown(elem_id="kto-schedule-msg")
            prompt = gr.Textbox(s0.system_prompt, label="System prompt for chat", lines=3)
            prompt_btn = gr.Button("Save system prompt")
            prompt_msg = gr.Markdown()

        full = [warning, summary, trust, share_table, over_time, per_adapter, adapter_table, user_table, runs_table,
                versions_table, rb_version, realign_msg]
        demo.load(refresh, [watched], full)
        demo.load(schedule_fields, None, [interval, cron, min_new, max_ex, enabled, sched_state])

        def reasons(adapter):
            versions = [""] + [str(r.get("adapter")) for r in records(op.counted().counts_by_adapter())]
            table = op.down_reasons(adapter or None)
            label = ("Thumbs-down with a reason or comment (newest first)" if len(table) else
                     "Thumbs-down with a reason or comment: none yet")
            return gr.update(value=table, label=label), gr.update(choices=versions)

        demo.load(reasons, [reasons_adapter], [reasons_table, reasons_adapter])

        def examples(run_id, role):
            try:
                table, label = op.run_examples_table(run_id or None, role or "trained")
            except Exception as e:   # a run of another deployment, a store error: said, not a broken tab
                table, label = pd.DataFrame(columns=EXAMPLE_COLUMNS), f"⚠️ {e}"
            return gr.update(value=table, label=label)

        def run_picker(current):
            choices = op.run_choices()
            ids = [v for _, v in choices]
            return gr.update(choices=choices, value=current if current in ids else (ids[0] if ids else None))

        demo.load(run_picker, [ex_run], [ex_run]).then(examples, [ex_run, ex_role], [ex_table])
        ex_run.change(examples, [ex_run, ex_role], [ex_table])
        ex_role.change(examples, [ex_run, ex_role], [ex_table])
        gr.Timer(refresh_s * 5).tick(run_picker, [ex_run], [ex_run], concurrency_limit=None, show_progress="hidden")
        reasons_adapter.change(reasons, [reasons_adapter], [reasons_table, reasons_adapter])
        gr.Timer(refresh_s * 5).tick(reasons, [reasons_adapter], [reasons_table, reasons_adapter],
                                     concurrency_limit=None, show_progress="hidden")
        gr.Timer(refresh_s).tick(refresh, [watched], full, concurrency_limit=None, show_progress="hidden")
        realign_btn.click(realign, None, [realign_msg, watched]).then(lambda: refresh()[:-1], None, full[:-1])
        cancel_btn.click(cancel, None, realign_msg).then(lambda: refresh()[:-1], None, full[:-1])
        save_btn.click(save_schedule, [interval, cron, min_new, max_ex, enabled], [sched_msg, sched_state])
        prompt_btn.click(save_prompt, [prompt], prompt_msg)
        rb_btn.click(do_rollback, [rb_version], rb_msg).then(lambda: refresh()[:-1], None, full[:-1])
    return demo
