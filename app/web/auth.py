"""Who is asking: admin HTTP basic auth for the console and its API; for the chat, a rater identity clients cannot
mint (an HMAC-signed anonymous id, or a name from a trusted sign-in proxy), the client's address, and budgets.

One ASGI middleware guards every path under the admin prefixes (the Gradio console and its own API routes live
under /admin, the JSON API under /api/admin), so no console endpoint can be reached by forgetting a decorator. On
public paths it hands out signed rater ids (a limited number per client address: ids are what per-identity limits
and the training snapshot's share caps count), refuses Gradio's file upload (the chat has no file component) and
bounds request bodies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

log = logging.getLogger("kto_loop.auth")
USER_COOKIE = "kto_uid"
ADMIN_PREFIXES = ("/admin", "/api/admin")
SECRET_FILE = "rater_id.key"
MAX_PUBLIC_BODY = 1 << 20        # bytes: a chat event is a few KiB; nothing public needs more
UPLOAD_PATHS = ("/gradio_api/upload", "/gradio_api/upload_progress")
_ANON_RE = re.compile(r"^anon-[0-9a-f]{16}$")
_SIG_HEX = 32                    # 128 bits of HMAC-SHA256
_NAME_RE = re.compile(r"^[\w.@+-]{1,128}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


# ---------------------------------------------------------------- the signing secret

def load_secret(path: Path) -> bytes:
    """The HMAC key of rater ids: made once (mode 0600) and kept, so ids survive restarts and only we can make them."""
    path = Path(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)   # all or nothing, and never over a key another process made first
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    raw = path.read_text().strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise ValueError(f"{path} is not a rater-id key (64 hex digits); delete it to make a new one "
                         "(every anonymous rater then gets a new id)")
    return key


# ---------------------------------------------------------------- client address

def parse_networks(spec: str | Iterable[str]) -> tuple[Network, ...]:
    """`"10.0.0.1, 192.168.0.0/16"` → networks; empty = none. A bad entry is an error, not silently ignored."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    try:
        return tuple(ipaddress.ip_network(s, strict=False) for s in items if s)
    except ValueError as e:
        raise ValueError(f"trusted proxy list: {e}") from None


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:          # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:                        # v4:port
        text = text.split(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def _trusted(ip: Any, networks: tuple[Network, ...]) -> bool:
    return ip is not None and any(ip.version == n.version and ip in n for n in networks)


def address_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What one client address is for limits: an IPv4 address, or an IPv6 /64 (one host gets a whole /64)."""
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The socket peer, or, when the peer is a trusted proxy, the nearest X-Forwarded-For hop that is not one.

    Hops are read right to left: each was appended by the proxy after it, so only the ones trusted proxies wrote
    can be believed; whatever the client put further left is ignored.
    """
    ip = _ip(peer)
    if ip is None:
        return peer or "unknown"
    hops = [h for line in forwarded_for for h in line.split(",") if h.strip()]
    while _trusted(ip, trusted) and hops:
        nxt = _ip(hops.pop())
        if nxt is None:
            break                                     # garbage in the chain: the last trusted hop answers for it
        ip = nxt
    return address_key(ip)


# ---------------------------------------------------------------- budgets

class TokenBuckets:
    """Per key, at most `capacity` events at once, refilled at capacity per `period` seconds (0 = no limit).

    Thread-safe and in memory; a full bucket is the same as none, so those are dropped when the table grows.
    """

    PRUNE_AT = 10_000

    def __init__(self, capacity: int, period: float = 60.0):
        self.capacity, self.period = capacity, period
        self._level: dict[str, tuple[float, float]] = {}   # key → (tokens, at)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._level.get(key, (float(self.capacity), now))
        return min(float(self.capacity), tokens + (now - at) * self.capacity / self.period)

    def allow(self, key: str, now: float | None = None) -> bool:
        """Take one token for `key` if there is one."""
        if self.capacity <= 0:
            return True
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens < 1.0:
                self._level[key] = (tokens, now)
                return False
            self._level[key] = (tokens - 1.0, now)
            if len(self._level) > self.PRUNE_AT:
                self._level = {k: v for k, v in self._level.items() if self._tokens(k, now) < self.capacity}
            return True


class StoreBuckets:
    """TokenBuckets' interface over buckets kept in the feedback store (feedback_store/limits.py), so app processes
    sharing one PostgreSQL store share each limit; times are wall-clock seconds, the one clock they share.

    Fails closed: when the store cannot be reached the event is refused (and logged), because a limit nobody can
    check would let every replica allow everything, and a chat the store cannot save is lost anyway."""

    def __init__(self, store: Any, name: str, capacity: int, period: float = 60.0):
        self.store, self.name, self.capacity, self.period = store, name, capacity, period

    def allow(self, key: str, now: float | None = None) -> bool:
        """Take one token for `key` if there is one, in the store; False when the store fails."""
        if self.capacity <= 0:
            return True
        try:
            return self.store.take_token(self.name, key, self.capacity, self.period,
                                         time.time() if now is None else now)
        except Exception as e:
            log.warning("rate limit %s refused an event: the store could not be asked (%s: %s)", self.name,
                        type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
            return False


# (limiter name, capacity, period in seconds) → an object with allow(key, now=None) -> bool
Buckets = Callable[[str, int, float], "TokenBuckets | StoreBuckets"]


def memory_buckets(name: str, capacity: int, period: float) -> TokenBuckets:
    """This process's own buckets: the embedded DuckDB store has one app process, and a chat costs no extra write."""
    return TokenBuckets(capacity, period)


def buckets_for(store: Any, shared: bool) -> Buckets:
    """The app's one choice of limiter: in the store when other processes share it (db_url), else in memory."""
    if not shared:
        return memory_buckets
    return lambda name, capacity, period: StoreBuckets(store, name, capacity, period)


# ---------------------------------------------------------------- rater identity

@dataclass(frozen=True)
class Rater:
    """Who sent a chat event: `user_id` is None when the request carries no valid identity."""
    user_id: str | None
    addr: str
    signed_in: bool = False


NO_IDENTITY = ("This browser has no valid rater id. Please reload the page (cookies must be allowed; "
               "if many new visitors came from your network recently, try again later).")


class Raters:
    """Signs and checks anonymous rater ids, honours a trusted proxy's sign-in header, limits new ids per address."""

    def __init__(self, secret: bytes, *, trusted_proxies: str | Iterable[str] = "", user_header: str = "",
                 new_ids_per_hour: int = 10, buckets: Buckets = memory_buckets):
        self._key = secret
        self.trusted = parse_networks(trusted_proxies)
        self.user_header = user_header.strip().lower()
        self.new_ids = buckets("new-ids", new_ids_per_hour, 3600.0)

    # ids
    def sign(self, uid: str) -> str:
        return f"{uid}.{self._mac(uid)}"

    def _mac(self, uid: str) -> str:
        return hmac.new(self._key, uid.encode(), hashlib.sha256).hexdigest()[:_SIG_HEX]

    def verify(self, cookie: str | None) -> str | None:
        """The anonymous id a cookie carries, or None for a missing, unsigned, forged or tampered one."""
        uid, dot, mac = (cookie or "").partition(".")
        if not dot or not _ANON_RE.match(uid) or len(mac) != _SIG_HEX:
            return None
        return uid if hmac.compare_digest(mac, self._mac(uid)) else None

    def issue(self, addr: str, now: float | None = None) -> str | None:
        """A new signed cookie value, or None when this address has had its share of new ids."""
        if not self.new_ids.allow(addr, now):
            return None
        return self.sign("anon-" + secrets.token_hex(8))

    # requests
    def identify(self, cookies: Mapping[str, str] | None, headers: Any, peer: str | None) -> Rater:
        """Who is asking: a signed-in name (trusted proxy only), else a valid signed cookie, else nobody."""
        addr = client_address(peer, _header_values(headers, "x-forwarded-for"), self.trusted)
        if self.user_header and _trusted(_ip(peer), self.trusted):
            names = _header_values(headers, self.user_header)
            name = names[-1].strip() if names else ""
            if _NAME_RE.match(name):
                return Rater(f"user:{name}", addr, signed_in=True)
        cookie = None
        if cookies is not None:
            try:
                cookie = cookies.get(USER_COOKIE)
            except Exception:
                cookie = None
        return Rater(self.verify(cookie if isinstance(cookie, str) else None), addr)

    def of_request(self, request: Any) -> Rater:
        """`identify` for a Starlette or Gradio request."""
        client = getattr(request, "client", None)
        return self.identify(getattr(request, "cookies", None), getattr(request, "headers", None),
                             getattr(client, "host", None))


def _header_values(headers: Any, name: str) -> list[str]:
    if headers is None:
        return []
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:
        return list(getlist(name))
    value = headers.get(name) if hasattr(headers, "get") else None
    return [value] if isinstance(value, str) else []


def raters_for(secret_path: Path, *, trusted_proxies: str, user_header: str, new_ids_per_hour: int,
               buckets: Buckets = memory_buckets) -> Raters:
    return Raters(load_secret(secret_path), trusted_proxies=trusted_proxies, user_header=user_header,
                  new_ids_per_hour=new_ids_per_hour, buckets=buckets)


# ---------------------------------------------------------------- the middleware

def _is_upload(path: str) -> bool:
    return any(path.rstrip("/").endswith(p) for p in UPLOAD_PATHS)


class AuthMiddleware(BaseHTTPMiddleware):
    """401 for admin paths without the admin's credentials; on public paths: no uploads, bounded bodies, and a
    signed rater id for browsers that load the chat page without a valid one."""

    def __init__(self, app, admin_user: str, admin_password: str, raters: Raters):
        super().__init__(app)
        self.admin_user, self.admin_password = admin_user, admin_password
        self.raters = raters

    async def dispatch(self, request: Request, call_next) -> Response:
        path = request.url.path
        if is_admin_path(path):
            if not check_basic(request.headers.get("authorization"), self.admin_user, self.admin_password):
                return PlainTextResponse("operator login required", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="kto-loop console"'})
            return await call_next(request)
        if _is_upload(path):
            return PlainTextResponse("file uploads are off: the chat takes text only", status_code=403)
        refused = _body_refusal(request.headers)
        if refused is not None:
            return refused
        rater = self.raters.of_request(request)
        response = await call_next(request)
        if rater.user_id is None and request.method == "GET" and path in ("/", ""):
            cookie = self.raters.issue(rater.addr)
            if cookie is not None:
                response.set_cookie(USER_COOKIE, cookie, max_age=3600 * 24 * 365, httponly=True, samesite="lax")
        return response


def _body_refusal(headers: Any) -> Response | None:
    """413/411 for public request bodies we would otherwise read into memory whole, whatever their size."""
    if "chunked" in (headers.get("transfer-encoding") or "").lower():
        return PlainTextResponse("a request body needs a Content-Length here", status_code=411)
    length = headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > MAX_PUBLIC_BODY
        except ValueError:
            return PlainTextResponse("bad Content-Length", status_code=400)
        if too_big:
            return PlainTextResponse(f"request body over {MAX_PUBLIC_BODY} bytes", status_code=413)
    return None
