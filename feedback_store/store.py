"""FeedbackStore: the one DuckDB file that remembers every conversation, answer, rating, run and adapter.

One class assembled from one part per job, each subclassing the parts it calls: core (connection, write lock,
read cursors) <- ratings (group commit) <- conversations <- runs <- stats and snapshot (with caps); backup;
apikeys; forget (and retention); limits (rate-limit buckets shared by app processes).
"""

from __future__ import annotations

from feedback_store.apikeys import ApiKeys
from feedback_store.backup import BackupInfo, Backups
from feedback_store.conversations import ROLES
from feedback_store.core import BASE, utcnow
from feedback_store.forget import ForgetReport, Forgetting
from feedback_store.limits import RateLimits
from feedback_store.ratings import RATING_VALUES, RateResult
from feedback_store.runs import RUN_STATUSES, TRIGGERS
from feedback_store.snapshot import SnapshotInfo, Snapshots
from feedback_store.stats import Stats

__all__ = ["FeedbackStore", "BackupInfo", "RateResult", "SnapshotInfo", "RATING_VALUES", "ROLES", "TRIGGERS",
           "RUN_STATUSES", "BASE", "utcnow", "ForgetReport"]


class FeedbackStore(Stats, Snapshots, Backups, ApiKeys, Forgetting, RateLimits):
    """One DuckDB file; `deployment` scopes every row, so one file can serve several deployments."""
