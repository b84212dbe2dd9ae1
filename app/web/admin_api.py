"""The operator JSON API under /api/admin (the headless CLI's way into a running app), and the guard that keeps a
web page the operator happens to visit from driving it or the console with the browser's cached credentials.

A browser sends basic-auth credentials along with any request to the site, including a form or a `fetch` another
site makes it send (cross-site request forgery). Such a request can only be "simple" unless the target agrees to
it first (CORS preflight, which we never grant): a form's or a no-CORS fetch's content type, no custom headers.
So every admin mutation here must be non-simple and same-origin:
- `Content-Type: application/json` on every POST/PUT/PATCH/DELETE under /admin and /api/admin (the Gradio
  console's own calls are JSON already);
- the custom header ADMIN_HEADER on the JSON API as well (the CLI sends it; a browser page cannot without a
  preflight);
- an `Origin` (or `Sec-Fetch-Site`) that the browser attached must name this site: the request's Host, or the
  X-Forwarded-Host a reverse proxy set (a page cannot set that header either).
Authentication stays AuthMiddleware's job (app/web/auth.py): it runs first, so an unauthenticated request still
gets 401.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.loop.next_run import TooFewRatings
from app.loop.realign import NotCancellable, RunInProgress
from app.operator_settings import SettingsError, has_schedule
from app.web.auth import is_admin_path

ADMIN_HEADER = "X-KTO-Loop-Admin"
API_PREFIX = "/api/admin"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SCHEDULE_FIELDS = frozenset({"interval_minutes", "cron", "min_new_ratings", "max_examples", "enabled"})
_DEFAULT_PORT = {"http": 80, "https": 443}
SUMMARY_HEADER = "X-KTO-Loop-Summary"  # a streamed export's or backup's summary (JSON)
TRANSFER_DIR = "transfers"  # under DATA_DIR: exports and backups on their way to the CLI, deleted once sent
TRANSFER_MAX_AGE_S = 24 * 3600  # a transfer file older than this was abandoned


def admin_headers() -> dict[str, str]:
    """What a legitimate non-browser client (the CLI) adds to every admin request."""
    return {ADMIN_HEADER: "1"}


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"{scheme}://{netloc.strip()}")
        return (parts.hostname or "").lower(), parts.port or _DEFAULT_PORT.get(scheme)
    except ValueError:
        return None


def same_origin(origin: str, hosts: list[str]) -> bool:
    """Whether an Origin header (`scheme://host[:port]`) names one of `hosts` (Host / X-Forwarded-Host values)."""
    try:
        o = urlsplit(origin.strip())
        want = ((o.hostname or "").lower(), o.port or _DEFAULT_PORT.get(o.scheme))
    except ValueError:
        return False
    if not want[0] or o.scheme not in _DEFAULT_PORT:
        return False
    return any(_host_port(h, o.scheme) == want for h in hosts if h.strip())


def admin_refusal(method: str, path: str, headers: Mapping[str, str] | Headers) -> str | None:
    """Why this admin request must be refused as possibly forged (None: let it through). Pure; headers as sent."""
    if method.upper() in SAFE_METHODS or not is_admin_path(path):
        return None
    get = headers.get
    site = (get("sec-fetch-site") or "").strip().lower()
    if site and site not in ("same-origin", "none"):
        return f"cross-site admin request refused (Sec-Fetch-Site: {site})"
    origin = get("origin")
    if origin is not None:
        hosts = [get("host") or ""] + (get("x-forwarded-host") or "").split(",")
        if not same_origin(origin, hosts):
            return f"admin request from another origin refused (Origin: {origin[:200]})"
    ctype = (get("content-type") or "").split(";")[0].strip().lower()
    if not (ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))):
        return "admin changes need Content-Type: application/json"
    if (path == API_PREFIX or path.startswith(API_PREFIX + "/")) and not get(ADMIN_HEADER.lower()):
        return f"the operator API needs the {ADMIN_HEADER} header (the kto-loop CLI sends it)"
    return None


class AdminRequestGuard:
    """ASGI middleware: 403 for an admin mutation `admin_refusal` refuses. Add it before AuthMiddleware (so that
    authentication, added later and therefore outermost, answers first)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            why = admin_refusal(scope.get("method", "GET"), scope.get("path", ""), Headers(scope=scope))
            if why is not None:
                await PlainTextResponse(why, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def admin_router(st: Any, op: Any, scheduler: Any) -> APIRouter:
    """The /api/admin routes on a Stack (`st`), its console Operator (`op`) and RealignScheduler."""
    router = APIRouter(prefix=API_PREFIX)

    def schedule_view(s: Any) -> dict[str, Any]:
        return dataclasses.asdict(s) | {"next_run": scheduler.next_run_time(), "settings_error": st.settings.error,
                                        "scheduled": s.enabled and has_schedule(s),
                                        "backoff": scheduler.backoff_state()}

    @router.get("/stats")
    def stats() -> JSONResponse:
        return JSONResponse(_jsonable(op.summary()))

    @router.post("/align")
    def align(body: Annotated[dict | None, Body()] = None):
        body = body or {}
        try:
            msg = op.realign_now(trigger=str(body.get("trigger", "operator")))
        except RunInProgress as e:
            raise HTTPException(409, str(e)) from None
        except TooFewRatings as e:  # refused before anything is recorded or trained
            raise HTTPException(422, str(e)) from None
        run_id = st.realigner.status.run_id
        if body.get("wait") is True:
            scheduler.wait()
        return {"message": msg, "run": st.realigner.status.as_dict(), "outcome": op.run_outcome(run_id)}

    @router.get("/run")
    def run_status():
        return st.realigner.status.as_dict()

    @router.post("/cancel")
    def cancel():
        try:
            return {"message": op.cancel_run(), "run": st.realigner.status.as_dict()}
        except NotCancellable as e:
            raise HTTPException(409, str(e)) from None

    @router.get("/schedule")
    def get_schedule():
        return schedule_view(st.settings.load())

    @router.post("/schedule")
    def set_schedule(body: Annotated[dict, Body()]):
        unknown = set(body) - SCHEDULE_FIELDS
        if unknown:
            raise HTTPException(400, f"unknown schedule fields: {sorted(unknown)} (known: {sorted(SCHEDULE_FIELDS)})")
        try:
            s = scheduler.update(**body)
        except SettingsError as e:
            raise HTTPException(400, str(e)) from None
        return schedule_view(s)

    @router.post("/rollback")
    def rollback(body: Annotated[dict | None, Body()] = None):
        body = body or {}
        version = body.get("version")
        if version is not None and not isinstance(version, str):
            raise HTTPException(400, f"version must be a string, got {version!r}")
        try:
            return {"message": op.rollback(version), "served": st.registry.current()}
        except Exception as e:
            raise HTTPException(400, str(e)) from None

    @router.post("/backup")
    def backup(body: Annotated[dict | None, Body()] = None):
        """An online backup of the feedback database (`kto-loop backup`): the app holds the file, so it copies.
        Into the backup folder beside the automatic ones, or ({"download": true}) streamed back to the client,
        which writes it where it wants: the app never writes to a path a request names."""
        from feedback_store import InvalidInput, StoreError

        body = body or {}
        unknown = set(body) - {"download"}
        if unknown:
            raise HTTPException(400, f"unknown backup fields: {sorted(unknown)}; the app writes backups only to its "
                                     f"backup folder or streams them back ({{\"download\": true}})")
        try:
            if body.get("download") is True:
                tmp = _transfer_path(st, ".duckdb")
                info = st.store.backup(tmp)
                summary = {"bytes": info.bytes, "seconds": round(info.seconds, 3)}
                return _stream(tmp, summary, "application/octet-stream")
            info = st.store.backup_to_dir()
        except StoreError as e:
            raise HTTPException(400 if isinstance(e, InvalidInput) else 500, str(e)) from None
        return {"path": str(info.path), "bytes": info.bytes, "seconds": round(info.seconds, 3)}

    @router.post("/export")
    def export(body: Annotated[dict | None, Body()] = None):
        """`kto-loop export`: the final ratings as a training file, written in the data directory's transfer
        folder and streamed back (then deleted); the summary travels in the SUMMARY_HEADER header."""
        from app.cli.export import SUFFIXES, parse_since, write
        from feedback_store import InvalidInput, StoreError, UnknownAdapter

        body = body or {}
        fmt, suffix = body.get("format", "kto"), body.get("suffix", ".jsonl")
        since, limit = body.get("since"), body.get("limit")
        if fmt not in SUFFIXES:
            raise HTTPException(400, f"format must be one of {sorted(SUFFIXES)}, got {fmt!r}")
        if suffix not in SUFFIXES[fmt]:
            raise HTTPException(400, f"the {fmt} format writes {' or '.join(SUFFIXES[fmt])} files, not {suffix!r}")
        if since is not None and not isinstance(since, str):
            raise HTTPException(400, f"since must be a string, got {since!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise HTTPException(400, f"limit must be a non-negative integer, got {limit!r}")
        tmp = _transfer_path(st, suffix)
        try:
            summary = {"format": fmt, **write(st.store, fmt, tmp, parse_since(since), limit)}
        except UnknownAdapter as e:
            tmp.unlink(missing_ok=True)
            raise HTTPException(404, str(e)) from None
        except StoreError as e:
            tmp.unlink(missing_ok=True)
            raise HTTPException(400 if isinstance(e, InvalidInput) else 500, str(e)) from None
        return _stream(tmp, summary, "application/octet-stream")

    @router.get("/counts")
    def counts():
        """`kto-loop stats`: rating counts and what the next run would train on (app/loop/next_run.py)."""
        from app.cli.stats import collect

        nxt = st.realigner.next_run(st.settings.load().max_examples)
        return _jsonable(collect(st.store, nxt.as_dict(), st.settings.error))

    @router.get("/runs")
    def runs(limit: int = 20):
        """`kto-loop runs`: the newest runs, as the store records them."""
        if not 1 <= limit <= 1000:
            raise HTTPException(400, f"limit must be in [1, 1000], got {limit}")
        return _jsonable(st.store.runs(limit))

    @router.post("/forget")
    def forget(body: Annotated[dict, Body()]):
        """`kto-loop forget USER`: delete one user's conversations and ratings ({"dry_run": true}: only count them);
        the counts deleted and the runs that had learnt from them (feedback_store/forget.py)."""
        from feedback_store import StoreError

        unknown = set(body) - {"user", "dry_run"}
        if unknown:
            raise HTTPException(400, f"unknown forget fields: {sorted(unknown)}")
        user, dry_run = body.get("user"), body.get("dry_run", False)
        if not isinstance(user, str) or not user.strip() or not isinstance(dry_run, bool):
            raise HTTPException(400, "forget needs {\"user\": USER_ID, \"dry_run\": true|false}")
        try:
            return _jsonable(st.store.forget_user(user, dry_run=dry_run).as_dict())
        except StoreError as e:
            raise HTTPException(400, str(e)) from None

    @router.get("/lineage/{answer_id}")
    def lineage(answer_id: str, ancestors: bool = False):
        """`kto-loop lineage`: which ratings trained, were held out by or were dropped by the runs behind an answer."""
        from feedback_store import StoreError, UnknownAnswer, WrongDeployment

        try:
            return _jsonable(st.store.lineage_detail(answer_id, include_ancestors=ancestors))
        except (UnknownAnswer, WrongDeployment) as e:
            raise HTTPException(404, str(e)) from None
        except StoreError as e:
            raise HTTPException(400, str(e)) from None

    return router


def _transfer_path(st: Any, suffix: str) -> Path:
    """A new file in DATA_DIR/transfers for a backup or export on its way to the client (deleted once sent)."""
    d = Path(st.cfg.data_dir) / TRANSFER_DIR
    d.mkdir(parents=True, exist_ok=True)
    stale = time.time() - TRANSFER_MAX_AGE_S
    for old in d.iterdir():  # left behind by a client that went away mid-transfer
        try:
            if old.is_file() and old.stat().st_mtime < stale:
                old.unlink()
        except OSError:
            pass
    return d / f"{uuid.uuid4().hex}{suffix}"


def _stream(path: Path, summary: dict[str, Any], media_type: str) -> FileResponse:
    """Send a transfer file with its summary in a header, and delete it once sent (or the send failed)."""
    return FileResponse(path, media_type=media_type, headers={SUMMARY_HEADER: json.dumps(summary)},
                        background=BackgroundTask(lambda: path.unlink(missing_ok=True)))
