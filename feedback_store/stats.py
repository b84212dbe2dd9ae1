"""The operator dashboard's counts: current ratings by value, time, served version and rater."""

from __future__ import annotations

from datetime import datetime

from feedback_store.core import _naive_utc
from feedback_store.errors import InvalidInput
from feedback_store.runs import Runs


class Stats(Runs):
    """Read-only aggregate queries over the ratings table (counted since the last run's cutoff too)."""

    _COUNTS = ("count(*) FILTER (WHERE value = 'up') AS up, count(*) FILTER (WHERE value = 'down') AS down, "
               "count(*) FILTER (WHERE value IS NULL) AS withdrawn")

    def counts(self) -> dict:
        """Current ratings of this deployment: up, down, withdrawn, total."""
        up, down, wd = self._read(f"SELECT {self._COUNTS} FROM ratings WHERE deployment = ?",
                                  [self.deployment])[0]
        return {"up": up, "down": down, "withdrawn": wd, "total": up + down + wd}

    def counts_by_time(self, bucket: str = "day", since: datetime | None = None) -> list[dict]:
        """Time series of current ratings by the time they took their final value (UTC buckets)."""
        if bucket not in ("day", "hour"):
            raise InvalidInput("bucket must be 'day' or 'hour'")
        since = datetime.min if since is None else _naive_utc(since)
        return self._read_dicts(f"""SELECT date_trunc('{bucket}', updated_at) AS bucket, {self._COUNTS}
            FROM ratings WHERE deployment = ? AND updated_at >= ? GROUP BY 1 ORDER BY 1""",
                                [self.deployment, since])

    def counts_by_adapter(self) -> list[dict]:
        """Per served version: up/down/withdrawn and approval = up / (up + down), oldest version first."""
        rows = self._read_dicts(f"""SELECT adapter, {self._COUNTS}, min(created_at) AS first_rated_at
            FROM ratings WHERE deployment = ? GROUP BY adapter ORDER BY first_rated_at""", [self.deployment])
        for r in rows:
            r["approval"] = r["up"] / (r["up"] + r["down"]) if r["up"] + r["down"] else None
        return rows

    def counts_by_user(self, limit: int | None = 100) -> list[dict]:
        """Most active raters first (a single user dominating the data shows up here)."""
        sql = f"""SELECT user_id, {self._COUNTS}, count(*) AS total FROM ratings WHERE deployment = ?
            GROUP BY user_id ORDER BY total DESC, user_id"""
        params: list = [self.deployment]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self._read_dicts(sql, params)

    def ratings_since_last_run(self) -> dict:
        """Final ratings that changed after the last run's snapshot (what a new run would add)."""
        since = self._last_cutoff()
        up, down, wd = self._read(f"SELECT {self._COUNTS} FROM ratings WHERE deployment = ? AND updated_at > ?",
                                  [self.deployment, since or datetime.min])[0]
        return {"since": since, "up": up, "down": down, "withdrawn": wd, "total": up + down}

    def down_reasons(self, adapter: str | None = None, limit: int = 200) -> list[dict]:
        """Current thumbs-down that carry a reason or a comment, newest first, with the answer they judge (the
        console's reading list: why users dislike a version). `adapter`: only answers of that served version."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidInput("limit must be an int in [1, 10000]")
        where, params = "r.deployment = ? AND r.value = 'down' AND (r.reason IS NOT NULL OR r.comment IS NOT NULL)", \
            [self.deployment]
        if adapter is not None:
            where += " AND r.adapter = ?"
            params.append(adapter)
        return self._read_dicts(f"""SELECT r.updated_at AS rated_at, r.adapter, r.user_id, r.reason, r.comment,
            a.text AS answer, r.answer_id FROM ratings r JOIN answers a ON a.id = r.answer_id WHERE {where}
            ORDER BY r.updated_at DESC, r.id LIMIT ?""", [*params, limit])
