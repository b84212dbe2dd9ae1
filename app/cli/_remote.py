"""Talk to the running app's operator API (authenticated) when it is up; the headless commands fall back to
working on the data dir directly when it is not.

The app writes DATA_DIR/app_runtime.json (mode 0600: URL, pid, admin credentials) while it runs, so an operator
on the same machine needs no extra flags. Every request carries the operator API's custom header, which a web page
cannot make a browser send: that is what tells the app an admin change comes from here and not from a forged form.
"""

from __future__ import annotations

import json
import os
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


def call(cfg: Config, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """One authenticated request to the running app; AppNotRunning when there is none."""
    info = runtime_info(cfg)
    if info is None:
        raise AppNotRunning("the app is not running")
    password = cfg.admin_password or info.get("admin_password", "")
    # JSON body (httpx sets the content type) plus the admin header: what the app's forgery guard asks of a
    # mutation (app/web/admin_api.py); GETs carry them too, harmlessly.
    headers = {"Authorization": basic_header(cfg.admin_user, password), "Content-Type": "application/json",
               **admin_headers()}
    try:
        r = httpx.request(method, info["url"] + path, json=body, headers=headers, timeout=timeout)
    except httpx.ConnectError:
        raise AppNotRunning(f"the app at {info['url']} does not answer") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise RemoteError(r.status_code, f"{r.status_code}: {detail}")
    return r.json()
