"""Operator settings that must survive restarts (schedule, system prompt), kept as one small JSON file.

The file sits in the data dir next to the DuckDB file; writes go to a temp file and are renamed into place, so
a crash never leaves half a file. Both the running app and the headless CLI use this one class.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

SETTINGS_FILE = "operator_settings.json"
RUNTIME_FILE = "app_runtime.json"


@dataclass
class OperatorSettings:
    interval_minutes: int = 0          # 0 = no interval trigger
    cron: str = ""                     # crontab expression; "" = none
    min_new_ratings: int = 50          # a scheduled run waits for this many new ratings
    max_examples: int = 2000           # newest-first cap per run
    enabled: bool = True               # pause scheduling without losing the settings
    system_prompt: str = "You are a helpful assistant."


class SettingsStore:
    """Load/save OperatorSettings atomically; defaults come from Config on first use."""

    def __init__(self, data_dir: Path, defaults: OperatorSettings):
        self.path = Path(data_dir) / SETTINGS_FILE
        self.defaults = defaults
        self._lock = threading.Lock()

    def load(self) -> OperatorSettings:
        with self._lock:
            if not self.path.exists():
                return OperatorSettings(**asdict(self.defaults))
            raw = json.loads(self.path.read_text())
            known = {f.name for f in fields(OperatorSettings)}
            merged = asdict(self.defaults) | {k: v for k, v in raw.items() if k in known}
            return OperatorSettings(**merged)

    def save(self, settings: OperatorSettings) -> None:
        with self._lock:
            write_json_atomic(self.path, asdict(settings))

    def update(self, **changes: Any) -> OperatorSettings:
        s = self.load()
        for k, v in changes.items():
            if not hasattr(s, k):
                raise KeyError(f"unknown setting {k!r}")
            setattr(s, k, v)
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
