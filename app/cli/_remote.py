"""Talk to the running app's operator API (authenticated) when it is up; the headless commands fall back to
working on the data dir directly when it is not.

The app writes DATA_DIR/app_runtime.json (mode 0600: URL, pid, admin credentials) while it runs, so an operator
on the same machine needs no extra flags. Every request carries the operator API's custom header, which a web page
cannot make a browser send: that is what tells the app an admin change comes from here and not from a forged form.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app.config import Config
from app.operator_settings import RUNTIME_FILE
from app.web.admin_api import admin_headers
from app.web.auth import basic_header


class AppNotRunning(RuntimeError):
    pass


class RemoteError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runtime_info(cfg: Config) -> dict[str, Any] | None:
    path = Path(cfg.data_dir) / RUNTIME_FILE
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return info if _alive(int(info.get("pid", -1))) else None


def _app(cfg: Config, store: bool) -> dict[str, Any]:
    """The running app's runtime record; AppNotRunning when there is none, or (`store`) when the app holds
    another database than the one this command names (then the command opens its own file)."""
    info = runtime_info(cfg)
    if info is None:
        raise AppNotRunning("the app is not running")
    if store and info.get("db_path") and cfg.db_path is not None and \
            Path(info["db_path"]) != Path(cfg.db_path).expanduser().resolve():
        raise AppNotRunning(f"the running app holds {info['db_path']}, not {cfg.db_path}")
    return info


def open_store(cfg: Config) -> Any:
    """The store as the app opens it (same location, deployment and share caps), read-only: what a command
    reads when the app is not running, so it prints what the app would have answered."""
    from feedback_store import FeedbackStore

    return FeedbackStore(cfg.store_location, deployment=cfg.deployment, read_only=True,
                         max_user_share=cfg.max_user_share or None, max_addr_share=cfg.max_addr_share or None)


def _headers(cfg: Config, info: dict[str, Any]) -> dict[str, str]:
    # JSON body (httpx sets the content type) plus the admin header: what the app's forgery guard asks of a
    # mutation (app/web/admin_api.py); GETs carry them too, harmlessly.
    password = cfg.admin_password or info.get("admin_password", "")
    return {"Authorization": basic_header(cfg.admin_user, password), "Content-Type": "application/json",
            **admin_headers()}


def _refusal(r: httpx.Response) -> RemoteError:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return RemoteError(r.status_code, f"{r.status_code}: {detail}")


def call(cfg: Config, method: str, path: str, body: dict | None = None, timeout: float = 30.0, *,
         params: dict | None = None, store: bool = False) -> dict[str, Any]:
    """One authenticated request to the running app; AppNotRunning when there is none."""
    info = _app(cfg, store)
    try:
        r = httpx.request(method, info["url"] + path, json=body, params=params, headers=_headers(cfg, info),
                          timeout=timeout)
    except httpx.ConnectError:
        raise AppNotRunning(f"the app at {info['url']} does not answer") from None
    if r.status_code >= 400:
        raise _refusal(r)
    return r.json()


def read(cfg: Config, command: str, path: str, offline: Callable[[Any], Any], *,
         params: dict | None = None) -> Any:
    """A read-only command's answer: from the running app's admin API, else `offline(store)` on the store opened
    read-only, as JSON either way so both print the same; None (the reason printed) when neither can answer."""
    from feedback_store import StoreError

    try:
        return call(cfg, "GET", path, params=params, store=True)
    except RemoteError as e:
        print(f"kto-loop {command}: {e}", file=sys.stderr)
        return None
    except AppNotRunning:
        pass
    try:
        with open_store(cfg) as store:
            return json.loads(json.dumps(offline(store), default=str))
    except StoreError as e:
        print(f"kto-loop {command}: {e}", file=sys.stderr)
        return None


def download(cfg: Config, path: str, body: dict, dest: Path, summary_header: str, *, overwrite: bool = False,
             timeout: float = 3600.0) -> dict[str, Any]:
    """POST to the running app and stream the file it answers with into `dest` (written under a temporary name,
    renamed into place once complete; an existing `dest` is replaced only with `overwrite`). Returns the JSON
    summary the app sends in `summary_header`, checked against the bytes received when it names their sha256."""
    info = _app(cfg, True)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with httpx.stream("POST", info["url"] + path, json=body, headers=_headers(cfg, info),
                          timeout=timeout) as r:
            if r.status_code >= 400:
                r.read()
                raise _refusal(r)
            summary = json.loads(r.headers.get(summary_header, "{}"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
        if summary.get("sha256") and summary["sha256"] != digest.hexdigest():
            raise RemoteError(502, f"the file received from the app does not match its sha256 ({summary['sha256']})")
        if overwrite:
            os.replace(tmp, dest)
        else:
            _place(tmp, dest)
    except httpx.ConnectError:
        raise AppNotRunning(f"the app at {info['url']} does not answer") from None
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def _place(tmp: Path, dest: Path) -> None:
    """Move a finished download into place, never over an existing file (a hard link fails if dest exists)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise FileExistsError(f"{dest} already exists; it is never overwritten") from None
    except OSError:  # a filesystem without hard links
        if dest.exists():
            raise FileExistsError(f"{dest} already exists; it is never overwritten") from None
        os.replace(tmp, dest)
