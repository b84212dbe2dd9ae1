"""Children that die with the app, even when the app is killed with SIGKILL.

`lifeline(cmd)` wraps a command (started with `start_new_session=True`) so it leads its own process group beside a
small watchdog holding a pidfd of the app; when the app ends, however it ends, or the command ends first, the
watchdog sends SIGTERM to the group, then SIGKILL after a grace period. The wrapper `exec`s the command, so the
pid the app holds is the command's own. Optionally it raises the command's OOM score so the kernel kills it first.
Why not PR_SET_PDEATHSIG: docs/ARCHITECTURE.md ("serving/").
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time
from collections.abc import Sequence

SCRIPT = os.path.abspath(__file__)
GRACE_S = 5.0  # SIGTERM → SIGKILL delay once the app is gone: vLLM's own shutdown takes about a second


def lifeline(cmd: Sequence[str], *, parent: int | None = None, oom_score_adj: int | None = None,
             grace_s: float = GRACE_S) -> list[str]:
    """`cmd` wrapped so it dies with `parent` (default: this process); start it with start_new_session=True."""
    out = [sys.executable, "-I", SCRIPT, "--parent", str(os.getpid() if parent is None else parent),
           "--grace", f"{grace_s:g}"]
    if oom_score_adj is not None:
        out += ["--oom-score-adj", str(oom_score_adj)]
    return [*out, "--", *cmd]


def _open(pid: int) -> int | None:
    """A pidfd for `pid`, or None where the kernel or Python has none (then the watchdog polls)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _gone(pid: int) -> bool:
    """Whether `pid` has terminated (a zombie counts: it has ended, its parent just has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False


def _others_in_group() -> list[int]:
    """Live processes of this process group other than the watchdog itself (from /proc)."""
    group, me = os.getpgid(0), os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _ppid, pgrp = f.read().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state not in ("Z", "X"):
            out.append(int(name))
    return out


def _take_down_group(grace_s: float) -> None:
    """SIGTERM the group, wait up to grace_s for it to empty, SIGKILL what is left (the watchdog last)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for the others
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _others_in_group() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)


def _watch(app: int, app_fd: int | None, cmd: int, grace_s: float) -> None:
    """The watchdog's life: wait for the app or the command to end, then take down what is left of the group."""
    cmd_fd = _open(cmd)
    while True:
        if cmd_fd is not None and app_fd is not None:
            ready = select.select([app_fd, cmd_fd], [], [])[0]
            app_gone, cmd_gone = app_fd in ready, cmd_fd in ready
        else:  # no pidfds: poll (our parent is the command, so getppid() tells when it has gone)
            time.sleep(0.25)
            app_gone, cmd_gone = _gone(app), os.getppid() != cmd
        if app_gone or cmd_gone:
            break
    if app_gone or _others_in_group():
        _take_down_group(grace_s)


def _detach_fds(keep: int | None) -> None:
    """The watchdog lets go of the command's pipes, or a reader of them would wait for the watchdog's EOF too."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lifeline", description="run CMD in this process group; kill the group "
                                                            "when PARENT terminates")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--grace", type=float, default=GRACE_S)
    p.add_argument("--oom-score-adj", type=int, default=None)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given")
    app_fd = _open(args.parent)
    if os.getppid() != args.parent:  # the app went before the pidfd was open: nothing to run for
        return 1
    if args.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(args.oom_score_adj))
    me = os.getpid()
    if os.getpgid(0) != me:  # started without start_new_session: lead a group of our own all the same
        os.setpgid(0, 0)
    if os.fork() == 0:
        try:
            _detach_fds(app_fd)
            _watch(args.parent, app_fd, me, args.grace)
        finally:
            os._exit(0)
    if app_fd is not None:
        os.close(app_fd)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        print(f"lifeline: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
