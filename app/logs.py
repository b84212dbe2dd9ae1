"""The app's log output: plain lines (`log_format = text`, Python's default) or one JSON object per line (`json`).

`configure_logging` is called by the `kto-loop` entry and by `serve`; `say` is the start-up line both formats
share, so a log collector reading JSON gets every line the app writes on stderr as JSON. vLLM's own log is a
file of its own (DATA_DIR/vllm.log) and is not touched here.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# The attributes every LogRecord has; anything else on a record came from `extra=` and is written as a field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, so a collector never has to join lines of a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in out:
                out[key] = value
        return json.dumps(out, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so a handler installed once never holds a replaced (closed) stream."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_installed: logging.Handler | None = None
_level_before = logging.WARNING


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Install (json) or remove (text) the app's JSON handler on the root logger; calling it again is harmless."""
    global _installed, _level_before
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        root.setLevel(_level_before)
        _installed = None
    if log_format != "json":
        return  # text: Python's default, warnings and errors as plain lines, as before this setting existed
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    _level_before = root.level
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler


def json_logging() -> bool:
    """Whether configure_logging installed the JSON handler."""
    return _installed is not None


def say(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A start-up line for the operator: "kto-loop: …" on stderr, or a JSON record of logger kto_loop with `fields`."""
    if _installed is not None:
        logging.getLogger("kto_loop").log(level, message, extra=fields)
    else:
        print(f"kto-loop: {message}", file=sys.stderr, flush=True)


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """uvicorn's `log_config`: its own text setup, or with JSON its loggers without handlers of their own and
    propagating, so they reach the root's JSON handler even where a text setup ran before in this process."""
    from uvicorn.config import LOGGING_CONFIG

    if log_format != "json":
        return LOGGING_CONFIG
    plain = {"handlers": [], "propagate": True}
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {"uvicorn": plain, "uvicorn.error": plain, "uvicorn.access": plain}}
