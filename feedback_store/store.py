"""FeedbackStore: the one DuckDB file that remembers every conversation, answer, rating, run and adapter.

One class for callers, assembled from one part per job so each job reads on its own. Each part subclasses the
parts it calls: core.py (the connection, its write lock, read cursors) <- ratings.py (the group-commit rating
engine) <- conversations.py (chat trees) <- runs.py (runs, adapters, lineage) <- stats.py (dashboard counts) and
snapshot.py (training snapshot and export, with the share caps of caps.py); backup.py (online backups);
apikeys.py (client applications' API keys).
"""

from __future__ import annotations

from feedback_store.apikeys import ApiKeys
from feedback_store.backup import BackupInfo, Backups
from feedback_store.conversations import ROLES
from feedback_store.core import BASE, utcnow
from feedback_store.ratings import RATING_VALUES, RateResult
from feedback_store.runs import RUN_STATUSES, TRIGGERS
from feedback_store.snapshot import SnapshotInfo, Snapshots
from feedback_store.stats import Stats

__all__ = ["FeedbackStore", "BackupInfo", "RateResult", "SnapshotInfo", "RATING_VALUES", "ROLES", "TRIGGERS",
           "RUN_STATUSES", "BASE", "utcnow"]


class FeedbackStore(Stats, Snapshots, Backups, ApiKeys):
    """One DuckDB file; `deployment` scopes every row, so one file can serve several deployments."""
