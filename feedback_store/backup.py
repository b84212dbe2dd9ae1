"""Online backups of the store, their retention and restore, so a damaged file or disk costs at most one backup
interval of ratings instead of all of them."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from feedback_store.core import StoreCore, damaged, read_every_block, utcnow, write_error
from feedback_store.errors import CorruptStore, InvalidInput, StoreError, StoreLocked
from feedback_store.schema import SCHEMA_VERSION, file_version

log = logging.getLogger(__name__)

_STAMP = "%Y%m%dT%H%M%S%fZ"
_NAME = re.compile(r"^(?P<stem>.+)-(?P<stamp>\d{8}T\d{12}Z)\.duckdb$")
RESTORE_HINT = "stop the app, then run: kto-loop restore {backup}"


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    bytes: int
    seconds: float
    taken_at: datetime


def default_backup_dir(db_path: str | Path) -> Path:
    """Where automatic backups go: next to the database, so one data directory holds everything."""
    return Path(db_path).expanduser().parent / "backups"


def backup_name(db_path: str | Path, at: datetime) -> str:
    """`feedback-20261205T190000123456Z.duckdb`: sorts by time, and the time survives copying the file."""
    return f"{Path(db_path).stem}-{at.strftime(_STAMP)}.duckdb"


def list_backups(backup_dir: str | Path) -> list[Path]:
    """The backups (named by backup_name) in a folder, newest first; half-written temporaries never match."""
    d = Path(backup_dir)
    if not d.is_dir():
        return []
    found = [(m["stamp"], p) for p in d.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def newest_backup(backup_dir: str | Path) -> Path | None:
    backups = list_backups(backup_dir)
    return backups[0] if backups else None


def backup_time(path: Path) -> datetime | None:
    """The UTC time a backup was taken, from its name."""
    m = _NAME.match(path.name)
    return datetime.strptime(m["stamp"], _STAMP) if m else None


def prune_backups(backup_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` backups; returns what was deleted. keep >= 1: never the last one."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidInput(f"keep must be an int >= 1, got {keep!r}")
    old = list_backups(backup_dir)[keep:]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def corrupt_message(db_path: Path, reason: str, backup_dir: Path | None) -> str:
    """What an operator needs when the file cannot be read: what broke, the newest backup, the command."""
    newest = newest_backup(backup_dir) if backup_dir is not None else None
    head = f"the feedback database {db_path} is damaged and cannot be read ({reason})"
    if newest is None:
        where = f" in {backup_dir}" if backup_dir is not None else ""
        return f"{head}. There is no backup{where} to restore."
    taken, newest = backup_time(newest), newest.resolve()
    return (f"{head}. The newest backup is {newest}" + (f", taken {taken:%Y-%m-%d %H:%M} UTC" if taken else "")
            + f"; {RESTORE_HINT.format(backup=newest)}")


def check_backup(path: str | Path) -> dict[str, int]:
    """Open a backup read-only and read every row of every table (DuckDB verifies each block's checksum), so a
    restore never swaps a working file for a damaged one; returns the row count per table."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"no backup file at {path}")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise CorruptStore(f"{path} is not a readable DuckDB file: {e}") from None
    try:
        version = file_version(con)
        if not 1 <= version <= SCHEMA_VERSION:
            raise CorruptStore(f"{path} is not a feedback store of a version this code reads "
                               f"(schema {version}, this code {SCHEMA_VERSION})")
        return read_every_block(con)
    except duckdb.Error as e:
        raise CorruptStore(f"{path} is damaged: {e}") from None
    finally:
        con.close()


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _in_use(db_path: Path) -> bool:
    """Whether another process holds the file (the app): DuckDB then refuses a second writer."""
    try:
        duckdb.connect(str(db_path)).close()
    except duckdb.IOException as e:
        return "lock" in str(e).lower()
    except duckdb.Error:
        return False      # damaged: nobody can hold it open
    return False


def restore(backup: str | Path, db_path: str | Path, *, now: Callable[[], datetime] = utcnow) -> Path | None:
    """Replace the database file with a checked copy of `backup`. The file it replaces (and its WAL) is moved
    aside, never deleted, and its new path returned (None when there was none). Refused while the app runs."""
    backup, db_path = Path(backup), Path(db_path)
    check_backup(backup)
    if db_path.exists() and _in_use(db_path):
        raise StoreLocked(f"{db_path} is in use (is the kto-loop app running?); stop the app, then restore")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.{uuid.uuid4().hex}.restore")
    try:
        shutil.copyfile(backup, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        aside = None
        if db_path.exists():
            aside = db_path.with_name(f"{db_path.name}.replaced-{now().strftime(_STAMP)}")
            os.replace(db_path, aside)
        wal = db_path.with_name(db_path.name + ".wal")
        if wal.exists():   # the old file's log must not be replayed onto the restored one
            os.replace(wal, (aside or db_path).with_name((aside or db_path).name + ".wal"))
        os.replace(tmp, db_path)
        _fsync_dir(db_path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return aside


class Backups(StoreCore):
    """backup(): a consistent copy of the whole file taken while ratings keep arriving."""

    def backup(self, path: str | Path) -> BackupInfo:
        """Copy every table into a new DuckDB file in one read transaction (one MVCC snapshot, so it is consistent
        and writers never wait), under a temporary name renamed into place once complete and synced."""
        if not self._dialect.single_writer:
            raise StoreError(f"the feedback store is on PostgreSQL ({self.path}): back it up with the server's own "
                             "tools (pg_dump, base backups), see docs/deploy.md")
        path = Path(path).expanduser()
        if path.exists():
            raise InvalidInput(f"{path} already exists; a backup never overwrites a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        alias = f"kto_backup_{uuid.uuid4().hex}"
        t0, taken_at = time.perf_counter(), self._now()
        with self._lock:
            if self._closed:
                raise StoreError("the feedback store is closed")
            cur = self._conn.cursor()
        try:
            src = cur.execute("SELECT current_database()").fetchone()[0]
            quoted = str(tmp).replace("'", "''")
            cur.execute(f"ATTACH '{quoted}' AS {alias} (READ_WRITE)")
            try:
                cur.execute(f'COPY FROM DATABASE "{src}" TO {alias}')
            finally:
                cur.execute(f"DETACH {alias}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except duckdb.Error as e:
            raise (self._corrupt(e) if damaged(e) else write_error(path, e)) from None
        except OSError as e:
            raise StoreError(f"backup to {path} failed: {e}") from e
        finally:
            cur.close()
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".wal").unlink(missing_ok=True)
        return BackupInfo(path, path.stat().st_size, time.perf_counter() - t0, taken_at)

    def backup_to_dir(self, backup_dir: str | Path | None = None, keep: int | None = None) -> BackupInfo:
        """A backup named by its time in `backup_dir` (default: the store's backup_dir, else next to the database),
        then prune to `keep`."""
        d = Path(backup_dir or self._backup_dir or default_backup_dir(self.path))
        info = self.backup(d / backup_name(self.path, self._now()))
        if keep is not None:
            prune_backups(d, keep)
        return info


class PeriodicBackup:
    """A daemon thread that backs the store up every `interval_s` and keeps the newest `keep` backups. The next
    backup is due one interval after the newest file in the folder, so restarts neither skip nor repeat one."""

    def __init__(self, store: Backups, backup_dir: str | Path, interval_s: float, keep: int,
                 clock: Callable[[], float] = time.time, retry_s: float = 300.0):
        if not interval_s > 0:
            raise InvalidInput(f"the backup interval must be > 0 seconds, got {interval_s!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise InvalidInput(f"keep must be an int >= 1, got {keep!r}")
        self.store, self.dir, self.interval_s, self.keep = store, Path(backup_dir), float(interval_s), keep
        self._clock, self.retry_s = clock, retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: BackupInfo | None = None
        self.last_error: str | None = None
        self.next_at: float | None = None

    def due_at(self) -> float:
        """Epoch seconds of the next backup: one interval after the newest one, or now if there is none."""
        newest = newest_backup(self.dir)
        taken = backup_time(newest) if newest is not None else None
        if taken is None:
            return self._clock()
        return taken.replace(tzinfo=UTC).timestamp() + self.interval_s

    def run_once(self) -> BackupInfo | None:
        """Take one backup and prune; a failure is logged and kept for the console, never raised."""
        try:
            self.last = self.store.backup_to_dir(self.dir, self.keep)
            self.last_error = None
            return self.last
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.error("automatic backup failed: %s", self.last_error)
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.next_at = self.due_at()
            wait = self.next_at - self._clock()
            if wait > 0:
                self._stop.wait(min(wait, 3600.0))
                continue
            if self.run_once() is None:     # failed: try again later, not in a tight loop
                self.next_at = self._clock() + min(self.retry_s, self.interval_s)
                self._stop.wait(min(self.retry_s, self.interval_s))

    def start(self) -> PeriodicBackup:
        self._thread = threading.Thread(target=self._loop, name="feedback-store-backup", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def status(self) -> dict:
        return {"dir": str(self.dir), "interval_s": self.interval_s, "keep": self.keep,
                "last": None if self.last is None else str(self.last.path), "last_error": self.last_error,
                "next_at": self.next_at, "backups": [str(p) for p in list_backups(self.dir)]}
