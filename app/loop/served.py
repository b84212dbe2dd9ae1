"""What is served: the store is the record and the adapter registry (vLLM's pointer) follows it. A promotion is
written around the switch (store "promoting" → registry switch → store "promoted"), a rollback is undone when the
store cannot record it, and on start or after a vLLM restart `reconcile` makes vLLM serve what the store says.

Several app processes sharing one PostgreSQL store (docs/deploy.md, "Several app replicas") each serve through
their own vLLM and registry: `follow` runs `reconcile` whenever the store names another version than this process
serves (one process promoted or rolled back), taking the version's files from the path the store records. With a
shared store, reconcile never aborts a promotion in progress (another process may be making it; the leader lease
clears a dead one's, feedback_store/lease.py) and never records a fallback: one process that cannot load a version
must not change what all of them serve."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BASE = "base"
Check = Callable[[str, str], tuple[bool, str]]
# held while this process switches (promote, rollback): between the registry's switch and the store's record the
# two disagree, and `follow` must not read that as another process's change and switch back
_SWITCHING = threading.Lock()


class ServingError(RuntimeError):
    """A promotion or rollback could not be recorded in the store (or undone); the message says what serves now."""


def sha256_of(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    with open(Path(adapter_dir) / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _name(v: Any) -> str:
    return str(getattr(v, "name", v))


def promote(store: Any, registry: Any, adapter_dir: Path, *, parent: str | None, run_id: str | None,
            check: Check | None = None, reason: str = "passed the held-out gate") -> str:
    """Load `adapter_dir` as a new version and serve it, recorded in the store before and after the switch.

    Raises the registry's errors (nothing switched) or ServingError: the store could not record the promotion,
    and serving is (or, if switching back failed too, will be at the next start) what the store says."""
    with _SWITCHING:
        return _promote(store, registry, adapter_dir, parent=parent, run_id=run_id, check=check, reason=reason)


def _promote(store: Any, registry: Any, adapter_dir: Path, *, parent: str | None, run_id: str | None,
             check: Check | None, reason: str) -> str:
    before = registry.current()
    store_error: list[BaseException] = []
    reserve = getattr(registry, "reserve", None)
    if reserve is not None:  # names another process (or a lost registry file) gave out are never given again
        reserve(str(a["version"]) for a in store.adapters())

    def check_and_record(name: str, served: str) -> tuple[bool, str]:
        ok, why = check(name, served) if check is not None else (True, "")
        if not ok:
            return ok, why
        try:  # after the candidate passed every check, before the switch
            path = getattr(registry, "path_of", lambda v: None)(name) or adapter_dir
            store.register_adapter(name, str(path), sha256_of(adapter_dir), parent if parent != BASE else None, run_id)
            store.begin_promotion(name, reason)
        except Exception as e:
            store_error.append(e)
            raise
        return ok, why

    try:
        version = _name(registry.promote(adapter_dir, check=check_and_record))
    except Exception:
        if store_error:
            raise ServingError(f"not promoted: the store could not record the new version ({store_error[0]}); "
                               f"still serving {before}") from store_error[0]
        raise
    try:
        store.mark_promoted(version, reason=reason)
    except Exception as e:
        _undo(store, registry, version, before, e)
    return version


def _undo(store: Any, registry: Any, version: str, before: str, error: Exception) -> None:
    """`version` serves but the store could not say so: switch back, close the pending record, raise."""
    try:
        registry.rollback(before)
    except Exception as e2:
        raise ServingError(f"{version} is serving but the store could not record it ({error}), and switching back to "
                           f"{before} failed ({e2}); the next start serves what the store says") from error
    try:
        store.abort_promotion(version, reason=f"could not be recorded as served: {error}")
    except Exception as e3:
        raise ServingError(f"{version} could not be recorded as served ({error}); serving {before} again, and its "
                           f"pending promotion could not be closed ({e3}): the next start closes it") from error
    raise ServingError(f"{version} could not be recorded as served ({error}); serving {before} again") from error


def rollback(store: Any, registry: Any, version: str | None = None, reason: str = "operator") -> tuple[str, str]:
    """Serve `version` (default: the previous one) again, recorded in the store; returns (before, after).

    The registry's refusals (unknown version, files gone) raise as they are; a store that cannot record the
    rollback raises ServingError after switching back, so serving and the store still agree."""
    with _SWITCHING:
        return _rollback(store, registry, version, reason)


def _rollback(store: Any, registry: Any, version: str | None, reason: str) -> tuple[str, str]:
    before = registry.current()
    if version and version != BASE and getattr(registry, "path_of", lambda v: None)(version) is None:
        record = next((a for a in store.adapters() if a.get("version") == version), None)
        if record is not None and record.get("path") and hasattr(registry, "adopt"):
            # another app process promoted it (a shared store), or this registry's file was lost: its files and
            # sha256 are on record
            registry.adopt(version, record["path"], sha256=record.get("sha256"))
    after = _name(registry.rollback(version or None) or registry.current())
    try:
        store.record_rollback(before, after, reason=reason)
    except Exception as e:
        try:
            registry.rollback(before)
        except Exception as e2:
            raise ServingError(f"serving {after}, but the store could not record the rollback ({e}) and switching "
                               f"back to {before} failed ({e2}); the next start serves what the store says") from e
        raise ServingError(f"rollback to {after} not done: the store could not record it ({e}); "
                           f"still serving {before}") from e
    return before, after


def fallback_order(events: Sequence[dict[str, Any]], want: str) -> list[str]:
    """`want`, then the versions that served before it (newest first), then the base model (first when wanted: an
    operator's rollback to it must never turn into serving an adapter again)."""
    order = [want]
    for e in reversed(events):
        v = e.get("to_version")
        if e.get("event") in ("promoted", "rollback") and v and v not in order and v != BASE:
            order.append(v)
    return order if want == BASE else order + [BASE]


def _serve(registry: Any, version: str, store: Any = None) -> None:
    """Make the registry serve `version`, loading it into vLLM when needed; raises when it cannot. With `store`
    (shared), a version this registry does not know is adopted from the path and sha256 the store records."""
    if registry.current() == version:
        return
    if version != BASE and getattr(registry, "path_of", lambda v: None)(version) is None:
        record = next((a for a in store.adapters() if a.get("version") == version), None) if store else None
        if record is None or not record.get("path") or not hasattr(registry, "adopt"):
            raise LookupError(f"{version} is not in the adapter registry")
        registry.adopt(version, record["path"], sha256=record.get("sha256"))
    registry.rollback(version)


def reconcile(store: Any, registry: Any, *, shared: bool = False) -> list[str]:
    """Bring vLLM to what the store says is served; returns what was changed, one line each.

    A promotion the app stopped in the middle of is aborted (the store never committed it). If the store's version
    cannot be served (its files are gone), the versions served before it are tried, then the base
    model, and the fallback is recorded in the store. `shared`: other app processes use the store too (see the
    module's docstring): pending promotions are left alone, unknown versions adopted, a fallback only logged."""
    notes: list[str] = []
    reload = getattr(registry, "reload_after_restart", None)
    if reload is not None:
        reload()  # a fresh server holds no adapters: load the registry's current and previous
    for v in [] if shared else store.pending_promotions():  # never committed, so never served
        store.abort_promotion(v, reason="interrupted: the store never recorded it as served")
        notes.append(f"aborted the interrupted promotion of {v}")
    want = store.current_adapter()
    failed: list[str] = []
    for target in fallback_order(store.adapter_events(), want):
        was = registry.current()
        try:
            _serve(registry, target, store if shared else None)
        except Exception as e:
            failed.append(f"{target}: {e}")
            log.error("cannot serve %s: %s", target, e)
            continue
        if was != target:
            notes.append(f"serving {target} (the registry had {was})")
        if target != want and shared:
            notes.append(f"serving {target} here, not {want} as the store says: {'; '.join(failed)}")
        elif target != want:
            store.record_rollback(want, target, reason=f"fallback: {'; '.join(failed)}")
            notes.append(f"fell back from {want} to {target}: {'; '.join(failed)}")
        for note in notes:
            log.warning("served adapter: %s", note)
        return notes
    raise ServingError(f"nothing can be served: {'; '.join(failed)}")


def follow(store: Any, registry: Any) -> list[str]:
    """Serve what the shared store says when another process promoted or rolled back (reconcile, shared); what
    changed. Skipped while this process is switching itself: the next check sees the store's final word."""
    if not _SWITCHING.acquire(blocking=False):
        return []
    try:
        if registry.current() == store.current_adapter():
            return []
        return reconcile(store, registry, shared=True)
    finally:
        _SWITCHING.release()
