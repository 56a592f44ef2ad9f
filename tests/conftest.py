"""Shared fixtures. `leak_check`: fail a test that leaves child processes, fds or sockets behind.

Use it with `pytestmark = pytest.mark.usefixtures("leak_check")` in a test module.
"""
from __future__ import annotations

import os
import time

import psutil
import pytest

LEAK_SETTLE_S = 3.0  # fds and sockets close asynchronously (reader threads, zmq io threads)


def _share_the_cores() -> None:
    """Each pytest-xdist worker computes with its share of the cores. torch takes every core
    by default, and OpenMP threads that share their cores with other busy processes spin-wait
    for each other: beside two busy processes, alexnet's cdc partition-and-verify test took 33 s
    of CPU (45 s wall) with 2 threads and 20 s (32 s wall) with 1."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores()


def _inet_sockets(proc: psutil.Process) -> int:
    getter = getattr(proc, "net_connections", None) or proc.connections
    return len(getter(kind="inet"))


@pytest.fixture
def leak_check():
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    fds_before = me.num_fds()
    sockets_before = _inet_sockets(me)
    yield
    leaked = [p for p in me.children(recursive=True) if p.pid not in children_before]
    for p in leaked:  # kill them so one failure does not poison the next tests
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leaked, timeout=5)
    assert not leaked, f"child processes left alive: {[(p.pid, p.name()) for p in leaked if p.is_running()] or leaked}"
    deadline = time.monotonic() + LEAK_SETTLE_S
    while True:
        fds, sockets = me.num_fds(), _inet_sockets(me)
        if (fds <= fds_before and sockets <= sockets_before) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling a condition with a deadline, not synchronising on sleep
    assert fds <= fds_before, f"file descriptors leaked: {fds_before} before, {fds} after: {os.listdir('/proc/self/fd')}"
    assert sockets <= sockets_before, f"inet sockets leaked: {sockets_before} before, {sockets} after"


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="session")
def load_benchmark():
    """load_benchmark("robustness") -> benchmarks/robustness.py as a module. The scripts run as
    `python benchmarks/NAME.py` and import their neighbours (_results, robustness) by bare name,
    so their folder is on sys.path while one loads."""
    import importlib.util
    import sys
    loaded = {}

    def load(name: str):
        if name not in loaded:
            sys.path.insert(0, BENCHMARKS)
            try:
                spec = importlib.util.spec_from_file_location(f"{name}_bench", os.path.join(BENCHMARKS, f"{name}.py"))
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                loaded[name] = module
            finally:
                sys.path.remove(BENCHMARKS)
        return loaded[name]
    return load


# Security cases outside tests/security/: the unit's sandbox, the deploy's owners and modes, key
# files' modes, CURVE, hostile input and the wire fuzz (`pytest -m security` runs them with it).
SECURITY_FILES = {"test_systemd_unit.py", "test_mesh_keys_perms.py", "test_deploy.py", "test_keys_cli.py",
                  "test_mesh_security.py", "test_hardening.py", "test_wire_fuzz.py", "test_mesh_zap.py"}


# Seconds each of the slowest test files took in `make test` (3 workers, 2 cores, 2026-12-08).
# pytest-xdist hands whole files to its workers in collection order (`--dist loadfile
# --no-loadscope-reorder`, as the Makefile runs it): the longest first, so that the last files
# are short and no worker waits long for the others at the end (by default xdist orders files
# by their number of tests, and the deploy test, alone in its file and among the longest, came
# late). Only the order depends on this table; a stale entry costs balance, never a test.
SLOW_FILES_S = {
    "integration/test_partition_cli.py": 186, "integration/test_node.py": 158, "integration/test_deploy.py": 133,
    "integration/test_hardening.py": 95, "integration/test_own_model.py": 58, "integration/test_node_cluster.py": 58,
    "unit/test_fill.py": 54, "integration/test_dataflow.py": 53, "integration/test_netlab.py": 48,
    "integration/test_default_plan_cli.py": 48, "integration/test_rocoin_cli.py": 40,
    "unit/test_robustness_versus.py": 37, "integration/test_fill_node.py": 32, "integration/test_rollout.py": 31,
    "integration/test_dtype_device.py": 31, "integration/test_capacities_cli.py": 23,
    "integration/test_rocoin_node.py": 21, "unit/test_layout.py": 21, "unit/test_wire_fuzz.py": 21,
    "integration/test_warm.py": 20, "unit/test_models.py": 17, "integration/test_energy_jtop.py": 17,
}


def pytest_collection_modifyitems(session, config, items) -> None:
    # One hook: a second definition of the same name would replace the first in this module.
    from robustdice.partitioner.zoo.photos import photos_missing

    missing = photos_missing() if any(item.get_closest_marker("needs_photos") for item in items) else None
    for item in items:
        if item.path.parent.name == "security" or item.path.name in SECURITY_FILES:
            item.add_marker(pytest.mark.security)
        if missing and item.get_closest_marker("needs_photos"):
            item.add_marker(pytest.mark.skip(reason=missing))

    def seconds(item) -> float:
        path = item.nodeid.split("::")[0]
        return SLOW_FILES_S.get(path.split("tests/", 1)[-1], 0.0)
    items.sort(key=lambda item: -seconds(item))   # stable: files stay whole, tests keep their order
