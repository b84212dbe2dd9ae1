"""Alignment runs, adapter versions and their promotions/rollbacks, and lineage: which ratings trained the adapter
that produced an answer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import duckdb

from feedback_store.conversations import Conversations
from feedback_store.core import BASE, _check_str, _new_id
from feedback_store.errors import DuplicateAdapter, InvalidInput, UnknownAdapter, UnknownRun, WrongDeployment

TRIGGERS = ("schedule", "operator", "simulator", "cli")
RUN_STATUSES = ("running", "succeeded", "promoted", "rejected", "failed", "cancelled")
EXAMPLE_ROLES = ("trained", "heldout", "dropped")  # what the aligner did with a snapshot rating


class Runs(Conversations):
    """The run log, the adapter registry and the promotion/rollback history (lineage reads answers)."""

    def last_run(self, include_failed: bool = False) -> dict | None:
        """The latest finished run. Failed/cancelled runs trained nothing and a running one has not finished,
        so they are skipped unless include_failed (then: the latest run of any status)."""
        where = "" if include_failed else "AND status IN ('succeeded', 'promoted', 'rejected')"
        rows = self._read_dicts(f"SELECT * FROM runs WHERE deployment = ? {where} ORDER BY started_at DESC "
                                "LIMIT 1", [self.deployment])
        return self._decode_run(rows[0]) if rows else None

    def _last_cutoff(self) -> datetime | None:
        run = self.last_run()
        return None if run is None else (run["snapshot_at"] or run["started_at"])

    def start_run(self, trigger: str, params: dict | None = None) -> str:
        if trigger not in TRIGGERS:
            raise InvalidInput(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
        run_id = _new_id()
        with self._tx() as c:
            self._dialect.hold_run(c, run_id)    # PostgreSQL: other processes starting up see it is alive
            c.execute("INSERT INTO runs (id, deployment, trigger, status, started_at, params) "
                      "VALUES (?, ?, ?, 'running', ?, ?)",
                      [run_id, self.deployment, trigger, self._now(), json.dumps(params or {}, default=str)])
        return run_id

    def finish_run(self, run_id: str, status: str, *, n_desirable: int | None = None,
                   n_undesirable: int | None = None, lambda_d: float | None = None, lambda_u: float | None = None,
                   metrics: dict | None = None, error: str | None = None, adapter_version: str | None = None,
                   dropped: Iterable[str] = (), heldout: Iterable[str] = ()) -> None:
        """Close a run. `dropped`: example ids the aligner skipped; `heldout`: those it judged the new adapter on;
        lineage lists only the ratings it trained on."""
        if status not in RUN_STATUSES or status == "running":
            raise InvalidInput(f"status must be one of {RUN_STATUSES[1:]}, got {status!r}")
        self.get_run(run_id)
        with self._tx() as c:
            c.execute("""UPDATE runs SET status = ?, finished_at = ?, n_desirable = coalesce(?, n_desirable),
                n_undesirable = coalesce(?, n_undesirable), lambda_d = ?, lambda_u = ?, metrics = ?, error = ?,
                adapter_version = coalesce(?, adapter_version) WHERE id = ?""",
                      [status, self._now(), n_desirable, n_undesirable, lambda_d, lambda_u,
                       json.dumps(metrics or {}, default=str), error, adapter_version, run_id])
            self._dialect.release_run(c, run_id)
            dropped = list(dropped)
            if dropped:
                c.execute("UPDATE run_examples SET dropped = true WHERE run_id = ? AND list_contains(?, rating_id)",
                          [run_id, dropped])
            heldout = list(heldout)
            if heldout:
                c.execute("UPDATE run_examples SET heldout = true WHERE run_id = ? AND list_contains(?, rating_id)",
                          [run_id, heldout])

    @staticmethod
    def _decode_run(r: dict) -> dict:
        r["params"] = json.loads(r["params"]) if r["params"] else {}
        r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
        r["snapshot_caps"] = json.loads(r["snapshot_caps"]) if r.get("snapshot_caps") else None
        return r

    def get_run(self, run_id: str) -> dict:
        rows = self._read_dicts("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise UnknownRun(f"unknown run {run_id!r}")
        if rows[0]["deployment"] != self.deployment:
            raise WrongDeployment(f"run {run_id!r} belongs to deployment {rows[0]['deployment']!r}")
        return self._decode_run(rows[0])

    def runs(self, limit: int = 50) -> list[dict]:
        """Newest first."""
        return [self._decode_run(r) for r in self._read_dicts(
            "SELECT * FROM runs WHERE deployment = ? ORDER BY started_at DESC LIMIT ?", [self.deployment, limit])]

    def run_examples(self, run_id: str, include_dropped: bool = False) -> list[str]:
        """The rating ids the run trained on; include_dropped: every rating of its snapshot (held out and dropped
        ones too)."""
        where = "" if include_dropped else "AND NOT dropped AND NOT coalesce(heldout, false)"
        return [r[0] for r in self._read(
            f"SELECT rating_id FROM run_examples WHERE run_id = ? {where} ORDER BY rating_id", [run_id])]

    def run_example_roles(self, run_id: str) -> dict[str, list[str]]:
        """The run's snapshot ratings by what the aligner did with them: trained, heldout (judged on), dropped."""
        out: dict[str, list[str]] = {"trained": [], "heldout": [], "dropped": []}
        for rating_id, dropped, heldout in self._read(
                "SELECT rating_id, dropped, coalesce(heldout, false) FROM run_examples WHERE run_id = ? "
                "ORDER BY rating_id", [run_id]):
            out["dropped" if dropped else "heldout" if heldout else "trained"].append(rating_id)
        return out

    def run_example_rows(self, run_id: str, role: str = "trained", limit: int = 200, offset: int = 0) -> dict:
        """One page of a run's snapshot ratings in one role, with what they judged (the console's "a run's
        examples"): per rating its prompt, answer, the label the run saw, the reason and comment now, the rater.
        A rating deleted since (forget, retention) keeps its row with empty fields. Also the count of each role."""
        if role not in EXAMPLE_ROLES:
            raise InvalidInput(f"role must be one of {EXAMPLE_ROLES}, got {role!r}")
        for name, v, lo, hi in (("limit", limit, 1, 10_000), ("offset", offset, 0, 2**31 - 1)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InvalidInput(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
        self.get_run(run_id)  # UnknownRun / WrongDeployment
        kind = ("CASE WHEN coalesce(e.dropped, false) THEN 'dropped' WHEN coalesce(e.heldout, false) THEN 'heldout' "
                "ELSE 'trained' END")
        counts = dict.fromkeys(EXAMPLE_ROLES, 0)
        for k, n in self._read(f"SELECT {kind}, count(*) FROM run_examples e WHERE e.run_id = ? GROUP BY 1", [run_id]):
            counts[k] = int(n)
        rows = self._read_dicts(f"""SELECT e.rating_id, e.label, r.answer_id, r.user_id, r.value AS value_now,
            r.reason, r.comment, r.updated_at AS rated_at, a.text AS answer, m.content AS prompt, a.adapter
            FROM run_examples e LEFT JOIN ratings r ON r.id = e.rating_id
            LEFT JOIN answers a ON a.id = r.answer_id LEFT JOIN messages m ON m.id = a.parent_id
            WHERE e.run_id = ? AND {kind} = ? ORDER BY r.updated_at DESC NULLS LAST, e.rating_id
            LIMIT ? OFFSET ?""", [run_id, role, limit, offset])
        return {"run_id": run_id, "role": role, "counts": counts, "total": counts[role], "limit": limit,
                "offset": offset, "examples": rows}

    # ---------------------------------------------------------------- adapters and lineage
    def register_adapter(self, version: str, path: str | Path, sha256: str | None = None,
                         parent: str | None = None, run_id: str | None = None) -> None:
        _check_str("version", version)
        if version == BASE:
            raise InvalidInput(f"{BASE!r} is the base model, not an adapter version")
        if run_id is not None:
            self.get_run(run_id)
        with self._tx(f"adapter:{version}") as c:
            if c.execute("SELECT count(*) FROM adapters WHERE deployment = ? AND version = ?",
                         [self.deployment, version]).fetchone()[0]:
                raise DuplicateAdapter(f"adapter version {version!r} is already registered")
            c.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                      [self.deployment, version, str(path), sha256, parent, run_id, self._now()])
            if run_id is not None:
                c.execute("UPDATE runs SET adapter_version = ? WHERE id = ?", [version, run_id])

    def _check_adapter(self, c: duckdb.DuckDBPyConnection, version: str) -> None:
        if version != BASE and not c.execute("SELECT count(*) FROM adapters WHERE deployment = ? AND version = ?",
                                             [self.deployment, version]).fetchone()[0]:
            raise UnknownAdapter(f"unknown adapter version {version!r}")

    def _event(self, c: duckdb.DuckDBPyConnection, event: str, from_v: str | None, to_v: str,
               reason: str | None, now: datetime) -> None:
        c.execute("INSERT INTO adapter_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                  [_new_id(), self.deployment, event, from_v, to_v, reason, now])

    def mark_promoted(self, version: str, reason: str | None = None) -> None:
        """`version` now serves chats; the version it replaces is retired (kept on disk for rollback)."""
        with self._tx("serving") as c:
            self._check_adapter(c, version)
            now, prev = self._now(), self._current(c)
            c.execute("UPDATE adapters SET retired_at = ? WHERE deployment = ? AND version = ?",
                      [now, self.deployment, prev])
            c.execute("UPDATE adapters SET promoted_at = ?, retired_at = NULL WHERE deployment = ? AND version = ?",
                      [now, self.deployment, version])
            self._event(c, "promoted", prev, version, reason, now)

    def begin_promotion(self, version: str, reason: str | None = None) -> None:
        """Before the switch: `version` is about to serve. What serves changes only with mark_promoted; an
        interrupted promotion stays pending (pending_promotions) until mark_promoted or abort_promotion."""
        with self._tx("serving") as c:
            self._check_adapter(c, version)
            self._event(c, "promoting", self._current(c), version, reason, self._now())

    def abort_promotion(self, version: str, reason: str | None = None) -> None:
        """The promotion of `version` did not happen (or was undone): close its pending record."""
        with self._tx("serving") as c:
            self._event(c, "aborted", self._current(c), version, reason, self._now())

    def pending_promotions(self) -> list[str]:
        """Versions whose promotion began but was neither completed nor aborted (the app stopped in between)."""
        return [r[0] for r in self._read(
            """SELECT e.to_version FROM adapter_events e WHERE e.deployment = ? AND e.event = 'promoting'
               AND NOT EXISTS (SELECT 1 FROM adapter_events f WHERE f.deployment = e.deployment
                   AND f.to_version = e.to_version AND f.event IN ('promoted', 'aborted') AND f.event_at >= e.event_at)
               ORDER BY e.event_at""", [self.deployment])]

    def record_rollback(self, from_version: str, to_version: str, reason: str | None = None) -> None:
        """Serving went back from `from_version` to `to_version` (an older adapter or "base")."""
        with self._tx("serving") as c:
            self._check_adapter(c, from_version)
            self._check_adapter(c, to_version)
            now = self._now()
            c.execute("UPDATE adapters SET retired_at = ? WHERE deployment = ? AND version = ?",
                      [now, self.deployment, from_version])
            c.execute("UPDATE adapters SET retired_at = NULL WHERE deployment = ? AND version = ?",
                      [self.deployment, to_version])
            self._event(c, "rollback", from_version, to_version, reason, now)

    def _current(self, c: duckdb.DuckDBPyConnection) -> str:
        row = c.execute("SELECT to_version FROM adapter_events WHERE deployment = ? AND event IN ('promoted', "
                        "'rollback') ORDER BY event_at DESC LIMIT 1", [self.deployment]).fetchall()
        return row[0][0] if row else BASE  # fetchall: a pending result would block the cursor's next .sql()

    def current_adapter(self) -> str:
        """The version the last promotion or rollback put in service ("base" if none)."""
        return self._current(self._cursor())

    def adapters(self) -> list[dict]:
        return self._read_dicts("SELECT * FROM adapters WHERE deployment = ? ORDER BY created_at",
                                [self.deployment])

    def adapter_events(self) -> list[dict]:
        return self._read_dicts("SELECT * FROM adapter_events WHERE deployment = ? ORDER BY event_at",
                                [self.deployment])

    def lineage(self, answer_id: str, include_ancestors: bool = False) -> list[str]:
        """Rating ids that trained the adapter which produced this answer ([] for the base model). With
        include_ancestors, also those of the adapters it was resumed from (its parent chain)."""
        return sorted({r for step in self.lineage_detail(answer_id, include_ancestors)["adapters"]
                       for r in step["trained"]})

    def lineage_detail(self, answer_id: str, include_ancestors: bool = False) -> dict:
        """The answer's adapter and, per adapter of its chain (newest first), the run that made it and that run's
        ratings split into trained, held out (judged on only) and dropped by the aligner, and how many of them have
        been deleted since."""
        answer = self.get_answer(answer_id)
        version, steps, seen = answer["adapter"], [], set()
        while version and version != BASE and version not in seen:
            seen.add(version)
            rows = self._read("SELECT run_id, parent FROM adapters WHERE deployment = ? AND version = ?",
                              [self.deployment, version])
            if not rows:
                break
            run_id, parent = rows[0]
            roles = self.run_example_roles(run_id) if run_id is not None else {"trained": [], "heldout": [],
                                                                               "dropped": []}
            # ratings deleted since (forget, retention): their ids stay in the run's record, resolving to nothing
            deleted = self._read("""SELECT count(*) FROM run_examples e WHERE e.run_id = ?
                AND NOT EXISTS (SELECT 1 FROM ratings r WHERE r.id = e.rating_id)""", [run_id])[0][0] if run_id else 0
            steps.append({"version": version, "run_id": run_id, "parent": parent, **roles, "deleted": int(deleted)})
            if not include_ancestors:
                break
            version = parent
        return {"answer_id": answer_id, "adapter": answer["adapter"], "adapters": steps}
