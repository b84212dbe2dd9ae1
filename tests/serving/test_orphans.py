"""No orphans: a child started through serving/lifeline.py, and everything in its process group, dies with the
process that started it, even when that process is killed with SIGKILL; the real vLLM server (API server, engine
core, workers) included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from serving.lifeline import lifeline

REPO = Path(__file__).resolve().parents[2]
SPAWNER = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"  # a child with a child


def _alive(pids: list[int]) -> list[int]:
    """The pids among `pids` still running (a zombie has ended: only its parent has not reaped it yet)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _kill_family(pids: list[int]) -> None:
    for pid in _alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill9_and_check(parent: subprocess.Popen, wait_s: float) -> None:
    """SIGKILL `parent` once it has reported (one line on stdout); all its descendants must be gone in wait_s."""
    line = parent.stdout.readline()
    assert line, "the parent exited before it started its child"
    family = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
    try:
        assert family, "the parent has no children to orphan"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        left = _wait_gone(family, wait_s)
        assert left == [], f"orphans after kill -9 of their parent: {[psutil.Process(p).cmdline() for p in left]}"
    finally:
        _kill_family(family)


PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from serving.lifeline import lifeline
    subprocess.Popen(lifeline([sys.executable, "-c", sys.argv[1]]), start_new_session=True)
    time.sleep(1.0)  # the child has started its own child
    print("started", flush=True)
    time.sleep(600)
""")


def test_lifeline_group_dies_with_a_sigkilled_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, SPAWNER], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    _kill9_and_check(parent, wait_s=10)


def test_lifeline_child_outlives_the_thread_that_started_it():
    """Unlike PR_SET_PDEATHSIG, which fires when the forking *thread* exits: vLLM restarts run on short-lived
    threads (the supervisor's watchdog, an operator request), and the restarted server must stay up."""
    procs: list[subprocess.Popen] = []
    t = threading.Thread(target=lambda: procs.append(subprocess.Popen(lifeline(["sleep", "600"]),
                                                                      start_new_session=True)))
    t.start()
    t.join()
    proc = procs[0]
    try:
        time.sleep(1.5)
        assert proc.poll() is None
        assert psutil.Process(proc.pid).cmdline() == ["sleep", "600"]  # exec'd: the pid is the command's own
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_lifeline_leaves_with_its_command_and_keeps_the_exit_code():
    proc = subprocess.Popen(lifeline([sys.executable, "-c", "import sys; print('hi'); sys.exit(7)"]),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    out, _ = proc.communicate(timeout=30)  # EOF comes when the command ends: the watchdog holds no pipe
    assert (out, proc.returncode) == ("hi\n", 7)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the lifeline watchdog outlived its command")


def test_what_the_command_leaves_in_its_group_goes_when_it_ends():
    """The command dies (a crash, a SIGKILL) and leaves children behind: the watchdog takes them down too."""
    leave = "import os, subprocess, sys; print(subprocess.Popen(['sleep', '600']).pid, flush=True); os._exit(3)"
    proc = subprocess.Popen(lifeline([sys.executable, "-c", leave], grace_s=1), stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    left = int(proc.stdout.readline())
    try:
        assert proc.wait(30) == 3
        assert _wait_gone([left], 10) == [], "the command's child outlived it"
    finally:
        _kill_family([left])


def test_lifeline_raises_the_oom_score_only_when_asked():
    show = [sys.executable, "-c", "print(open('/proc/self/oom_score_adj').read().strip())"]
    mine = Path("/proc/self/oom_score_adj").read_text().strip()
    for adj, want in ((1000, "1000"), (None, mine)):
        out = subprocess.run(lifeline(show, oom_score_adj=adj), capture_output=True, text=True, timeout=30,
                             start_new_session=True)
        assert out.stdout.strip() == want, out.stderr


VLLM_PARENT = textwrap.dedent("""
    import json, sys, time
    from serving.server import VLLMServer, VLLMServerSpec
    server = VLLMServer(VLLMServerSpec(model_dir=sys.argv[1], log_path=sys.argv[2], max_loras=1, max_model_len=512,
                                       kvcache_gb=1, auto_restart=False))
    server.start()
    print(json.dumps(server.family()), flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_app_leaves_no_vllm_process(tiny_model_dir: Path, tmp_path: Path):
    """A process that started the real vLLM server through VLLMServer is killed with SIGKILL (no atexit, no
    stop()): the API server, the engine core and its workers must all go within a bounded wait."""
    parent = subprocess.Popen([sys.executable, "-c", VLLM_PARENT, str(tiny_model_dir), str(tmp_path / "vllm.log")],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        _kill9_and_check(parent, wait_s=30)
    finally:
        if parent.poll() is None:
            parent.kill()


ENGINE_LEFT = textwrap.dedent("""
    import json, os, signal, sys, time
    import psutil
    from serving.server import VLLMServer, VLLMServerSpec
    server = VLLMServer(VLLMServerSpec(model_dir=sys.argv[1], log_path=sys.argv[2], max_loras=1, max_model_len=512,
                                       kvcache_gb=1, auto_restart=False))
    server.start()
    engine = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
    os.kill(server.pid, signal.SIGKILL)  # the API server alone; the supervisor's stop() is not called
    print(json.dumps(engine), flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_engine_goes_when_its_api_server_is_killed(tiny_model_dir: Path, tmp_path: Path):
    """vLLM's engine core and worker outlive a SIGKILLed API server on their own (a minute and more, measured);
    in the lifeline's group they go within its grace period."""
    import json

    parent = subprocess.Popen([sys.executable, "-c", ENGINE_LEFT, str(tiny_model_dir), str(tmp_path / "vllm.log")],
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    engine: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, "the parent exited before vLLM was ready"
        engine = json.loads(line)
        assert len(engine) >= 2  # the engine core and its worker (and the lifeline watchdog)
        assert _wait_gone(engine, 30) == [], "vLLM's engine outlived its API server"
    finally:
        parent.kill()
        parent.wait(10)
        _kill_family(engine)
