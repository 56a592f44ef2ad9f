"""Small pieces shared by the node's child processes."""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
import signal
import time
from typing import Optional

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1


# The names the node's processes give themselves (set_process_name), by role.
PROCESS_NAMES = {"supervisor": "rd-node", "engine": "rd-engine", "handler": "rd-handler"}


def process_role(name: str) -> Optional[str]:
    """supervisor, engine or handler for a process name (psutil's name()), else None: how tools
    tell a node's processes apart, whether exec'd or forked from a warm cluster."""
    return next((role for role, n in PROCESS_NAMES.items() if n == name), None)


def set_process_name(name: str) -> None:
    """The name `top`, `ps -o comm` and psutil show (15 bytes at most): the node's three processes
    are all `python3` otherwise. The command line is left alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a cosmetic loss
        pass


def exit_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (even by SIGKILL).

    A child of a node killed with -9 must not linger as an orphan holding the board's port.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's cleanup still applies
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


_status_fd: Optional[int] = None


def report_ready(fd: Optional[int]) -> None:
    """The ready handshake: one line on the pipe the supervisor gave us. The pipe stays open for
    `report_status` lines (the supervisor passes them to systemd as STATUS=)."""
    global _status_fd
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
        os.set_blocking(fd, False)  # a supervisor slow to read must never stall this process
        _status_fd = fd
    except OSError:
        os.close(fd)


def report_status(line: str) -> None:
    """One status line to the supervisor (a no-op without its pipe; never fails the caller)."""
    global _status_fd
    if _status_fd is None:
        return
    text = " ".join(line.split())[:400]
    try:
        os.write(_status_fd, b"status " + text.encode("utf-8", "replace") + b"\n")
    except BlockingIOError:  # the pipe is full: this line is lost, the next change sends another
        pass
    except OSError:  # the supervisor is gone or not reading: status is advisory
        try:
            os.close(_status_fd)
        finally:
            _status_fd = None


def child_main(prog: str, argv, add_arguments) -> argparse.Namespace:
    """Common start of a node child process: its arguments, logging to stderr, die with the parent."""
    p = argparse.ArgumentParser(prog=f"robustdice-{prog}")
    add_arguments(p)
    p.add_argument("--ready-fd", type=int, help="pipe on which to report readiness")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    # force: a child forked by a warm supervisor (node/lab/warm.py) inherits its logging set-up.
    logging.basicConfig(level=args.log_level, stream=sys.stderr, force=True,
                        format=f"%(asctime)s %(levelname)s {prog}[%(process)d]: %(message)s")
    set_process_name(PROCESS_NAMES[prog])
    exit_with_parent()
    _profile_if_asked(prog)
    return args


def _profile_if_asked(prog: str) -> None:
    """With ROBUSTDICE_PROFILE=DIR, this process runs under cProfile and writes
    DIR/<prog>-<pid>.prof when it exits cleanly: where a node's CPU goes, per process, under a
    real load. The clock is the main thread's CPU time, not the wall: on a loaded machine a
    wall clock charges a call for the time the scheduler gave to other processes."""
    directory = os.environ.get("ROBUSTDICE_PROFILE")
    if not directory:
        return
    import atexit
    import cProfile
    os.makedirs(directory, exist_ok=True)
    profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
    atexit.register(lambda: (profiler.disable(), profiler.dump_stats(os.path.join(directory, f"{prog}-{os.getpid()}.prof"))))
    profiler.enable()
