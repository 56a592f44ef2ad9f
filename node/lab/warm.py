"""Warm starts for a local cluster: node processes forked from one process that imported torch.

A node is three processes, and each used to start a Python of its own: starting a 4-node digits
cluster took 17 s of CPU here, 12 of them the four engines importing torch (2.9 s each), 1.7 the
supervisors and 2 the handlers loading the plan and the mesh. `robustdice cluster`, `make demo`,
the benchmarks and the tests start such clusters again and again.

With `LocalCluster(warm=True)` (its default without a netlab prefix) the cluster starts one
*zygote*: `python -m robustdice.node.lab.warm --cluster WORKDIR`, which imports torch and the
node's modules once, runs nothing, and forks each node's supervisor on request. That supervisor
runs the same `supervisor.main` as on a board, except that it forks its engine and handler
(`fork_child`) instead of starting a new Python for each: the same `main` functions, arguments,
ready pipe, signals and exit statuses. Every node is still its own process group of three real
processes, killed, paused and restarted as before; only the interpreter's start-up is shared.
Boards run the exec path (systemd starts `robustdice-node`), and so do the tests that check it.

The zygote is single-threaded apart from OpenBLAS's pool (which handles fork) and never runs a
torch operation, so forking it is safe, as `multiprocessing`'s forkserver relies on. Forked
processes inherit the zygote's command line: `ps` shows them as `... warm --cluster WORKDIR`
(so a leftover process is still found by its cluster's folder) and under their own names
(`rd-node`, `rd-engine`, `rd-handler`, set by the node itself on every path).
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from typing import Dict, List, Optional

ZYGOTE_READY_TIMEOUT_S = 120.0   # importing torch on a loaded 2-core machine
FORK_TIMEOUT_S = 30.0            # the zygote answers a request with a pid at once


# ------------------------------------------------------------------ forked processes (either side)
class ForkedProcess:
    """The `subprocess.Popen` interface (pid, poll, wait, send_signal, kill, returncode) for a child
    this process made with os.fork: waits on a pidfd, never on a timer."""

    def __init__(self, pid: int, args: List[str]) -> None:
        self.pid, self.args = pid, args
        self.returncode: Optional[int] = None
        self._pidfd: Optional[int] = os.pidfd_open(pid)

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                os.close(self._pidfd)
                self._pidfd = None
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.poll() is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.poll()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:   # never signal a reaped pid: it may be someone else's by now
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_in_child(main, argv: List[str], keep_fds=()) -> None:
    """In a freshly forked child: what exec would have given it (default signal handlers, no
    inherited descriptors but stdio and `keep_fds`), then `main(argv)`, and exit with its status
    as the interpreter would (an int, 0 for None, else the object printed and 1); never returns."""
    status = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        low = 3
        for fd in sorted(keep_fds):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        try:
            code = main(argv)
        except SystemExit as exc:   # argparse's errors, --help
            code = exc.code
        if code is None or isinstance(code, int):
            status = code or 0
        else:
            print(code, file=sys.stderr)
    except BaseException:           # uncaught: a traceback and 1, as the interpreter gives
        traceback.print_exc()
    finally:
        # What the interpreter does on its way out: atexit functions (ROBUSTDICE_PROFILE writes
        # its profile from one), then the streams; os._exit then skips the zygote's own clean-up.
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)


def fork_child(argv: List[str], ready_fd: int) -> ForkedProcess:
    """The supervisor's `spawn` on a warm start: `argv` is the exec path's command line
    ([python, -m, module, args...]); the child runs module.main(args + --ready-fd) in a fork."""
    if argv[1:2] != ["-m"] or len(argv) < 3:
        raise ValueError(f"not a `python -m module` command line: {argv[:3]}")
    main = importlib.import_module(argv[2]).main   # imported by the zygote already: no cost
    args = argv[3:] + ["--ready-fd", str(ready_fd)]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        run_in_child(main, args, keep_fds=(ready_fd,))
    return ForkedProcess(pid, argv)


# ------------------------------------------------------------------ the zygote (its own process)
def apply_pythonpath(zygote_path: str, node_path: str) -> None:
    """A node started with its own PYTHONPATH (e.g. a stand-in jtop) finds those modules first,
    as a new interpreter would: the entries go where the interpreter puts them, after sys.path[0].
    Modules the zygote imported already stay as they are (jtop is imported only by the node)."""
    if zygote_path == node_path:
        return
    for entry in filter(None, zygote_path.split(os.pathsep)):
        if os.path.abspath(entry) in sys.path:
            sys.path.remove(os.path.abspath(entry))
    sys.path[1:1] = [os.path.abspath(entry) for entry in node_path.split(os.pathsep) if entry]
    importlib.invalidate_caches()


def enter_job(cwd: str, env: Dict[str, str], stdio) -> None:
    """In a zygote's fresh child: the job's folder, environment (its PYTHONPATH as a new
    interpreter would take it) and standard streams (`stdio`: the fds that become 0, 1 and 2,
    closed once copied)."""
    os.chdir(cwd)
    apply_pythonpath(os.environ.get("PYTHONPATH", ""), env.get("PYTHONPATH", ""))
    os.environ.clear()
    os.environ.update(env)
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    for fd in set(stdio):
        if fd > 2:
            os.close(fd)


def _zygote(workdir: str) -> int:
    """Read one JSON request per line on stdin, fork a supervisor for each and answer with its pid;
    report each one's exit status as it ends. On EOF (the cluster closed, or its process died)
    every node still running is killed with its process group."""
    import torch  # noqa: F401  the point of the zygote: imported once for every node
    from robustdice.node import config, engine, handler, supervisor  # noqa: F401
    from robustdice.partitioner.core import plan  # noqa: F401
    answers = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)   # nothing but answers on the answer pipe
    os.close(null)

    def answer(body: Dict) -> None:
        answers.write(json.dumps(body) + "\n")
        answers.flush()

    answer({"ready": workdir})
    children: Dict[int, int] = {}   # pidfd -> pid
    requests = sys.stdin.buffer
    pending = b""
    while True:
        readable = select.select([requests] + list(children), [], [])[0]
        for fd in [r for r in readable if r is not requests]:
            pid = children.pop(fd)
            os.close(fd)
            _, status = os.waitpid(pid, 0)
            answer({"exited": pid, "status": os.waitstatus_to_exitcode(status)})
        if requests not in readable:
            continue
        data = os.read(requests.fileno(), 65536)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            job = json.loads(line)
            pid = os.fork()
            if pid == 0:
                answers.close()
                os.setsid()   # a process group per node, as LocalCluster's cold start gives
                log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                enter_job(job["cwd"], job["env"], (os.open(os.devnull, os.O_RDONLY), log, log))
                run_in_child(lambda argv: supervisor.main(argv, spawn=fork_child), job["argv"])
            children[os.pidfd_open(pid)] = pid
            answer({"pid": pid})
    for pid in children.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for fd, pid in children.items():
        os.waitpid(pid, 0)
        os.close(fd)
    return 0


# ------------------------------------------------------------------ the cluster's side
class WarmProcess:
    """A node forked by the zygote, with the Popen interface LocalCluster uses. It is the zygote's
    child, so its exit status comes from the zygote's report."""

    def __init__(self, zygote: "Zygote", pid: int, args: List[str]) -> None:
        self._zygote, self.pid, self.args = zygote, pid, args

    @property
    def returncode(self) -> Optional[int]:
        return self._zygote.exit_status(self.pid)

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        with self._zygote.changed:
            if not self._zygote.changed.wait_for(lambda: self.returncode is not None, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """One cluster's warm process: `start(argv, env, log)` forks a node's supervisor from it."""

    def __init__(self, workdir: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "robustdice.node.lab.warm", "--cluster", workdir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.changed = threading.Condition()
        self._pids: List[int] = []
        self._exits: Dict[int, int] = {}
        self._ready = self._closed = False
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()
        with self.changed:
            if not self.changed.wait_for(lambda: self._ready or self.proc.poll() is not None, ZYGOTE_READY_TIMEOUT_S) \
                    or not self._ready:
                self.close()
                raise RuntimeError(f"the cluster's warm process did not start (status {self.proc.poll()})")

    def _read(self) -> None:
        for line in self.proc.stdout:
            body = json.loads(line)
            with self.changed:
                if "ready" in body:
                    self._ready = True
                elif "pid" in body:
                    self._pids.append(body["pid"])
                elif "exited" in body:
                    self._exits[body["exited"]] = body["status"]
                self.changed.notify_all()
        with self.changed:   # the zygote is gone: so are its nodes (it kills them on its way out)
            self._closed = True
            self.changed.notify_all()

    def exit_status(self, pid: int) -> Optional[int]:
        with self.changed:
            if pid in self._exits:
                return self._exits[pid]
            return -signal.SIGKILL if self._closed else None

    def start(self, argv: List[str], env: Dict[str, str], log_path: str) -> WarmProcess:
        with self.changed:
            before = len(self._pids)
            self.proc.stdin.write((json.dumps({"argv": argv, "env": env, "log": log_path, "cwd": os.getcwd()})
                                   + "\n").encode())
            self.proc.stdin.flush()
            if not self.changed.wait_for(lambda: len(self._pids) > before or self._closed, FORK_TIMEOUT_S) \
                    or len(self._pids) <= before:
                raise RuntimeError("the cluster's warm process did not fork the node")
            return WarmProcess(self, self._pids[before], ["robustdice-node", *argv])

    def close(self) -> None:
        """End the zygote: it kills the nodes still running (LocalCluster stops them first)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self.proc.stdout.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m robustdice.node.lab.warm",
                                description="A local cluster's warm process (LocalCluster starts it; not for use by hand).")
    p.add_argument("--cluster", required=True, help="the cluster's folder (shown in ps for every node forked from here)")
    return _zygote(p.parse_args(argv).cluster)


if __name__ == "__main__":
    sys.exit(main())
