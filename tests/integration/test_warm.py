"""Warm local clusters (node/lab/warm.py): nodes forked from one process that imported torch
behave as processes: exit statuses, timeouts, signals, names, and nothing left behind."""
from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

import node_helpers as nh
from robustdice.node.errors import NodeError
from robustdice.node.lab.localcluster import LocalCluster
from robustdice.node.lab.warm import ForkedProcess, fork_child

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(120)]


def test_a_forked_process_waits_times_out_and_reports_its_signal():
    pid = os.fork()
    if pid == 0:   # a child that only waits to be signalled
        signal.pause()
        os._exit(0)
    proc = ForkedProcess(pid, ["pause"])
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == -signal.SIGTERM
    assert proc.returncode == -signal.SIGTERM
    proc.kill()   # reaped: signalling it again is a no-op, never a stranger's pid


def test_fork_child_takes_only_python_dash_m_command_lines():
    with pytest.raises(ValueError, match="python -m"):
        fork_child(["/usr/bin/env", "true"], 1)


def test_a_warm_node_that_cannot_start_reports_its_status_and_says_why(digits_plan, tmp_path):
    with LocalCluster(digits_plan, tmp_path / "c") as cluster:
        assert cluster.warm
        proc = cluster.start_node(0, extra=["--plan", str(tmp_path / "no-such-plan")])
        assert proc.wait(60) == 2
        assert "no-such-plan" in cluster.tail(0)
        assert proc.poll() == 2


def test_warm_nodes_are_named_process_groups_and_the_zygote_takes_them_down(digits_plan, tmp_path):
    with LocalCluster(digits_plan, tmp_path / "c") as cluster:
        for d in (0, 1):
            cluster.start_node(d)
        cluster.start_node(2, warm=False)   # as a crashed board comes back (streaming's restarts)
        cluster.wait_until(cluster.all_alive([0, 1, 2]), nh.START_TIMEOUT_S, "warm and cold nodes to count on each other")
        assert isinstance(cluster.procs[2], subprocess.Popen)
        assert "robustdice.node.supervisor" in " ".join(psutil.Process(cluster.procs[2].pid).cmdline())
        assert sorted(nh.node_children(cluster, 2)) == ["engine", "handler"]
        for d in (0, 1):
            node = psutil.Process(cluster.procs[d].pid)
            assert node.name() == "rd-node" and os.getpgid(node.pid) == node.pid
            assert sorted(nh.node_children(cluster, d)) == ["engine", "handler"]
            # Forks show the zygote's command line, which names the cluster's folder.
            assert str(cluster.workdir) in " ".join(nh.node_children(cluster, d)["engine"].cmdline())
        tree = [psutil.Process(cluster.procs[0].pid)] + psutil.Process(cluster.procs[0].pid).children()
        cluster.kill(0)
        assert cluster.procs[0].returncode == -signal.SIGKILL
        psutil.wait_procs(tree, timeout=10)
        assert not any(p.is_running() for p in tree)
        # The zygote's end (its cluster closed, or the test process died) kills what is left.
        survivors = [psutil.Process(cluster.procs[1].pid)] + psutil.Process(cluster.procs[1].pid).children()
        cluster._zygote.close()
        psutil.wait_procs(survivors, timeout=10)
        assert not any(p.is_running() for p in survivors)
        assert cluster.procs[1].poll() is not None
        cluster._zygote = None


def test_a_warm_cluster_refuses_a_prefix(digits_plan, tmp_path):
    with pytest.raises(NodeError, match="warm=False"):
        LocalCluster(digits_plan, tmp_path / "c", prefix=lambda d: ["env"], warm=True)
