"""Operator settings that must survive restarts (schedule, system prompt), kept as one small JSON file.

The file sits in the data dir next to the DuckDB file; writes go to a temp file and are renamed into place, so
a crash never leaves half a file. Both the running app and the headless CLI use this one class.

Every value is checked (type and range, strictly: "30" is not a number of minutes, "false" is not a bool) before
anything is written, so no request can persist a schedule the next start cannot apply. A file that fails the same
check (edited by hand, written by an older version) never stops the app: `load()` answers the defaults for the
bad fields with scheduling off, and `error` says which field of which file was wrong.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from app.config import Config

log = logging.getLogger(__name__)

SETTINGS_FILE = "operator_settings.json"
RUNTIME_FILE = "app_runtime.json"
MAX_INTERVAL_MINUTES = 366 * 24 * 60      # a year: beyond it APScheduler's date arithmetic is no longer meaningful
MAX_SYSTEM_PROMPT_CHARS = 4000


@dataclass
class OperatorSettings:
    # The start-up settings seed these (their defaults are app/config.py's); the operator changes them at run time.
    interval_minutes: int = Config.schedule_interval_minutes  # 0 = no interval trigger
    cron: str = Config.schedule_cron                           # crontab expression; "" = none
    min_new_ratings: int = Config.min_new_ratings              # a scheduled run waits for this many new ratings
    max_examples: int = Config.max_examples                    # newest-first cap per run
    enabled: bool = True                                       # pause scheduling without losing the settings
    system_prompt: str = Config.system_prompt


FIELD_TYPES: dict[str, type] = {"interval_minutes": int, "cron": str, "min_new_ratings": int, "max_examples": int,
                                "enabled": bool, "system_prompt": str}
assert set(FIELD_TYPES) == {f.name for f in fields(OperatorSettings)}


class SettingsError(ValueError):
    """A setting has the wrong type or value; the message names the field."""


def validate_schedule(interval_minutes: int, cron: str) -> None:
    """Raise ValueError with a clear message for a schedule APScheduler would refuse."""
    from apscheduler.triggers.cron import CronTrigger

    if interval_minutes < 0:
        raise SettingsError("interval_minutes must be 0 (off) or a positive number of minutes")
    if interval_minutes > MAX_INTERVAL_MINUTES:
        raise SettingsError(f"interval_minutes must be at most {MAX_INTERVAL_MINUTES} (a year)")
    if interval_minutes and cron.strip():
        raise SettingsError("choose either an interval or a cron expression, not both")
    if cron.strip():
        try:
            CronTrigger.from_crontab(cron.strip())
        except ValueError as e:
            raise SettingsError(f"cron: bad cron expression {cron!r}: {e}") from None


def has_schedule(s: OperatorSettings) -> bool:
    """Whether the settings name a schedule (an interval or a cron expression): `enabled` alone runs nothing."""
    return s.interval_minutes > 0 or bool(s.cron.strip())


def _typed(name: str, value: Any) -> Any:
    """`value` if it is exactly the field's type (a bool is not an int here, a string is neither)."""
    want = FIELD_TYPES[name]
    ok = isinstance(value, bool) if want is bool else isinstance(value, want) and not isinstance(value, bool)
    if not ok:
        kind = {bool: "true or false", int: "an integer", str: "a string"}[want]
        raise SettingsError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    return value


def check_settings(s: OperatorSettings) -> OperatorSettings:
    """`s` if every field has its type and a usable value; SettingsError naming the first bad field otherwise."""
    for name in FIELD_TYPES:
        _typed(name, getattr(s, name))
    validate_schedule(s.interval_minutes, s.cron)
    if s.min_new_ratings < 0:
        raise SettingsError(f"min_new_ratings must be ≥ 0, got {s.min_new_ratings}")
    if s.max_examples < 1:
        raise SettingsError(f"max_examples must be ≥ 1, got {s.max_examples}")
    if len(s.system_prompt) > MAX_SYSTEM_PROMPT_CHARS:
        raise SettingsError(f"system_prompt is limited to {MAX_SYSTEM_PROMPT_CHARS} characters")
    return s


def apply_changes(base: OperatorSettings, changes: Mapping[str, Any]) -> OperatorSettings:
    """A new, checked OperatorSettings: `base` with `changes`; SettingsError (nothing changed) on any bad value."""
    unknown = sorted(set(changes) - set(FIELD_TYPES))
    if unknown:
        raise SettingsError(f"unknown settings: {unknown} (known: {sorted(FIELD_TYPES)})")
    typed = {k: _typed(k, v) for k, v in changes.items()}
    if isinstance(typed.get("cron"), str):
        typed["cron"] = typed["cron"].strip()
    return check_settings(replace(base, **typed))


def settings_from_file(raw: Any, defaults: OperatorSettings) -> tuple[OperatorSettings, list[str]]:
    """What a parsed settings file means: its good fields over the defaults, and one message per bad field.

    With any bad field the result has scheduling off: a schedule read only in part is not one to run on.
    Keys we do not know (from another version) are ignored.
    """
    if not isinstance(raw, dict):
        return replace(defaults, enabled=False), [f"expected a JSON object, got {type(raw).__name__}"]
    s, errors = defaults, []
    for name in FIELD_TYPES:
        if name not in raw:
            continue
        try:
            s = apply_changes(s, {name: raw[name]})
        except SettingsError as e:
            errors.append(str(e))
    return (replace(s, enabled=False), errors) if errors else (s, [])


class SettingsStore:
    """Load/save OperatorSettings atomically; defaults come from Config on first use."""

    def __init__(self, data_dir: Path, defaults: OperatorSettings):
        self.path = Path(data_dir) / SETTINGS_FILE
        self.defaults = defaults
        self.error: str | None = None      # why the file (or the defaults) could not be used as they are
        self._lock = threading.Lock()
        self._update_lock = threading.Lock()   # one read-modify-write at a time

    def load(self) -> OperatorSettings:
        """The settings in force; never raises for a bad file (see `error`)."""
        with self._lock:
            s, error = self._read()
            if error and error != self.error:
                log.error("%s", error)
            self.error = error
            return s

    def _read(self) -> tuple[OperatorSettings, str | None]:
        try:
            defaults = check_settings(replace(self.defaults))
        except SettingsError as e:
            return replace(self.defaults, interval_minutes=0, cron="", enabled=False), (
                f"operator settings: the configured default is unusable: {e}; scheduling is off")
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return defaults, None
        except OSError as e:
            return replace(defaults, enabled=False), f"{self.path}: cannot be read ({e}); scheduling is off"
        try:
            raw = json.loads(text)
        except ValueError as e:
            return replace(defaults, enabled=False), (f"{self.path} is not valid JSON ({e}); defaults in use, "
                                                      "scheduling is off until the schedule is saved again")
        s, errors = settings_from_file(raw, defaults)
        if errors:
            return s, (f"{self.path}: {'; '.join(errors)}; defaults in use for "
                       f"{'that field' if len(errors) == 1 else 'those fields'}, scheduling is off until the "
                       "schedule is saved again")
        return s, None

    def save(self, settings: OperatorSettings) -> None:
        """Check, then write; a file that could not be read is kept beside it as `.bad` rather than lost."""
        check_settings(settings)
        with self._lock:
            if self.error and self.path.exists():
                os.replace(self.path, self.path.with_name(self.path.name + ".bad"))
            write_json_atomic(self.path, asdict(settings))
            self.error = None

    def update(self, **changes: Any) -> OperatorSettings:
        """Apply `changes` (checked first: a bad value raises SettingsError and writes nothing). Enabling
        scheduling without an interval or cron expression is refused: it would look on and never run."""
        with self._update_lock:
            s = apply_changes(self.load(), changes)
            if changes.get("enabled") is True and not has_schedule(s):
                raise SettingsError("scheduling cannot be enabled without a schedule: set an interval (every N "
                                    "minutes) or a cron expression, or leave scheduling off")
            self.save(s)
            return s


def write_json_atomic(path: Path, obj: Any, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
