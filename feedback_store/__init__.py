"""The feedback store: one DuckDB file holding conversations, answers, ratings, runs and adapters."""

from feedback_store.backup import (
    PeriodicBackup,
    check_backup,
    default_backup_dir,
    list_backups,
    newest_backup,
    prune_backups,
    restore,
)
from feedback_store.errors import (
    CorruptStore,
    DuplicateAdapter,
    InvalidInput,
    InvalidRating,
    ReadOnlyStore,
    SchemaError,
    StorageFull,
    StoreError,
    StoreLocked,
    StoreWriteError,
    UnknownAdapter,
    UnknownAnswer,
    UnknownConversation,
    UnknownRun,
    WrongDeployment,
)
from feedback_store.files import KTO_SCHEMA, SNAPSHOT_SCHEMA
from feedback_store.schema import MIGRATIONS, SCHEMA_VERSION
from feedback_store.store import (
    RATING_VALUES,
    BackupInfo,
    FeedbackStore,
    ForgetReport,
    RateResult,
    SnapshotInfo,
)

__all__ = [
    "FeedbackStore", "ForgetReport", "RateResult", "SnapshotInfo", "RATING_VALUES", "SNAPSHOT_SCHEMA", "KTO_SCHEMA",
    "MIGRATIONS", "SCHEMA_VERSION", "StoreError", "InvalidInput", "InvalidRating", "UnknownAnswer",
    "UnknownConversation", "UnknownRun", "UnknownAdapter", "WrongDeployment", "DuplicateAdapter",
    "SchemaError", "StoreLocked", "ReadOnlyStore", "StoreWriteError", "StorageFull", "CorruptStore",
    "BackupInfo", "PeriodicBackup", "check_backup", "default_backup_dir", "list_backups", "newest_backup",
    "prune_backups", "restore",
]
