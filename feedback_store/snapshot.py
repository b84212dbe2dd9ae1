"""The training snapshot: final non-withdrawn ratings joined with their answers, written as the aligner's Parquet
contract (or TRL's unpaired KTO format, or TRL's DPO pairs of sibling answers one user rated opposite ways),
capped so no one identity or address dominates it, and what a run trains on, recorded for lineage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import EllipsisType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from feedback_store import files
from feedback_store.caps import CapReport, cap_shares, check_share, top_shares
from feedback_store.core import _naive_utc
from feedback_store.errors import InvalidInput, UnknownAdapter
from feedback_store.runs import Runs

Share = float | None | EllipsisType    # ... = the store's setting (max_user_share / max_addr_share)


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    n_desirable: int
    n_undesirable: int
    sha256: str
    since: datetime | None = None
    until: datetime | None = None
    run_id: str | None = None
    caps: dict | None = None     # CapReport.as_dict(): the caps applied and the rows each identity/address lost

    @property
    def n_examples(self) -> int:
        return self.n_desirable + self.n_undesirable


@dataclass(frozen=True)
class PairsInfo:
    path: Path
    n_pairs: int
    n_chosen: int        # distinct answers among the chosen ones
    n_rejected: int
    sha256: str
    since: datetime | None = None
    caps: dict | None = None


class Snapshots(Runs):
    """What the next run would train on, and its export (recorded on the run it feeds)."""

    def __init__(self, *args: Any, max_user_share: float | None = None, max_addr_share: float | None = None,
                 **kwargs: Any):
        self.max_user_share = self.max_addr_share = None
        self.set_share_caps(max_user_share, max_addr_share)
        super().__init__(*args, **kwargs)

    def set_share_caps(self, max_user_share: float | None, max_addr_share: float | None) -> None:
        """The caps every snapshot of this store applies unless a call names its own (None: no cap); the
        operator may change them while the app runs."""
        try:
            check_share("max_user_share", max_user_share)
            check_share("max_addr_share", max_addr_share)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        self.max_user_share, self.max_addr_share = max_user_share, max_addr_share

    def _shares(self, user: Share, addr: Share) -> tuple[float | None, float | None]:
        u = self.max_user_share if user is ... else user
        a = self.max_addr_share if addr is ... else addr
        try:
            check_share("max_user_share", u)
            check_share("max_addr_share", a)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        return u, a  # type: ignore[return-value]

    def _candidates(self, columns: str, since: datetime | str | None, max_examples: int | None,
                    until: datetime | None, join_answers: bool) -> pa.Table:
        """The rows a snapshot starts from, newest first (max_examples = the newest N), before any cap."""
        if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                         or max_examples < 0):
            raise InvalidInput("max_examples must be a non-negative int or None")
        where, params = self._snapshot_filter(self._resolve_since(since), until)
        join = "JOIN answers a ON a.id = r.answer_id" if join_answers else ""
        sql = f"SELECT {columns} FROM ratings r {join} WHERE {where} ORDER BY r.updated_at DESC, r.id"
        if max_examples is not None:
            sql += " LIMIT ?"
            params.append(max_examples)
        return self._cursor().sql(sql, params=params).to_arrow_table()

    @staticmethod
    def _cap(table: pa.Table, user: float | None, addr: float | None) -> tuple[pa.Table, CapReport, list[bool]]:
        """Apply the share caps to candidate rows (columns user_id and client_addr); drops client_addr."""
        users, addrs = table.column("user_id").to_pylist(), table.column("client_addr").to_pylist()
        keep, report = cap_shares(users, addrs, user, addr)
        if report.n_kept < table.num_rows:
            table = table.filter(pa.array(keep, pa.bool_()))
        return table.drop_columns(["client_addr"]), report, keep

    def _resolve_since(self, since: datetime | str | None) -> datetime | None:
        """None, a time, "last_run", or an adapter version: the ratings that version has not seen."""
        if since is None or isinstance(since, datetime):
            return None if since is None else _naive_utc(since)
        if since == "last_run":
            return self._last_cutoff()
        if isinstance(since, str):
            rows = self._read("""SELECT coalesce(r.snapshot_at, a.created_at) FROM adapters a
                LEFT JOIN runs r ON r.id = a.run_id WHERE a.deployment = ? AND a.version = ?""",
                              [self.deployment, since])
            if not rows:
                raise UnknownAdapter(f"unknown adapter version {since!r}")
            return rows[0][0]
        raise InvalidInput(f"since must be None, a datetime, 'last_run' or an adapter version, got {since!r}")

    def _snapshot_filter(self, since: datetime | None, until: datetime | None) -> tuple[str, list]:
        where, params = "r.deployment = ? AND r.value IS NOT NULL", [self.deployment]
        if since is not None:
            where += " AND r.updated_at > ?"
            params.append(since)
        if until is not None:
            where += " AND r.updated_at <= ?"
            params.append(until)
        return where, params

    def training_counts(self, since: datetime | str | None = None, max_examples: int | None = None, *,
                        max_user_share: Share = ..., max_addr_share: Share = ...) -> tuple[int, int]:
        """(n_desirable, n_undesirable) that export_snapshot with the same arguments would write."""
        user, addr = self._shares(max_user_share, max_addr_share)
        table = self._candidates("r.value, r.user_id, r.client_addr", since, max_examples, None, False)
        if user is not None or addr is not None:
            table = self._cap(table, user, addr)[0]
        n_d = pc.sum(pc.equal(table.column("value"), "up")).as_py() or 0
        return int(n_d), table.num_rows - int(n_d)

    def snapshot_keys(self, since: datetime | str | None = None, max_examples: int | None = None, *,
                      max_user_share: Share = ..., max_addr_share: Share = ...) -> pa.Table:
        """example_id, answer_id, label of the rows export_snapshot with the same arguments would write, in its
        order, without the answers' text: what the next run's held-out split needs (app/loop/next_run.py)."""
        user, addr = self._shares(max_user_share, max_addr_share)
        table = self._candidates("r.id AS example_id, r.answer_id, r.value = 'up' AS label, r.user_id, "
                                 "r.client_addr", since, max_examples, None, False)
        return self._cap(table, user, addr)[0].select(["example_id", "answer_id", "label"])

    def snapshot_table(self, since: datetime | str | None = None, max_examples: int | None = None,
                       until: datetime | None = None, *, max_user_share: Share = ...,
                       max_addr_share: Share = ...) -> pa.Table:
        """Final non-withdrawn ratings joined with their answers, newest first, in the snapshot schema: the newest
        max_examples, then the share caps (each over-cap identity/address keeps its most recent ratings)."""
        return self._snapshot(since, max_examples, until, max_user_share, max_addr_share)[0]

    def _snapshot(self, since: datetime | str | None, max_examples: int | None, until: datetime | None,
                  max_user_share: Share, max_addr_share: Share) -> tuple[pa.Table, CapReport]:
        table, report = self._rated_rows(since, max_examples, until, max_user_share, max_addr_share)
        return files.to_snapshot_table(table), report

    def _rated_rows(self, since: datetime | str | None, max_examples: int | None, until: datetime | None,
                    max_user_share: Share, max_addr_share: Share) -> tuple[pa.Table, CapReport]:
        """The snapshot's rows, capped, with the reason and comment of each final rating (the KTO export's
        metadata), before the cast to the snapshot schema."""
        user, addr = self._shares(max_user_share, max_addr_share)
        table = self._candidates("""r.id AS example_id, r.answer_id, a.prompt_messages AS messages,
            a.text AS completion, r.value = 'up' AS label, r.user_id, r.adapter, r.updated_at AS rated_at,
            r.reason, r.comment, r.client_addr, a.sampling, a.completion_tokens""", since, max_examples, until, True)
        table, report, _ = self._cap(table, user, addr)
        return table, report

    def snapshot_shares(self, since: datetime | str | None = None, max_examples: int | None = None, top: int = 10,
                        *, max_user_share: Share = ..., max_addr_share: Share = ...) -> dict:
        """For the console: the top identities' and addresses' shares of the next snapshot (with these
        arguments), and what the caps drop, per identity and per address."""
        user, addr = self._shares(max_user_share, max_addr_share)
        table = self._candidates("r.user_id, r.client_addr", since, max_examples, None, False)
        users, addrs = table.column("user_id").to_pylist(), table.column("client_addr").to_pylist()
        keep, report = cap_shares(users, addrs, user, addr)
        return {**report.as_dict(),
                "top_users": [{"user_id": r.pop("key"), **r} for r in
                              top_shares(users, keep, report.dropped_by_user, top)],
                "top_addrs": [{"client_addr": r.pop("key"), **r} for r in
                              top_shares(addrs, keep, report.dropped_by_addr, top)]}

    def export_snapshot(self, path: str | Path, since: datetime | str | None = None,
                        max_examples: int | None = None, run_id: str | None = None, *,
                        max_user_share: Share = ..., max_addr_share: Share = ...) -> SnapshotInfo:
        """Write the aligner's Parquet snapshot atomically. With run_id, also record which ratings (and labels)
        the run trains on, the snapshot cutoff and what the share caps dropped, for lineage, "ratings since the
        last run" and the console."""
        if run_id is not None:
            self.get_run(run_id)
        until = self._now()
        since_t = self._resolve_since(since)
        table, report = self._snapshot(since_t, max_examples, until, max_user_share, max_addr_share)
        digest = files.write_snapshot(Path(path), table)
        n_d = int(pc.sum(table.column("label")).as_py() or 0)
        n_u = table.num_rows - n_d
        caps = report.as_dict()
        if run_id is not None:
            with self._tx() as c:
                c.execute("DELETE FROM run_examples WHERE run_id = ?", [run_id])
                c.register("_examples", table.select(["example_id", "label"]))
                try:
                    c.execute("INSERT INTO run_examples (run_id, rating_id, label) SELECT ?, example_id, label "
                              "FROM _examples", [run_id])
                finally:
                    c.unregister("_examples")
                c.execute("UPDATE runs SET snapshot_at = ?, snapshot_sha256 = ?, n_desirable = ?, n_undesirable = ?, "
                          "snapshot_caps = ? WHERE id = ?", [until, digest, n_d, n_u, json.dumps(caps), run_id])
        return SnapshotInfo(Path(path), n_d, n_u, digest, since_t, until, run_id, caps)

    def export_kto(self, path: str | Path, since: datetime | str | None = None,
                   max_examples: int | None = None, *, max_user_share: Share = ...,
                   max_addr_share: Share = ...) -> SnapshotInfo:
        """TRL's unpaired format (prompt messages, [assistant completion], label) plus metadata (answer_id, user_id,
        the final rating's reason and comment, rated_at), the rows export_snapshot writes; .jsonl or .parquet."""
        try:
            files.kto_format(Path(path))
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        table, report = self._rated_rows(since, max_examples, None, max_user_share, max_addr_share)
        digest = files.write_rows(Path(path), files.kto_rows(table), files.KTO_SCHEMA)
        n_d = int(pc.sum(table.column("label")).as_py() or 0)
        return SnapshotInfo(Path(path), n_d, table.num_rows - n_d, digest, self._resolve_since(since), None,
                            caps=report.as_dict())

    def export_dpo(self, path: str | Path, since: datetime | str | None = None,
                   max_examples: int | None = None, *, max_user_share: Share = ...,
                   max_addr_share: Share = ...) -> PairsInfo:
        """TRL's preference format (prompt messages, [chosen], [rejected]) plus metadata, .jsonl or .parquet: a
        pair wherever one user's final ratings put 👍 on one answer and 👎 on a sibling of it (same user message,
        same prompt messages). Every 👍 × 👎 sibling pair of that user is written: each is a preference the user
        stated, and siblings per prompt are few, so nothing is discarded and no pairing rule is invented. A
        withdrawn or changed rating counts only by its final value (reason and comment included). A pair's
        rated_at is the later of its two ratings; `since` keeps pairs completed or changed after it, and
        max_examples the newest N pairs (newest first, then by answer ids); then the share caps, each pair
        counting for its user and for the address of its later rating."""
        try:
            files.kto_format(Path(path))
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                         or max_examples < 0):
            raise InvalidInput("max_examples must be a non-negative int or None")
        user, addr = self._shares(max_user_share, max_addr_share)
        since_t = self._resolve_since(since)
        rated_at = "greatest(u.updated_at, d.updated_at)"
        sql = f"""SELECT ua.prompt_messages AS messages, ua.text AS chosen_text, da.text AS rejected_text,
                u.answer_id AS chosen_answer_id, d.answer_id AS rejected_answer_id, u.user_id,
                u.reason AS chosen_reason, u.comment AS chosen_comment, d.reason AS rejected_reason,
                d.comment AS rejected_comment, {rated_at} AS rated_at,
                CASE WHEN d.updated_at >= u.updated_at THEN d.client_addr ELSE u.client_addr END AS client_addr
            FROM ratings u JOIN answers ua ON ua.id = u.answer_id
            JOIN answers da ON da.parent_id = ua.parent_id AND da.prompt_messages = ua.prompt_messages
            JOIN ratings d ON d.answer_id = da.id AND d.user_id = u.user_id
            WHERE u.deployment = ? AND u.value = 'up' AND d.value = 'down'"""
        params: list = [self.deployment]
        if since_t is not None:
            sql += f" AND {rated_at} > ?"
            params.append(since_t)
        sql += " ORDER BY rated_at DESC, chosen_answer_id, rejected_answer_id"
        if max_examples is not None:
            sql += " LIMIT ?"
            params.append(max_examples)
        table = self._cursor().sql(sql, params=params).to_arrow_table()
        table, report, _ = self._cap(table, user, addr)
        digest = files.write_rows(Path(path), files.dpo_rows(table), files.DPO_SCHEMA)
        return PairsInfo(Path(path), table.num_rows, len(set(table.column("chosen_answer_id").to_pylist())),
                         len(set(table.column("rejected_answer_id").to_pylist())), digest, since_t,
                         report.as_dict())
