"""One realignment run: store snapshot → aligner subprocess → promotion gate → hot swap → records.

Training runs in a niced child process on a Parquet snapshot, so the app keeps owning the store and chat stays
responsive. Runs never overlap (RunInProgress); every run, failed ones too, is recorded with its error. Mode
"continue" (default) trains the served adapter on ratings it has not seen, the base model as reference, so a cycle
costs the same however long the deployment has run; "fresh" trains a new adapter on all final ratings.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from aligner.config import ANCHOR_MAX_TOKENS_LIMIT, DEVICES, TrainConfig
from aligner.layers import parse_first_layer
from app.config import Config
from app.loop import gate, next_run, served
from serving.lifeline import lifeline

Progress = Callable[[dict[str, Any]], None]
MODES = ("continue", "fresh")

# The default bound on an aligner child's run time: a start-up allowance (interpreter, torch, model load, the
# reference pass's set-up) plus a bound per example and epoch. Measured on the 2-core AVX2 EPYC with the default
# model (docs/experiments/2026-11-30-simulator-400-ratings.md), a cycle of 37 + 325 examples spent 1476 s in the
# aligner (835 s of training steps, 137 s of the checkpoints' held-out passes, the rest loading and forward-only
# passes at 0.55 s a sequence), about 4 s an example: the bound is about 3x that, for a loaded machine.
ALIGN_START_S = 600.0
ALIGN_S_PER_EXAMPLE = 10.0
OOM_SCORE_ADJ = 1000  # the kernel's OOM killer takes an aligner child first, never vLLM (its score stays 0)
# The memory cap is a watchdog on the resident memory of the child's processes (psutil). RLIMIT_AS would break
# PyTorch's large virtual reservations; RLIMIT_DATA does work with torch on CPU (a 2 GB tensor under a 1.5 GB limit
# fails with "can't allocate memory"), but it counts reserved, untouched writable mappings too (thread stacks,
# malloc arenas), so the cap would follow the thread count rather than the memory the run actually uses.
WATCH_INTERVAL_S = 0.5  # how often the watchdog checks a child's clock and memory


def aligner_timeout(n_examples: int, epochs: int = 1) -> float:
    """Seconds an aligner child may run on `n_examples` examples for `epochs` epochs (the default limit)."""
    return ALIGN_START_S + ALIGN_S_PER_EXAMPLE * max(0, n_examples) * max(1, epochs)


def epochs_of(args: Sequence[str], default: int = 1) -> int:
    """The `--epochs N` (or `--epochs=N`) among the aligner's extra flags, else `default`."""
    n = default
    for i, a in enumerate(args):
        if a == "--epochs" and i + 1 < len(args):
            raw = args[i + 1]
        elif a.startswith("--epochs="):
            raw = a.partition("=")[2]
        else:
            continue
        try:
            n = int(raw)
        except ValueError:
            pass  # the aligner refuses it with its own message
    return max(1, n)


def default_memory_cap() -> int:
    """Half the machine's memory: room for vLLM, the app and the page cache beside the aligner."""
    return psutil.virtual_memory().total // 2


class RunInProgress(RuntimeError):
    """A realignment run is already going; triggers are rejected, never queued."""


class RunFailed(RuntimeError):
    pass


class RunCancelled(RuntimeError):
    """The operator cancelled the run; it is recorded as "cancelled", not "failed"."""


class NotCancellable(RuntimeError):
    """No run to cancel, or it is past the point where cancelling is safe (promoting a version)."""


@dataclass
class RunOutcome:
    run_id: str
    status: str                 # as recorded in the store: "promoted" | "rejected" (gate said no) | "failed"
    promoted: bool
    reason: str
    version: str | None = None
    manifest: dict[str, Any] | None = None


@dataclass
class RunStatus:
    """What the console shows while a run is going (and after it, until the next one)."""
    running: bool = False
    run_id: str | None = None
    trigger: str | None = None
    phase: str = "idle"
    step: int = 0
    total: int = 0
    loss: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last: dict[str, Any] = field(default_factory=dict)
    planned: dict[str, Any] | None = None  # the snapshot's train/held-out counts and λ (app/loop/next_run.py)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Realigner:
    """Owns the one-at-a-time lock and the aligner child process."""

    def __init__(self, store, registry, *, model_dir: Path, work_dir: Path, lora_rank: int = TrainConfig.lora_rank,
                 max_lora_rank: int = TrainConfig.max_lora_rank, beta: float = TrainConfig.beta,
                 min_gain: float = Config.promote_min_gain,
                 max_examples: int = Config.max_examples,
                 extra_args: Sequence[str] = (), niceness: int = 10, timeout_s: float | None = None,
                 max_memory_bytes: int | None = 0,
                 mode: str = Config.align_mode, capability_guard: Callable[[str, str], tuple[bool, str]] | None = None,
                 anchor_weight: float = TrainConfig.anchor_weight,
                 anchor_max_tokens: int = TrainConfig.anchor_max_tokens,
                 first_lora_layer: str | int = TrainConfig.first_lora_layer, anchor_cache: Path | None = None,
                 lr_generation_decay: float = TrainConfig.lr_generation_decay,
                 device: str = TrainConfig.device, gpu_memory_fraction: float = TrainConfig.gpu_memory_fraction):
        if mode not in MODES:
            raise ValueError(f"realignment mode must be one of {MODES}, got {mode!r}")
        if not (math.isfinite(anchor_weight) and anchor_weight >= 0):
            raise ValueError(f"the anchor weight must be a finite number ≥ 0, got {anchor_weight!r}")
        if not 1 <= anchor_max_tokens <= ANCHOR_MAX_TOKENS_LIMIT:
            raise ValueError(f"anchor tokens must be in [1, {ANCHOR_MAX_TOKENS_LIMIT}], got {anchor_max_tokens!r}")
        if not 0 < lr_generation_decay <= 1:
            raise ValueError(f"the learning-rate decay per generation must be in (0, 1], got {lr_generation_decay!r}")
        self.lr_generation_decay = lr_generation_decay  # a continued adapter: lr × this^generation (aligner.train)
        if device not in DEVICES:
            raise ValueError(f"the aligner device must be one of {', '.join(DEVICES)}, got {device!r}")
        if not 0 <= gpu_memory_fraction <= 1:
            raise ValueError(f"the aligner's GPU memory fraction must be in [0, 1], got {gpu_memory_fraction!r}")
        # where the aligner computes, and its share of a GPU it shares with vLLM (docs/deploy.md)
        self.device, self.gpu_memory_fraction = device, gpu_memory_fraction
        # a fresh adapter's lowest layer, N or P% of the depth (aligner/layers.py; the aligner resolves it against
        # the model): the layers below run once per sequence (aligner/model.py, Prefix)
        self.first_lora_layer = str(first_lora_layer).strip()
        parse_first_layer(self.first_lora_layer)  # ValueError names the accepted forms
        self.anchor_weight = anchor_weight  # γ of the aligner's anchor term (aligner/anchor.py; 0 = off)
        self.anchor_max_tokens = anchor_max_tokens  # how much of each base-model anchor answer the term covers
        # The base model's anchor answers, keyed by a hash of the model's files and the settings: the app keeps
        # them per machine (home/cache/anchors), so a new data directory or simulation does not build them again.
        self.anchor_cache = Path(anchor_cache) if anchor_cache is not None else Path(work_dir) / "anchor-cache"
        self.store, self.registry = store, registry
        self.mode = mode
        self.capability_guard = capability_guard  # (candidate, served) -> (ok, reason); see app/loop/gate.py
        self.model_dir, self.work_dir = Path(model_dir), Path(work_dir)
        self.lora_rank, self.beta, self.min_gain = lora_rank, beta, min_gain
        self.max_lora_rank = max_lora_rank  # the vLLM server's --max-lora-rank: the aligner refuses a larger adapter
        self.max_examples = max_examples
        self.extra_args = list(extra_args)
        if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise ValueError(f"the aligner timeout must be a number of seconds ≥ 0 (0 = scaled), got {timeout_s!r}")
        # timeout_s: None or 0 = aligner_timeout() of the run's examples; max_memory_bytes: 0 = default_memory_cap(),
        # None or negative = no cap
        self.niceness, self.timeout_s = niceness, timeout_s
        self.max_memory_bytes = default_memory_cap() if max_memory_bytes == 0 else (
            None if max_memory_bytes is None or max_memory_bytes < 0 else int(max_memory_bytes))
        self._run_timeout: float | None = None  # the limit of the run in progress (its children share it)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._closing = False
        self._child_lock = threading.Lock()  # orders spawning a child against cancel()
        self._cancelled = False
        self._cancellable = False  # True from the run's start until training (or checkpoint evaluation) is over
        self.status = RunStatus()

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def cancel(self) -> str:
        """Operator's Cancel: stop the run's aligner child (its whole process group); the run is recorded as
        cancelled. Refused (NotCancellable) when no run is going or it has reached promotion, which must finish."""
        with self._child_lock:
            if not self.running or not self._cancellable:
                raise NotCancellable("no realignment run to cancel" if not self.running else
                                     f"run {self.status.run_id} is past training ({self.status.phase}); it "
                                     f"cannot be cancelled now and will finish shortly")
            self._cancelled = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        return f"cancelling run {self.status.run_id} ({self.status.phase})"

    def close(self) -> None:
        """Stop a running aligner child (app shutdown); the run is recorded as failed."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_group(proc)

    def run(self, trigger: str, progress: Progress | None = None, *, max_examples: int | None = None,
            since: Any = None) -> RunOutcome:
        if not self._lock.acquire(blocking=False):
            raise RunInProgress(f"a realignment run is already in progress (run {self.status.run_id}, "
                                f"{self.status.phase}); try again when it has finished")
        with self._child_lock:
            self._cancelled, self._cancellable = False, True
        try:
            return self._run(trigger, progress, max_examples or self.max_examples, since)
        finally:
            with self._child_lock:
                self._proc, self._cancellable = None, False
            self._lock.release()

    # ------------------------------------------------------------------ internals
    def _emit(self, progress: Progress | None, **event: Any) -> None:
        st = self.status
        for k in ("phase", "step", "total", "loss"):
            if k in event:
                setattr(st, k, event[k])
        if progress is not None:
            try:
                progress(dict(event, run_id=st.run_id))
            except Exception:
                pass  # a broken progress callback must not break the run

    def next_run(self, max_examples: int | None = None, store: Any = None) -> next_run.NextRun:
        """What a run started now would train on and with which λ (the console's and `kto-loop stats`' numbers);
        `store`: another view of the same rows (the console's copy, feedback_store/mirror.py)."""
        return next_run.next_run(store or self.store, mode=self.mode, max_examples=max_examples or self.max_examples,
                                 extra_args=self.extra_args, adapter_dir_of=self._adapter_dir_of)

    def _run(self, trigger: str, progress: Progress | None, max_examples: int, since: Any) -> RunOutcome:
        # the store's record of what serves, which the registry follows (served.py); the same choice the console's
        # "next run" numbers show (app/loop/next_run.py)
        sel = next_run.selection(self.store, self.mode, max_examples, self._adapter_dir_of)
        current = sel.served
        served_dir = self._adapter_dir_of(current)
        resume_dir = served_dir if sel.resume else None
        if since is None:
            since = sel.since  # continue: only the ratings the served version has not been trained on
        params = {"max_examples": max_examples, "lora_rank": self.lora_rank, "beta": self.beta,
                  "min_gain": self.min_gain, "served": current, "model_dir": str(self.model_dir),
                  "mode": self.mode, "resume_from": current if resume_dir is not None else None,
                  "reference": "base", "since": str(since) if since is not None else None,
                  "anchor_weight": self.anchor_weight,
                  "anchor_max_tokens": self.anchor_max_tokens if self.anchor_weight > 0 else None,
                  "first_lora_layer": self.first_lora_layer if resume_dir is None else None,
                  "lr_generation_decay": self.lr_generation_decay if resume_dir is not None else None}
        run_id = str(self.store.start_run(trigger, params))
        self.status = RunStatus(running=True, run_id=run_id, trigger=trigger, phase="snapshot",
                                started_at=time.time())
        run_dir = self.work_dir / f"run-{run_id}"
        manifest: dict[str, Any] | None = None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._emit(progress, event="phase", phase="snapshot")
            snap = self.store.export_snapshot(run_dir / "snapshot.parquet", since=since, max_examples=max_examples,
                                              run_id=run_id)
            keys = pq.read_table(snap.path, columns=["example_id", "answer_id", "label"])
            planned = next_run.split_counts(zip(*(keys.column(c).to_pylist() for c in keys.column_names),
                                                strict=True), next_run.aligner_settings(self.extra_args))
            self.status.planned = planned
            self._emit(progress, event="snapshot", phase="snapshot", n_desirable=snap.n_desirable,
                       n_undesirable=snap.n_undesirable, planned=planned)
            if snap.n_desirable == 0 or snap.n_undesirable == 0:
                raise RunFailed(f"need at least one thumbs-up and one thumbs-down to train "
                                f"(have {snap.n_desirable} up, {snap.n_undesirable} down)")
            out = run_dir / "adapter"
            self._run_timeout = self.timeout_s or aligner_timeout(snap.n_desirable + snap.n_undesirable,
                                                                  epochs_of(self.extra_args))
            self._train(snap.path, out, served_dir, progress, resume_dir)
            manifest = json.loads((out / "manifest.json").read_text())
            self._emit(progress, event="phase", phase="gate")
            ok, reason, version = self._gate(out, manifest, current, resume_dir is not None, run_id, progress)
            status = "promoted" if ok else "rejected"
            self._finish(run_id, status, manifest=manifest, promoted=ok, reason=reason, version=version,
                         snap=snap)
            outcome = RunOutcome(run_id, status, bool(ok), reason, version, manifest)
        except RunCancelled as e:
            self._finish(run_id, "cancelled", manifest=manifest, promoted=False, reason=str(e), version=None,
                         error=str(e))
            outcome = RunOutcome(run_id, "cancelled", False, str(e), None, manifest)
        except Exception as e:
            err = str(e) or type(e).__name__
            self._finish(run_id, "failed", manifest=manifest, promoted=False, reason=err, version=None,
                         error=err)
            outcome = RunOutcome(run_id, "failed", False, err, None, manifest)
        self.status.running, self.status.finished_at = False, time.time()
        self.status.phase = outcome.status if outcome.status in ("failed", "cancelled") else "done"
        self.status.last = {"run_id": run_id, "status": outcome.status, "promoted": outcome.promoted,
                            "reason": outcome.reason, "version": outcome.version}
        self._emit(progress, event="finished", phase=self.status.phase, **self.status.last)
        return outcome

    def _gate(self, out: Path, manifest: dict[str, Any], current: str | None, continued: bool, run_id: str,
              progress: Progress | None) -> tuple[bool, str, str | None]:
        """Run the promotion gate (app/loop/gate.py) on this run's adapters; every verdict lands in the manifest."""
        from serving.registry import AdapterRejected

        def attempt(cand: gate.Candidate) -> gate.Attempt:
            self._emit(progress, event="phase", phase="promote")
            if hasattr(self.capability_guard, "last"):
                self.capability_guard.last = None  # only this candidate's verdict is recorded
            try:
                version, refused = self._promote(cand.dir, current if continued else None, run_id), None
            except AdapterRejected as e:
                version, refused = None, str(e)
            return gate.Attempt(version, refused, getattr(self.capability_guard, "last", None))

        result = gate.decide(gate.candidates(out, manifest), manifest, self.min_gain, attempt,
                             lambda pending: self._evaluate_checkpoints(out, manifest, pending, progress))
        manifest["candidates"] = result.candidates
        if result.capability_guard is not None:
            manifest["capability_guard"] = result.capability_guard
        if result.rater_check is not None:
            manifest["rater_check"] = result.rater_check
        if result.promoted_checkpoint is not None:
            manifest["promoted_checkpoint"] = result.promoted_checkpoint
        return result.promoted, result.reason, result.version

    def _evaluate_checkpoints(self, out: Path, manifest: dict[str, Any], earlier: list[gate.Candidate],
                              progress: Progress | None) -> None:
        """Run `python -m aligner.checkpoints` on a lazy run's adapter (all its pending checkpoints in one child:
        the model loads once) and copy the metrics it wrote into `manifest` and the candidates. A failure is
        recorded; the candidates then stay without metrics, which the gate refuses with that reason."""
        for c in earlier:
            c.pending = False
        self._emit(progress, event="phase", phase="checkpoint_eval")
        cmd = self._niced([sys.executable, "-m", "aligner.checkpoints", str(out)])
        log_path = out.parent / "checkpoints_eval.log"
        t0 = time.monotonic()
        with self._child_lock:
            self._cancellable = True  # nothing is promoted while the checkpoints are measured
        try:
            with open(log_path, "w") as log:
                proc = self._spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
                watch = self._watch(proc, "checkpoint evaluation")
                rc = proc.wait()
                watch.stop()
            self._why_stopped(watch, rc)
            self._leave_cancellable()
            if rc != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RunFailed(f"exit code {rc}: {' | '.join(tail)[-800:] or 'no output'} (log: {log_path})")
            fresh = json.loads((out / "manifest.json").read_text())
        except (OSError, ValueError, RunFailed) as e:
            manifest["checkpoint_eval_error"] = f"checkpoint evaluation failed: {e}"
            return
        by_step = {c["step"]: c for c in fresh.get("checkpoints") or []}
        for c in earlier:
            c.heldout_new = (by_step.get(c.step) or {}).get("heldout_new")
        manifest["checkpoints"] = fresh.get("checkpoints")
        manifest["checkpoint_eval_seconds"] = round(time.monotonic() - t0, 3)  # child start-up and model load too

    def _adapter_dir_of(self, version: str | None) -> Path | None:
        if not version or version == "base":
            return None
        for a in self.store.adapters():
            if a.get("version") == version and a.get("path"):
                return Path(a["path"])
        path_of = getattr(self.registry, "path_of", None)
        path = path_of(version) if path_of else None
        return Path(path) if path else None

    def command(self, snapshot: Path, out: Path, served_dir: Path | None,
                resume_dir: Path | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "aligner", "--snapshot", str(snapshot), "--out", str(out),
               "--model-dir", str(self.model_dir), "--lora-rank", str(self.lora_rank),
               "--max-lora-rank", str(self.max_lora_rank),
               "--beta", str(self.beta), "--progress-json"]
        if served_dir is not None:
            cmd += ["--served-adapter", str(served_dir)]
        # The recipe's settings are always spelled out: an operator's 0 (every layer, no anchor) must not fall
        # back to the aligner's own default, which is the shipped recipe.
        if resume_dir is not None:
            cmd += ["--resume-from", str(resume_dir), "--reference", "base",
                    "--lr-generation-decay", f"{self.lr_generation_decay:g}"]
        else:
            cmd += ["--first-lora-layer", str(self.first_lora_layer)]
        cmd += ["--anchor-weight", f"{self.anchor_weight:g}"]
        if self.anchor_weight > 0:
            cmd += ["--anchor-max-tokens", str(self.anchor_max_tokens), "--anchor-cache", str(self.anchor_cache)]
        if self.device != TrainConfig.device:
            cmd += ["--device", self.device]
        if self.gpu_memory_fraction > 0:
            cmd += ["--gpu-memory-fraction", f"{self.gpu_memory_fraction:g}"]
        return self._niced(cmd + self.extra_args)

    def _niced(self, cmd: list[str]) -> list[str]:
        """An aligner child's command at the configured niceness: chats keep the CPU first."""
        nice = shutil.which("nice")
        return [nice, "-n", str(self.niceness), *cmd] if self.niceness and nice else cmd

    def _spawn(self, cmd: list[str], **popen: Any) -> subprocess.Popen:
        """Start an aligner child: its own process group, which dies with the app even on SIGKILL
        (serving/lifeline.py), first in line for the kernel's OOM killer. Refused once cancelled or closing."""
        with self._child_lock:
            if self._cancelled:
                raise RunCancelled("cancelled by the operator")
            if self._closing:
                raise RunFailed("the app is shutting down")
            proc = self._proc = subprocess.Popen(lifeline(cmd, oom_score_adj=OOM_SCORE_ADJ), start_new_session=True,
                                                 env=dict(os.environ, PYTHONUNBUFFERED="1"), **popen)
        return proc

    def _watch(self, proc: subprocess.Popen, what: str) -> _Watchdog:
        limit = self._run_timeout or self.timeout_s or aligner_timeout(0)
        watch = _Watchdog(proc, what, limit, self.max_memory_bytes)
        watch.start()
        return watch

    def _why_stopped(self, watch: _Watchdog, rc: int | None) -> None:
        """Raise for a child that the operator, a watchdog or the app's shutdown stopped."""
        if self._cancelled:
            raise RunCancelled("cancelled by the operator")
        if watch.tripped:
            raise RunFailed(watch.tripped)
        if rc != 0 and self._closing:
            raise RunFailed("stopped because the app shut down")

    def _leave_cancellable(self) -> None:
        """Past this point the run goes on to promotion; a cancel that came first still wins."""
        with self._child_lock:
            self._cancellable = False
            if self._cancelled:
                raise RunCancelled("cancelled by the operator")

    def _train(self, snapshot: Path, out: Path, served_dir: Path | None, progress: Progress | None,
               resume_dir: Path | None = None) -> None:
        """Run the aligner child, relay its JSON progress lines, fail with its last stderr lines. A watchdog stops
        it at the run's time limit or memory cap, whether or not it prints anything."""
        if self._closing:
            raise RunFailed("the app is shutting down")
        self._emit(progress, event="phase", phase="train", step=0, total=0)
        log_path = out.parent / "aligner.log"
        tail: deque[str] = deque(maxlen=20)
        with open(log_path, "w", buffering=1) as log:  # line-buffered: progress can be followed live
            proc = self._spawn(self.command(snapshot, out, served_dir, resume_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, bufsize=1)
            watch = self._watch(proc, "aligner")
            err_thread = threading.Thread(target=_pump, args=(proc.stderr, log, tail), daemon=True)
            err_thread.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict) and ev.get("event") == "progress":
                    self._emit(progress, event="progress", phase="train", step=int(ev.get("step", 0)),
                               total=int(ev.get("total", 0)), loss=ev.get("loss"))
            rc = proc.wait()
            watch.stop()
            err_thread.join(timeout=5)
        self._why_stopped(watch, rc)
        if rc != 0:
            last = " | ".join(line.strip() for line in tail if line.strip())[-1500:]
            raise RunFailed(f"aligner exited with code {rc}: {last or 'no error output'} (log: {log_path})")
        if not (out / "manifest.json").exists():
            raise RunFailed(f"aligner finished without writing {out / 'manifest.json'}")
        self._leave_cancellable()

    def _promote(self, adapter_dir: Path, parent: str | None, run_id: str) -> str:
        """Switch to the candidate with the store recording it around the switch (app/loop/served.py)."""
        return served.promote(self.store, self.registry, adapter_dir, parent=parent, run_id=run_id,
                              check=self.capability_guard)

    def _finish(self, run_id: str, status: str, *, manifest, promoted, reason, version, snap=None,
                error=None) -> None:
        m = manifest or {}
        try:
            self.store.finish_run(
                run_id, status, n_desirable=m.get("n_desirable", getattr(snap, "n_desirable", None)),
                n_undesirable=m.get("n_undesirable", getattr(snap, "n_undesirable", None)),
                lambda_d=m.get("lambda_d"), lambda_u=m.get("lambda_u"),
                metrics={"heldout": m.get("heldout"), "z0_mean": m.get("z0_mean"),
                         "z0_pre_clamp_mean": m.get("z0_pre_clamp_mean"), "train_seconds": m.get("train_seconds"),
                         "checkpoint_eval_seconds": m.get("checkpoint_eval_seconds"),
                         "capability_guard": m.get("capability_guard"), "rater_check": m.get("rater_check"),
                         "candidates": m.get("candidates"),
                         "promoted_checkpoint": m.get("promoted_checkpoint"), "planned": self.status.planned,
                         "promoted": promoted, "reason": reason, "version": version},
                error=error, adapter_version=version, dropped=_dropped_ids(m.get("dropped_examples")),
                heldout=[e for e in m.get("heldout_examples") or [] if isinstance(e, str)])
        except Exception as e:  # recording must never mask the run's own outcome
            print(f"kto-loop: could not record run {run_id}: {e}", file=sys.stderr)


def _dropped_ids(dropped: Any) -> list[str]:
    """The manifest lists dropped examples as ids or as {"example_id": ..., "reason": ...} records."""
    out = []
    for d in dropped or []:
        v = d.get("example_id") if isinstance(d, dict) else d
        if isinstance(v, str):
            out.append(v)
    return out


def _pump(stream, log, tail: deque[str]) -> None:
    for line in stream:
        log.write(line)
        tail.append(line)


def limit_exceeded(what: str, elapsed_s: float, rss: int, timeout_s: float | None,
                   max_rss: int | None) -> tuple[str, float] | None:
    """Why a child must be stopped and the SIGTERM grace to give it, or None while it is within its limits.
    Over memory it gets none: every second it keeps growing brings the kernel's OOM killer closer."""
    if max_rss is not None and rss > max_rss:
        return (f"the {what}'s processes held {rss / 2**30:.2f} GiB of memory, over the {max_rss / 2**30:.2f} GiB "
                f"cap, and were stopped (align_max_memory_gb)"), 0.0
    if timeout_s and elapsed_s > timeout_s:
        return (f"the {what} ran past its time limit of {timeout_s:.0f} s and was stopped "
                f"(align_timeout_s; 0 = scaled to the run's examples)"), 10.0
    return None


def _group_rss(pid: int) -> int:
    """Resident memory of a child and everything it spawned."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class _Watchdog(threading.Thread):
    """Stops a child past its time limit or over its memory cap, independent of what (or whether) it prints."""

    def __init__(self, proc: subprocess.Popen, what: str, timeout_s: float | None, max_rss: int | None):
        super().__init__(name=f"{what} watchdog", daemon=True)
        self.proc, self.what, self.timeout_s, self.max_rss = proc, what, timeout_s, max_rss
        self.tripped: str | None = None
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.wait(WATCH_INTERVAL_S) and self.proc.poll() is None:
            rss = _group_rss(self.proc.pid) if self.max_rss is not None else 0
            verdict = limit_exceeded(self.what, time.monotonic() - self._t0, rss, self.timeout_s, self.max_rss)
            if verdict is not None:
                self.tripped = verdict[0]
                _kill_group(self.proc, grace=verdict[1])
                return

    def stop(self) -> None:
        self._done.set()
        if self is not threading.current_thread():
            self.join(timeout=30)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after `grace` seconds (at once for 0)."""
    try:
        if grace > 0:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)  # what ignored SIGTERM, and anything the leader left in its group
    except ProcessLookupError:
        pass
    except PermissionError:
        proc.kill()
