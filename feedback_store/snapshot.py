"""The training snapshot: final non-withdrawn ratings joined with their answers, written as the aligner's Parquet
contract (or TRL's unpaired KTO format), and what a run trains on, recorded for lineage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from feedback_store import files
from feedback_store.core import _naive_utc
from feedback_store.errors import InvalidInput, UnknownAdapter
from feedback_store.runs import Runs


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    n_desirable: int
    n_undesirable: int
    sha256: str
    since: datetime | None = None
    until: datetime | None = None
    run_id: str | None = None

    @property
    def n_examples(self) -> int:
        return self.n_desirable + self.n_undesirable


class Snapshots(Runs):
    """What the next run would train on, and its export (recorded on the run it feeds)."""

    def training_counts(self, since: datetime | str | None = None, max_examples: int | None = None
                        ) -> tuple[int, int]:
        """(n_desirable, n_undesirable) that export_snapshot with the same arguments would write."""
        where, params = self._snapshot_filter(self._resolve_since(since), None)
        sql = f"SELECT value FROM ratings r WHERE {where} ORDER BY updated_at DESC"
        if max_examples is not None:
            sql += " LIMIT ?"
            params.append(int(max_examples))
        return tuple(self._read(f"SELECT count(*) FILTER (WHERE value = 'up'), count(*) FILTER "
                                f"(WHERE value = 'down') FROM ({sql})", params)[0])  # type: ignore[return-value]

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

    def snapshot_table(self, since: datetime | str | None = None, max_examples: int | None = None,
                       until: datetime | None = None) -> pa.Table:
        """Final non-withdrawn ratings joined with their answers, newest first, in the snapshot schema."""
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 0):
            raise InvalidInput("max_examples must be a non-negative int or None")
        where, params = self._snapshot_filter(self._resolve_since(since), until)
        sql = f"""SELECT r.id AS example_id, r.answer_id, a.prompt_messages AS messages, a.text AS completion,
                r.value = 'up' AS label, r.user_id, r.adapter, r.updated_at AS rated_at
            FROM ratings r JOIN answers a ON a.id = r.answer_id
            WHERE {where} ORDER BY r.updated_at DESC, r.id"""
        if max_examples is not None:
            sql += " LIMIT ?"
            params.append(max_examples)
        return files.to_snapshot_table(self._cursor().sql(sql, params=params).to_arrow_table())

    def export_snapshot(self, path: str | Path, since: datetime | str | None = None,
                        max_examples: int | None = None, run_id: str | None = None) -> SnapshotInfo:
        """Write the aligner's Parquet snapshot atomically. With run_id, also record which ratings (and labels)
        the run trains on and the snapshot cutoff, for lineage and "ratings since the last run"."""
        if run_id is not None:
            self.get_run(run_id)
        until = self._now()
        since_t = self._resolve_since(since)
        table = self.snapshot_table(since_t, max_examples, until=until)
        digest = files.write_snapshot(Path(path), table)
        n_d = int(pc.sum(table.column("label")).as_py() or 0)
        n_u = table.num_rows - n_d
        if run_id is not None:
            with self._tx() as c:
                c.execute("DELETE FROM run_examples WHERE run_id = ?", [run_id])
                c.register("_examples", table.select(["example_id", "label"]))
                try:
                    c.execute("INSERT INTO run_examples SELECT ?, example_id, label, false FROM _examples", [run_id])
                finally:
                    c.unregister("_examples")
                c.execute("UPDATE runs SET snapshot_at = ?, snapshot_sha256 = ?, n_desirable = ?, n_undesirable = ? "
                          "WHERE id = ?", [until, digest, n_d, n_u, run_id])
        return SnapshotInfo(Path(path), n_d, n_u, digest, since_t, until, run_id)

    def export_kto(self, path: str | Path, since: datetime | str | None = None,
                   max_examples: int | None = None) -> SnapshotInfo:
        """TRL's unpaired format (prompt messages, [assistant completion], label); .jsonl or .parquet."""
        try:
            files.kto_format(Path(path))
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        table = self.snapshot_table(since, max_examples)
        digest = files.write_kto(Path(path), files.kto_rows(table))
        n_d = int(pc.sum(table.column("label")).as_py() or 0)
        return SnapshotInfo(Path(path), n_d, table.num_rows - n_d, digest, self._resolve_since(since), None)
