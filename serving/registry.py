"""Versioned LoRA adapters on a running vLLM server: validate, load under a new name, warm, switch, roll back.

vLLM refuses a name twice and an in-place reload would change an answer mid-stream, so each version `kto-vN` is
loaded once under its own name; requests ask `current()`, so one started on kto-v6 ends on it. The pointer lives
in a JSON state file replaced atomically. Validation: every lora_A/lora_B pair must fit a module of the served
model (safetensors header shapes); a local base directory named by the adapter must agree on `_ARCH_KEYS`
(hub names are not compared); pickle files anywhere are refused (vLLM would unpickle a `.bin`).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serving.model_fetch import sha256_file
from serving.server import auth_header, request_priority

log = logging.getLogger(__name__)

_WEIGHTS = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_ARCH_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "vocab_size")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class InvalidAdapter(ValueError):
    """The adapter directory cannot be served (the message says why); nothing was changed."""


class AdapterRejected(RuntimeError):
    """A promotion check (e.g. the capability guard) refused the loaded, warmed version; `current` is unchanged."""


class AdapterLoadError(RuntimeError):
    """vLLM failed to load or answer with the adapter; the previous `current` keeps serving."""


@dataclass(frozen=True)
class AdapterInfo:
    path: str
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None
    weights_file: str
    sha256: str
    size_bytes: int


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte little-endian length + JSON), without reading data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError("header too large")
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _model_shapes(model_dir: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        shapes.update(_safetensors_shapes(f))
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.name} is missing in {path.parent}") from None
    except (OSError, ValueError) as e:
        raise InvalidAdapter(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidAdapter(f"{path} is not a JSON object")
    return data


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AdapterRegistry:
    """`current()` is the model name chat requests use ("base" until a version is promoted).

    `base_url` may be a URL or an object with `.base_url` (a VLLMServer). `state_path` may be the JSON state file
    or a directory: then the state is `DIR/registry.json` and promoted adapters are copied to `DIR/kto-vN/`
    (so a later training run cannot overwrite a served version's files).
    """

    def __init__(self, base_url: Any, state_path: Path | str, max_lora_rank: int = 16,
                 base_model_dir: Path | str | None = None, name_prefix: str = "kto-v",
                 store_dir: Path | str | None = None, http_timeout: float = 300.0,
                 warm_priority: int | None = None, api_key: str | None = None):
        self._server = None if isinstance(base_url, str) else base_url
        if api_key is None:  # a VLLMServer's own key
            api_key = getattr(self._server, "api_key", None)
        self._headers = auth_header(api_key)
        self._base_url = base_url.rstrip("/") if isinstance(base_url, str) else None
        state_path = Path(state_path)
        if state_path.suffix != ".json":
            store_dir = store_dir or state_path
            state_path = state_path / "registry.json"
        self.state_path = state_path
        self.store_dir = Path(store_dir) if store_dir else None
        self.max_lora_rank = max_lora_rank
        if base_model_dir is None and self._server is not None:
            base_model_dir = getattr(getattr(self._server, "spec", None), "model_dir", None)
        self.base_model_dir = Path(base_model_dir) if base_model_dir else None
        if warm_priority is None:  # ahead of the chats (priority 0) queued on a busy server
            warm_priority = request_priority(self._server, "warm_up")
        self.warm_priority = warm_priority
        self.name_prefix = name_prefix
        self.http_timeout = http_timeout
        self._lock = threading.RLock()
        self._state = self._load_state()
        self._replicas: tuple[str, ...] = tuple(getattr(self._server, "replicas", ()) or ())

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self._base_url or self._server.base_url.rstrip("/")

    def _load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
        else:
            state = {}
        state.setdefault("current", None)
        state.setdefault("previous", None)
        state.setdefault("next_number", 1)
        state.setdefault("versions", {})
        state.setdefault("events", [])
        return state

    def _save(self) -> None:
        self._state["events"] = self._state["events"][-200:]
        _atomic_write_json(self.state_path, self._state)

    def _event(self, kind: str, **fields: Any) -> None:
        self._state["events"].append({"event": kind, "at": time.time(), **fields})

    def current(self) -> str:
        return self._state["current"] or "base"

    def previous(self) -> str | None:
        return self._state["previous"]

    def versions(self) -> list[dict[str, Any]]:
        """Every version ever registered (oldest first), with its path, sha256, status and pointers."""
        out = []
        for name, v in sorted(self._state["versions"].items(), key=lambda kv: kv[1].get("number", 0)):
            out.append({"name": name, **v, "current": name == self._state["current"],
                        "previous": name == self._state["previous"]})
        return out

    def path_of(self, version: str) -> str | None:
        v = self._state["versions"].get(version)
        return v["path"] if v else None

    def events(self) -> list[dict[str, Any]]:
        """Promotions, rollbacks and load failures (the app copies these into its store)."""
        return list(self._state["events"])

    # -- validation ----------------------------------------------------------------------------------------
    def validate(self, adapter_dir: Path | str) -> AdapterInfo:
        """Refuse what vLLM cannot serve (or would serve wrongly) before touching the server."""
        d = Path(adapter_dir)
        if not d.is_dir():
            raise InvalidAdapter(f"adapter directory {d} does not exist")
        cfg = _read_json(d / "adapter_config.json")
        weights = _safetensors_weights(d)
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise InvalidAdapter(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be served")
        if cfg.get("modules_to_save"):
            raise InvalidAdapter(f"modules_to_save={cfg['modules_to_save']!r} is not supported by vLLM "
                                 "(train with modules_to_save=None)")
        if cfg.get("use_dora"):
            raise InvalidAdapter("DoRA adapters (use_dora=true) are not supported by vLLM")
        if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
            raise InvalidAdapter(f"bias={cfg.get('bias')!r} is not supported by vLLM (need bias='none')")
        rank = cfg.get("r")
        if not isinstance(rank, int) or rank <= 0:
            raise InvalidAdapter(f"invalid LoRA rank r={rank!r}")
        ranks = [rank, *[int(r) for r in (cfg.get("rank_pattern") or {}).values()]]
        if max(ranks) > self.max_lora_rank:
            raise InvalidAdapter(f"LoRA rank {max(ranks)} exceeds the server's --max-lora-rank "
                                 f"{self.max_lora_rank}")
        targets = cfg.get("target_modules")
        if not targets:
            raise InvalidAdapter("adapter_config.json has no target_modules")
        base_name = cfg.get("base_model_name_or_path")
        self._check_base(d, base_name, weights)
        return AdapterInfo(path=str(d.resolve()), rank=rank, alpha=float(cfg.get("lora_alpha", rank)),
                           target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
                           base_model=base_name, weights_file=weights.name, sha256=sha256_file(weights),
                           size_bytes=weights.stat().st_size)

    def _check_base(self, d: Path, base_name: str | None, weights: Path) -> None:
        if self.base_model_dir is None:
            return
        served_cfg = _read_json(self.base_model_dir / "config.json")
        names = [base_name]
        if (d / "manifest.json").is_file():
            man = _read_json(d / "manifest.json")
            hp = man.get("hyperparameters") if isinstance(man.get("hyperparameters"), dict) else {}
            names += [man.get("model_dir"), man.get("base_model"), hp.get("model_dir"), hp.get("base_model")]
        for name in filter(None, names):
            other = Path(str(name)).expanduser()
            if not (other / "config.json").is_file() or other.resolve() == self.base_model_dir.resolve():
                continue
            theirs = _read_json(other / "config.json")
            diff = [k for k in _ARCH_KEYS if k in served_cfg and theirs.get(k) != served_cfg.get(k)]
            if diff:
                raise InvalidAdapter(f"adapter was trained on {other}, which differs from the served model "
                                     f"{self.base_model_dir} in {', '.join(diff)}")
        try:
            lora = _safetensors_shapes(weights)
            base = _model_shapes(self.base_model_dir)
        except (OSError, ValueError, struct.error) as e:
            raise InvalidAdapter(f"cannot read tensor shapes: {e}") from None
        if not base:
            return
        pairs: dict[str, dict[str, list[int]]] = {}
        for key, shape in lora.items():
            m = _LORA_KEY.match(key)
            if m:
                pairs.setdefault(m["module"], {})[m["ab"]] = shape
        if not pairs:
            raise InvalidAdapter(f"{weights.name} holds no lora_A/lora_B weights")
        for module, ab in pairs.items():
            w = base.get(module + ".weight")
            if w is None:
                raise InvalidAdapter(f"adapter targets {module}, which the served model "
                                     f"{self.base_model_dir.name} does not have (different base model?)")
            out_f, in_f = w[0], w[-1]
            if "A" in ab and ab["A"][-1] != in_f or "B" in ab and ab["B"][0] != out_f:
                raise InvalidAdapter(f"adapter shapes for {module} (A {ab.get('A')}, B {ab.get('B')}) do not fit "
                                     f"the served model's {w} (different base model?)")

    # -- server calls --------------------------------------------------------------------------------------
    def _targets(self) -> list[str]:
        """Where a version must be loaded before it is served: the one server, or every replica in service."""
        if not self._replicas:
            return [self.base_url]
        try:
            targets = self._server.in_service()
        except (RuntimeError, httpx.HTTPError, ValueError) as e:
            raise AdapterLoadError(f"could not ask the router which replicas are in service: {e}") from e
        if not targets:
            raise AdapterLoadError("no vLLM replica is in service behind the router")
        return targets

    def _on_each(self, targets: list[str], fn: Callable[[str], Any]) -> list[Any]:
        """fn(url) on every target at once; AdapterLoadError naming each one that failed."""
        if len(targets) == 1:
            return [fn(targets[0])]
        with cf.ThreadPoolExecutor(len(targets)) as pool:
            futures = {url: pool.submit(fn, url) for url in targets}
        errors = {url: f.exception() for url, f in futures.items() if f.exception() is not None}
        if errors:
            raise AdapterLoadError("; ".join(f"{url}: {e}" for url, e in errors.items()))
        return [f.result() for f in futures.values()]

    def _load_on_server(self, name: str, path: str, targets: list[str] | None = None) -> None:
        self._on_each(targets or self._targets(), lambda url: self._load_one(url, name, path))

    def _load_one(self, url: str, name: str, path: str) -> None:
        try:
            r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                           headers=self._headers, timeout=self.http_timeout)
        except httpx.HTTPError as e:
            raise AdapterLoadError(f"could not reach vLLM at {url} to load {name}: {e}") from e
        if r.status_code != 200:
            raise AdapterLoadError(f"vLLM refused to load {name} from {path} (HTTP {r.status_code}, {url}): "
                                   f"{_error_message(r)}")

    def _warm(self, name: str, targets: list[str] | None = None) -> float:
        """One tiny request on each server so the first user of the version does not pay for the adapter's first
        use; returns the slowest.

        A raw one-word completion, not a chat: the chat template would add ~30 prompt tokens to prefill, which
        under load costs a scheduler step's worth of time on CPU before the pointer can switch. On a server with
        priority scheduling it asks for `warm_priority` (-1), so it does not wait behind a burst of new chats.
        """
        return max(self._on_each(targets or self._targets(), lambda url: self._warm_one(url, name)))

    def _warm_one(self, url: str, name: str) -> float:
        t0 = time.monotonic()
        body: dict[str, Any] = {"model": name, "prompt": "Hi", "max_tokens": 1, "temperature": 0.0}
        if self.warm_priority is not None:
            body["priority"] = self.warm_priority
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, headers=self._headers, timeout=self.http_timeout)
        except httpx.HTTPError as e:
            raise AdapterLoadError(f"warm-up request on {name} at {url} failed: {e}") from e
        if r.status_code != 200:
            raise AdapterLoadError(f"warm-up request on {name} at {url} failed (HTTP {r.status_code}): "
                                   f"{_error_message(r)}")
        return time.monotonic() - t0

    def loaded_on(self, url: str) -> list[str]:
        r = httpx.get(f"{url}/v1/models", headers=self._headers, timeout=30)
        r.raise_for_status()
        return [m["id"] for m in r.json().get("data", [])]

    def loaded(self) -> list[str]:
        """Names any server holds (a replica that is down cannot say: the others must, or this raises)."""
        if not self._replicas:
            return self.loaded_on(self.base_url)
        names: set[str] = set()
        answered = 0
        for url in self._replicas:
            try:
                names.update(self.loaded_on(url))
                answered += 1
            except httpx.HTTPError:
                continue
        if not answered:
            raise httpx.ConnectError(f"no vLLM replica answered /v1/models ({', '.join(self._replicas)})")
        return sorted(names)

    # -- operations ----------------------------------------------------------------------------------------
    def promote(self, adapter_dir: Path | str,
                check: Callable[[str, str], tuple[bool, str]] | None = None) -> str:
        """Validate, load as a new version, warm, run `check(new_name, current)` if given, then switch `current`
        (old current becomes `previous`).

        Raises InvalidAdapter, AdapterLoadError or AdapterRejected (the check said no, or failed); in every case
        `current` is unchanged and still serving. A refused version keeps its name (vLLM cannot forget it).
        """
        info = self.validate(adapter_dir)
        with self._lock:
            self.sync_replicas()  # a replica that died since the last check leaves the router, not the swap undone
            number = self._state["next_number"]
            try:  # a lost state file must not make us reuse a name the running server already knows
                taken = set(self.loaded())
            except httpx.HTTPError as e:
                raise AdapterLoadError(f"could not reach vLLM at {self.base_url}: {e}") from e
            while f"{self.name_prefix}{number}" in taken or f"{self.name_prefix}{number}" in self._state["versions"]:
                number += 1
            name = f"{self.name_prefix}{number}"
            self._state["next_number"] = number + 1
            path = info.path
            if self.store_dir is not None:
                path = str(self._copy_in(Path(info.path), name))
            self._state["versions"][name] = {"number": number, "path": path, "sha256": info.sha256,
                                             "rank": info.rank, "source": info.path, "status": "loading",
                                             "created_at": time.time()}
            self._save()
            t0 = time.monotonic()
            try:
                targets = self._targets()
                self._load_on_server(name, path, targets)
                load_s = time.monotonic() - t0
                warm_s = self._warm(name, targets)
            except AdapterLoadError as e:
                self._state["versions"][name]["status"] = "load_failed"
                self._state["versions"][name]["error"] = str(e)
                self._event("load_failed", version=name, error=str(e), serving=self.current())
                self._save()
                raise
            v = self._state["versions"][name]
            v.update(load_s=round(load_s, 3), warm_s=round(warm_s, 3))
            if check is not None:
                try:
                    ok, why = check(name, self.current())
                except Exception as e:  # a broken check must not promote, nor take the server down
                    ok, why = False, f"not promoted: the promotion check failed: {e}"
                if not ok:
                    v.update(status="rejected", error=why)
                    self._event("rejected", version=name, reason=why, serving=self.current())
                    self._save()
                    raise AdapterRejected(why)
                v["check"] = why
            v.update(status="served", promoted_at=time.time())
            self._switch(name, "promote")
            return name

    def rollback(self, version: str | None = None) -> str:
        """Serve `version` (default: the previous one; "base" = no adapter) again; returns the name now served."""
        with self._lock:
            target = version or self._state["previous"]
            if not target:
                raise InvalidAdapter("nothing to roll back to: no previous version")
            if target == self.current():
                raise InvalidAdapter(f"{target} is already being served")
            if target != "base":
                v = self._state["versions"].get(target)
                if v is None:
                    known = ", ".join(self._state["versions"]) or "none"
                    raise InvalidAdapter(f"unknown version {target!r} (known: {known})")
                if v.get("status") == "load_failed":
                    raise InvalidAdapter(f"{target} never loaded successfully: {v.get('error')}")
                self._ensure_loaded(target)
            self._switch(target, "rollback")
            return target

    def adopt(self, name: str, adapter_dir: Path | str, sha256: str | None = None) -> str:
        """Register a version another app process promoted (they share the feedback store, which records its path
        and sha256), under that process's name: validated, its weights checked against `sha256`, copied in like a
        promoted one. Loading and warming happen when it is served (`rollback(name)`). InvalidAdapter if the
        files are unusable or differ, or if this registry gave the same name to another adapter that vLLM still
        holds (vLLM cannot load a second adapter under a name)."""
        info = self.validate(adapter_dir)
        if sha256 and info.sha256 != sha256:
            raise InvalidAdapter(f"the weights of {name} in {adapter_dir} are not the ones recorded for it "
                                 f"(sha256 {info.sha256[:12]}…, recorded {sha256[:12]}…)")
        with self._lock:
            have = self._state["versions"].get(name)
            if have is not None and have.get("sha256") == info.sha256:
                return name
            if have is not None:  # our own candidate that never served (refused, say), named the same elsewhere
                if name in (self._state["current"], self._state["previous"]) or name in self.loaded():
                    raise InvalidAdapter(f"{name} is another adapter here ({have.get('status')}, loaded in this "
                                         f"process's vLLM): restart this app process to serve the recorded {name}")
            m = re.fullmatch(re.escape(self.name_prefix) + r"(\d+)", name)
            number = int(m.group(1)) if m else 0
            path = str(self._copy_in(Path(info.path), name)) if self.store_dir is not None else info.path
            self._state["versions"][name] = {"number": number, "path": path, "sha256": info.sha256,
                                             "rank": info.rank, "source": info.path, "status": "adopted",
                                             "created_at": time.time()}
            self._state["next_number"] = max(self._state["next_number"], number + 1)
            self._event("adopted", version=name, source=info.path)
            self._save()
            return name

    def reserve(self, names: Any) -> None:
        """Never give out these names (versions another process, or a lost state file, already used)."""
        pattern = re.compile(re.escape(self.name_prefix) + r"(\d+)")
        top = max((int(m.group(1)) for n in names if (m := pattern.fullmatch(str(n)))), default=0)
        with self._lock:
            if top >= self._state["next_number"]:
                self._state["next_number"] = top + 1
                self._save()

    def reload_after_restart(self) -> list[str]:
        """Load current and previous into a (fresh) server. If current cannot be loaded, fall back to previous,
        then to base, so chat keeps working; the failure is recorded. Returns the names loaded."""
        with self._lock:
            done = []
            for role in ("current", "previous"):
                name = self._state[role]
                if not name or name == "base":
                    continue
                try:
                    self._ensure_loaded(name)
                    done.append(name)
                except (AdapterLoadError, InvalidAdapter, httpx.HTTPError) as e:
                    log.error("reloading %s %s after restart failed: %s", role, name, e)
                    self._event("reload_failed", version=name, role=role, error=str(e))
                    self._state[role] = None
            if self._state["current"] is None and self._state["previous"]:
                self._state["current"], self._state["previous"] = self._state["previous"], None
                self._event("fallback", version=self._state["current"])
            self._save()
            return done

    def sync_replicas(self) -> dict[str, str]:
        """Keep every replica behind the router able to answer for current and previous: one that is down is taken
        out of the router's list; one that is up but lacks either version (it restarted, or joins) is taken out,
        loaded, warmed and put back; one whose load fails stays out. Returns {replica: what happened}; a no-op
        without replicas. Under the registry's lock, so a promotion cannot move the pointer half-way through."""
        if not self._replicas:
            return {}
        from serving.replicas import RouterError

        router = self._server.router
        out: dict[str, str] = {}
        with self._lock:
            try:
                routed = set(router.workers())
            except (RouterError, httpx.HTTPError, ValueError) as e:
                log.error("replica sync: the router did not answer: %s", e)
                return {url: "router unreachable" for url in self._replicas}
            need = [n for n in (self._state["current"], self._state["previous"]) if n and n != "base"]
            for url in self._replicas:
                try:
                    out[url] = self._sync_one(url, url in routed, need, router)
                except (RouterError, AdapterLoadError, InvalidAdapter, httpx.HTTPError) as e:
                    out[url] = f"out: {e}"
                    log.error("replica %s kept out of service: %s", url, e)
                    self._event("replica_out", replica=url, error=str(e))
                    self._save()
                    if url in routed:
                        try:
                            router.remove(url)
                        except RouterError as e2:
                            log.error("could not take replica %s out of the router: %s", url, e2)
        return out

    def _sync_one(self, url: str, routed: bool, need: list[str], router: Any) -> str:
        if not self._server.replica_healthy(url):
            if routed:
                router.remove(url)
                self._event("replica_out", replica=url, error="not healthy")
                self._save()
                log.warning("replica %s is down: taken out of the router", url)
                return "taken out (down)"
            return "out (down)"
        missing = [n for n in need if n not in self.loaded_on(url)]
        if routed and not missing:
            return "in service"
        if routed:  # restarted behind our back: no chat may reach it before it holds the served versions
            router.remove(url)
        for name in missing:
            self._ensure_loaded(name, targets=[url])
        router.add(url)
        self._event("replica_in", replica=url, loaded=missing)
        self._save()
        log.info("replica %s in service (loaded %s)", url, ", ".join(missing) or "nothing")
        return f"put in service (loaded {', '.join(missing) or 'nothing'})"

    # -- helpers -------------------------------------------------------------------------------------------
    def _ensure_loaded(self, name: str, targets: list[str] | None = None) -> None:
        v = self._state["versions"][name]
        if not Path(v["path"]).is_dir():
            raise InvalidAdapter(f"the files of {name} are gone from {v['path']}")
        weights = _safetensors_weights(Path(v["path"]))
        if v.get("sha256") and sha256_file(weights) != v["sha256"]:
            raise InvalidAdapter(f"the weights of {name} in {v['path']} changed since it was registered "
                                 "(sha256 mismatch)")
        for url in targets or self._targets():
            if name not in self.loaded_on(url):
                self._load_one(url, name, v["path"])
            self._warm_one(url, name)

    def _switch(self, name: str, why: str) -> None:
        old = self.current()
        self._state["previous"] = old
        self._state["current"] = None if name == "base" else name
        self._event(why, version=name, previous=old)
        self._save()
        log.info("serving %s (was %s) after %s", name, old, why)

    def _copy_in(self, src: Path, name: str) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        dest = self.store_dir / name
        if dest.exists():
            shutil.rmtree(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.store_dir))
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        os.replace(tmp, dest)
        return dest.resolve()


def _safetensors_weights(d: Path) -> Path:
    """The adapter's safetensors weights; InvalidAdapter when missing or when a pickle file sits beside them."""
    pickles = sorted(f.name for f in d.iterdir() if f.is_file() and f.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise InvalidAdapter(f"{d} holds pickle files ({', '.join(pickles)}): adapters are loaded from "
                             f"{_WEIGHTS} only (unpickling runs arbitrary code); save with PEFT's default "
                             "safe_serialization=True")
    weights = d / _WEIGHTS
    if not weights.is_file():
        raise InvalidAdapter(f"no weights file {_WEIGHTS} in {d}")
    return weights


def _error_message(r: httpx.Response) -> str:
    try:
        return r.json().get("error", {}).get("message") or r.text
    except (ValueError, AttributeError):
        return r.text[:500]

