"""Who is asking: admin HTTP basic auth for the console and its API, a stable anonymous id for chat users.

One ASGI middleware guards every path under the admin prefixes (the Gradio console and its own API routes live
under /admin, the JSON API under /api/admin), so no console endpoint can be reached by forgetting a decorator.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
import threading
import time
from collections import deque

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

USER_COOKIE = "kto_uid"
ADMIN_PREFIXES = ("/admin", "/api/admin")
_UID_RE = re.compile(r"^anon-[0-9a-f]{16}$")


def new_password() -> str:
    return secrets.token_urlsafe(12)


def check_basic(header: str | None, user: str, password: str) -> bool:
    """Constant-time check of an `Authorization: Basic ...` header."""
    if not header or not header.lower().startswith("basic ") or not password:
        return False
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return False
    got_user, _, got_pw = raw.partition(":")
    return hmac.compare_digest(got_user.encode(), user.encode()) & hmac.compare_digest(
        got_pw.encode(), password.encode())


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def is_admin_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in ADMIN_PREFIXES)


def user_id_from_cookie(value: str | None) -> str | None:
    return value if value and _UID_RE.match(value) else None


class AuthMiddleware(BaseHTTPMiddleware):
    """401 for admin paths without the admin's credentials; sets the anonymous-user cookie everywhere else."""

    def __init__(self, app, admin_user: str, admin_password: str):
        super().__init__(app)
        self.admin_user, self.admin_password = admin_user, admin_password

    async def dispatch(self, request: Request, call_next) -> Response:
        if is_admin_path(request.url.path):
            if not check_basic(request.headers.get("authorization"), self.admin_user, self.admin_password):
                return PlainTextResponse("operator login required", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="kto-loop console"'})
            return await call_next(request)
        uid = user_id_from_cookie(request.cookies.get(USER_COOKIE))
        response = await call_next(request)
        if uid is None and request.method == "GET" and request.url.path in ("/", ""):
            response.set_cookie(USER_COOKIE, "anon-" + secrets.token_hex(8), max_age=3600 * 24 * 365,
                                httponly=True, samesite="lax")
        return response


class RateLimiter:
    """At most `limit` events per user in any sliding `window` seconds (thread-safe, in memory)."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._events.setdefault(key, deque())
            while q and now - q[0] >= self.window:
                q.popleft()
            if self.limit > 0 and len(q) >= self.limit:
                return False
            q.append(now)
            return True
