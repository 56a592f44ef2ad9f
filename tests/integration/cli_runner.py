"""Run the `robustdice` CLI as its own process, without paying for torch's import each time.

Every offline command imports torch (2.5 s of CPU here, most of a small partition), and the CLI
tests run about seventy of them (`run_node` does the same for `robustdice-node`'s refusals and
`--check`). `run` forks each command from a warm process (a zygote that imported the CLI and
torch once and never ran a torch op): the command still runs in a process
of its own, with its own stdout, stderr, exit status, working directory and environment, as
`subprocess.run` gives them; only the interpreter's start-up is shared. The zygote is
single-threaded, so forking it is safe where forking pytest (live torch thread pools, ZeroMQ
threads) would not be.

The installed script itself is still run as a program elsewhere (`node_helpers.robustdice_cli`:
test_cli_help.py, test_keys_cli.py, the node and deploy tests).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Dict, Optional

# The zygote: imports, then for each request line forks a child that runs the CLI's main with
# stdout and stderr on the request's files, and answers with the child's pid, then its status.
ZYGOTE = r"""
import json, os, sys
import torch
torch.set_num_threads(int(sys.argv[1]))   # the asking worker's share of the cores (tests/conftest.py)
import robustdice.node.cli, robustdice.node.supervisor
import robustdice.partitioner.core.partition, robustdice.partitioner.experiments.evaluate
from robustdice.node.lab.warm import enter_job, run_in_child
mains = {"robustdice": robustdice.node.cli.main, "robustdice-node": robustdice.node.supervisor.main}
requests, answers = sys.stdin, os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1)   # nothing but answers on the answer pipe, whatever an import prints later
answers.write("ready\n"); answers.flush()
for line in requests:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        enter_job(job["cwd"], job["env"], (os.open(os.devnull, os.O_RDONLY),
                                           os.open(job["out"], os.O_WRONLY | os.O_TRUNC),
                                           os.open(job["err"], os.O_WRONLY | os.O_TRUNC)))
        run_in_child(mains[job["prog"]], job["argv"])   # closes the zygote's pipes; exits
    answers.write(json.dumps({"pid": pid}) + "\n"); answers.flush()
    _, wait_status = os.waitpid(pid, 0)
    answers.write(json.dumps({"status": os.waitstatus_to_exitcode(wait_status)}) + "\n"); answers.flush()
"""

_lock = threading.Lock()
_zygote: Optional[subprocess.Popen] = None


def zygote() -> subprocess.Popen:
    """The warm process, started on first use; it ends when this process closes its stdin."""
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        import torch
        _zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(torch.get_num_threads())], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, bufsize=1)
        line = _zygote.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the CLI zygote did not start (it said {line!r}, status {_zygote.poll()})")
        atexit.register(stop)
    return _zygote


def stop() -> None:
    global _zygote
    if _zygote is not None:
        _zygote.stdin.close()
        _zygote.wait(30)
        _zygote.stdout.close()
        _zygote = None


def run_node(*args: object, timeout: Optional[float] = 300, env: Optional[Dict[str, str]] = None
             ) -> subprocess.CompletedProcess:
    """`robustdice-node ARGS...` (its refusals and `--check`), as `run` gives `robustdice`'s."""
    return run(*args, timeout=timeout, env=env, prog="robustdice-node")


def run(*args: object, timeout: Optional[float] = 300, env: Optional[Dict[str, str]] = None,
        prog: str = "robustdice") -> subprocess.CompletedProcess:
    """`robustdice ARGS...` as `subprocess.run(..., capture_output=True, text=True)` returns it."""
    argv = [str(a) for a in args]
    with _lock, tempfile.TemporaryDirectory(prefix="rdcli-") as folder:
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        z = zygote()
        z.stdin.write(json.dumps({"prog": prog, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ if env is None else env),
                                  "out": out_path, "err": err_path}) + "\n")
        z.stdin.flush()
        pid = json.loads(z.stdout.readline())["pid"]
        timer, expired = None, threading.Event()
        if timeout is not None:   # the command is the zygote's child: killing it ends the wait
            def expire():
                expired.set()
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            timer = threading.Timer(timeout, expire)
            timer.start()
        try:
            status = json.loads(z.stdout.readline())["status"]
        finally:
            if timer is not None:
                timer.cancel()
        with open(out_path) as out, open(err_path) as err:
            stdout, stderr = out.read(), err.read()
    if expired.is_set() and status == -signal.SIGKILL:
        raise subprocess.TimeoutExpired([prog, *argv], timeout, stdout, stderr)
    return subprocess.CompletedProcess([prog, *argv], status, stdout, stderr)
