"""Typed errors, so callers (UI, CLI, realign loop) can turn each into a clear message without parsing text."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the feedback store raises on purpose."""


class InvalidInput(StoreError, ValueError):
    """A malformed argument (empty id, unknown trigger, bad message list, ...)."""


class InvalidRating(InvalidInput):
    """A rating value outside {"up", "down", None}, or a malformed reason/comment."""


class UnknownAnswer(StoreError, KeyError):
    """The answer id is not in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown answer"


class UnknownConversation(UnknownAnswer):
    """The conversation (or parent message) id is not in the store."""


class UnknownRun(UnknownAnswer):
    """The alignment run id is not in the store."""


class UnknownAdapter(UnknownAnswer):
    """The adapter version is not registered."""


class WrongDeployment(StoreError):
    """The object exists but belongs to another deployment than this store's."""


class DuplicateAdapter(StoreError):
    """An adapter version can be registered only once per deployment."""


class SchemaError(StoreError):
    """The file's schema is newer than this code, or read-only access needs a migration first."""


class StoreLocked(StoreError):
    """Another process (normally the running app) holds the DuckDB file; DuckDB allows one writer process."""


class ReadOnlyStore(StoreError):
    """A write was attempted on a store opened with read_only=True."""


class StoreWriteError(StoreError):
    """The database refused a write (I/O error, damaged file); the message carries DuckDB's own reason."""

    user_message = "the server could not save it"    # for a page shown to the public: no paths, no internals


class StorageFull(StoreWriteError):
    """The disk (or the file-size limit) holding the database is full: nothing of the failed write was kept."""

    user_message = "the server's disk is full, so nothing was saved"


class CorruptStore(StoreError):
    """The database file cannot be read; the message names the newest backup and the restore command."""

    user_message = "the server's database is damaged"
