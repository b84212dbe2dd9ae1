"""Forgetting: one user's conversations, answers and ratings deleted on request, and conversations past the retention
period deleted daily. What stays is an audit row of counts, without the user id, and the runs whose adapters
learnt from what was deleted, so the operator can decide whether to retrain."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from feedback_store.core import _check_str, _naive_utc, _new_id
from feedback_store.errors import InvalidInput
from feedback_store.runs import Runs

REASONS = ("forget", "retention")
_IN = "IN (SELECT unnest(?::VARCHAR[]))"
# the id forms the app stores (app/web/auth.py, app/web/openai_api.py), kept as the audit's only trace of the id
_KINDS = (("anon-", "anon"), ("user:", "user"), ("key:", "key"))


def id_kind(user_id: str) -> str:
    """What kind of rater an id names (anon, user, key, other): the audit keeps this, never the id itself."""
    return next((kind for prefix, kind in _KINDS if user_id.startswith(prefix)), "other")


@dataclass(frozen=True)
class ForgetReport:
    """What one forget or retention pass deleted (or, dry_run, would delete), and the runs that learnt from it."""

    reason: str
    conversations: int
    messages: int
    answers: int
    ratings: int
    by_value: dict[str, int]           # up, down, withdrawn among the deleted ratings
    rating_events: int
    runs: list[dict] = field(default_factory=list)   # see Forgetting._affected_runs
    dry_run: bool = False
    at: datetime | None = None
    cutoff: datetime | None = None     # retention: last activity before this was deleted

    @property
    def deleted_anything(self) -> bool:
        return bool(self.conversations or self.ratings)

    def as_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "conversations": self.conversations, "messages": self.messages,
                "answers": self.answers, "ratings": self.ratings, "by_value": dict(self.by_value),
                "rating_events": self.rating_events, "runs": self.runs, "dry_run": self.dry_run,
                "at": self.at.isoformat() if self.at else None,
                "cutoff": self.cutoff.isoformat() if self.cutoff else None}


class Forgetting(Runs):
    """forget_user / expire_before, and the audit log of both (forget_log)."""

    def forget_user(self, user_id: str, *, dry_run: bool = False) -> ForgetReport:
        """Delete the user's conversations (messages, answers, and every rating of those answers) and every rating
        the user gave elsewhere, with their audit trails, in one transaction; runs' lineage keeps the rating ids
        (opaque, they now resolve to nothing). An audit row keeps the counts and the id's kind only: a hash of a
        guessable id (user:NAME) would be the id again to anyone holding the salt."""
        _check_str("user_id", user_id)
        with self._tx("forget") as c:
            convs = [r[0] for r in c.execute("SELECT id FROM conversations WHERE deployment = ? AND user_id = ?",
                                             [self.deployment, user_id]).fetchall()]
            return self._erase(c, "forget", convs, user_id, None, dry_run, id_kind(user_id))

    def expire_before(self, cutoff: datetime, *, dry_run: bool = False) -> ForgetReport:
        """Retention: delete every conversation whose last activity (its creation, a message, an answer, or a
        rating of one of its answers being set or changed) is older than `cutoff`, with all its ratings."""
        if not isinstance(cutoff, datetime):
            raise InvalidInput(f"cutoff must be a datetime, got {cutoff!r}")
        cutoff = _naive_utc(cutoff)
        with self._tx("forget") as c:
            convs = [r[0] for r in c.execute(
                """SELECT c.id FROM conversations c WHERE c.deployment = ? AND c.created_at < ?
                AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND m.created_at >= ?)
                AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.conversation_id = c.id AND a.created_at >= ?)
                AND NOT EXISTS (SELECT 1 FROM answers a JOIN ratings r ON r.answer_id = a.id
                                WHERE a.conversation_id = c.id AND r.updated_at >= ?)""",
                [self.deployment, cutoff, cutoff, cutoff, cutoff]).fetchall()]
            return self._erase(c, "retention", convs, None, cutoff, dry_run, None)

    def forget_log(self, limit: int = 100) -> list[dict]:
        """The audit of past forget and retention passes, newest first (counts only; no user ids)."""
        rows = self._read_dicts("SELECT * FROM forgotten WHERE deployment = ? ORDER BY forgotten_at DESC LIMIT ?",
                                [self.deployment, int(limit)])
        for r in rows:
            r["runs"] = json.loads(r["runs"]) if r["runs"] else []
        return rows

    def _erase(self, c: Any, reason: str, convs: list[str], user_id: str | None, cutoff: datetime | None,
               dry_run: bool, kind: str | None) -> ForgetReport:
        """Inside the caller's transaction: find, count and (unless dry_run) delete; then the audit row."""
        answers = [r[0] for r in c.execute(f"SELECT id FROM answers WHERE conversation_id {_IN}",
                                           [convs]).fetchall()] if convs else []
        where, params = f"answer_id {_IN}", [answers]
        if user_id is not None:
            where, params = f"({where} OR user_id = ?)", [answers, user_id]
        ratings = c.execute(f"SELECT id, value FROM ratings WHERE deployment = ? AND {where}",
                            [self.deployment, *params]).fetchall()
        rating_ids = [r[0] for r in ratings]
        by_value = {"up": sum(v == "up" for _, v in ratings), "down": sum(v == "down" for _, v in ratings),
                    "withdrawn": sum(v is None for _, v in ratings)}
        n_messages = c.execute(f"SELECT count(*) FROM messages WHERE conversation_id {_IN}",
                               [convs]).fetchone()[0] if convs else 0
        n_events = c.execute(f"SELECT count(*) FROM rating_events WHERE rating_id {_IN}",
                             [rating_ids]).fetchone()[0] if rating_ids else 0
        runs = self._affected_runs(c, rating_ids)
        report = ForgetReport(reason, len(convs), int(n_messages), len(answers), len(ratings), by_value,
                              int(n_events), runs, dry_run, None, cutoff)
        if user_id is not None and not dry_run:   # the id as a rate-limit key (limits.py): short-lived, still theirs
            c.execute("DELETE FROM rate_buckets WHERE deployment = ? AND bucket_key = ?", [self.deployment, user_id])
        if dry_run or not report.deleted_anything:
            return report
        if rating_ids:
            c.execute(f"DELETE FROM rating_events WHERE rating_id {_IN}", [rating_ids])
            c.execute(f"DELETE FROM ratings WHERE deployment = ? AND id {_IN}", [self.deployment, rating_ids])
        if convs:
            c.execute(f"DELETE FROM messages WHERE conversation_id {_IN}", [convs])
            c.execute(f"DELETE FROM answers WHERE conversation_id {_IN}", [convs])
            c.execute(f"DELETE FROM conversations WHERE id {_IN}", [convs])
        now = self._now()
        c.execute("""INSERT INTO forgotten (id, deployment, reason, id_kind, cutoff, conversations, messages, answers,
            ratings, ratings_up, ratings_down, ratings_withdrawn, rating_events, runs, forgotten_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                  [_new_id(), self.deployment, reason, kind, cutoff, report.conversations, report.messages,
                   report.answers, report.ratings, by_value["up"], by_value["down"], by_value["withdrawn"],
                   report.rating_events, json.dumps(runs), now])
        # the answer cache (ratings.py) must forget them, or it would let a rating of a deleted answer through (a
        # cached rating row that is gone needs nothing: its UPDATE matches no row, and the batch is read again)
        for a in answers:
            self._answers.pop(a, None)
        return replace(report, at=now)

    def _affected_runs(self, c: Any, rating_ids: list[str]) -> list[dict]:
        """Runs whose snapshot held any of these ratings, oldest first: how many of them each trained on, held out
        and dropped, the adapter it made, whether that adapter serves now; then adapters continued from an affected
        one (`via`: the parent that carries the deleted ratings' influence), since continue mode inherits it."""
        if not rating_ids:
            return []
        rows = c.execute(f"""SELECT e.run_id, r.adapter_version, r.status,
                count(*) FILTER (WHERE NOT coalesce(e.dropped, false) AND NOT coalesce(e.heldout, false)),
                count(*) FILTER (WHERE coalesce(e.heldout, false) AND NOT coalesce(e.dropped, false)),
                count(*) FILTER (WHERE coalesce(e.dropped, false))
            FROM run_examples e JOIN runs r ON r.id = e.run_id
            WHERE r.deployment = ? AND e.rating_id {_IN}
            GROUP BY e.run_id, r.adapter_version, r.status, r.started_at ORDER BY r.started_at""",
                         [self.deployment, rating_ids]).fetchall()
        served = self._current(c)
        out = [{"run_id": run_id, "version": version, "status": status, "trained": int(t), "heldout": int(h),
                "dropped": int(d), "via": None, "served": version is not None and version == served}
               for run_id, version, status, t, h, d in rows]
        tainted = {r["version"]: r["version"] for r in out if r["version"] and r["trained"]}
        adapters = c.execute("SELECT version, parent, run_id FROM adapters WHERE deployment = ? ORDER BY created_at",
                             [self.deployment]).fetchall()
        changed = True
        while changed:         # a chain of continued adapters, whatever order they were registered in
            changed = False
            for version, parent, run_id in adapters:
                if parent in tainted and version not in tainted:
                    tainted[version] = parent
                    changed = True
                    out.append({"run_id": run_id, "version": version, "status": None, "trained": 0, "heldout": 0,
                                "dropped": 0, "via": parent, "served": version == served})
        return out
