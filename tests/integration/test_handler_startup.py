"""A starting node serves clients only once its peers could have heard it ready (node/handler.py,
_check_serving): the start-up grace counts from the engine's first READY, not from the handler's
start. Counted from the start, an engine that took longer than the grace to load (a slow board,
a busy CI machine) left no grace at all, and frames that clients had queued ran on this node
alone (seen in CI: participants ['n3'] after a restart). And with every peer heard, it still
waits for its own engine: its peers would release it, as stalled, from any frame started before."""
import sys
import time
from pathlib import Path

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.node import ipc  # noqa: E402
from robustdice.node.config import load_node_config  # noqa: E402
from robustdice.node.handler import Handler  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(60)]


def run_for(step, seconds, check=lambda: None):
    """Let `seconds` pass with nothing to wait for, calling `step` and then `check` on each pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        step()
        check()
        time.sleep(0.002)   # the handler's loop would block in poll; nothing to wait for here


def test_the_start_up_grace_counts_from_the_engines_first_ready(digits_plan, tmp_path):
    with LocalCluster(digits_plan, tmp_path / "cluster") as cluster:   # keys and peers.yaml; no peer runs
        config = load_node_config(cluster.peers_path, "n1")
        grace_s = config.startup_grace_s
        endpoint = f"ipc://{tmp_path}/engine.sock"
        handler = Handler(config, endpoint)
        handler.start()
        context = zmq.Context()
        engine = context.socket(zmq.DEALER)
        engine.linger = 0
        try:
            # The engine is still loading for longer than the whole grace: no peer can count on
            # this node yet, so it must not serve.
            run_for(lambda: handler.step(time.monotonic()), 1.5 * grace_s)
            assert not handler.serving and not handler.engine_window.ready

            engine.connect(endpoint)
            engine.send(ipc.READY)
            nh.wait_for(lambda: handler.step(time.monotonic()) or handler.mesh.ready, 5, "the engine's READY",
                        interval_s=0.001)
            ready_s = time.monotonic()
            assert not handler.serving, "served at once: the grace had run out before the engine was ready"
            nh.wait_for(lambda: handler.step(time.monotonic()) or handler.serving, 5 * grace_s, "serving",
                        interval_s=0.001)
            # No peer answered, so only the grace let it serve, and the whole grace was waited.
            assert time.monotonic() - ready_s >= 0.9 * grace_s
            assert handler.status(time.monotonic())["serving"]
        finally:
            engine.close(0)
            context.term()
            handler.close()


def test_a_node_whose_peers_all_answer_serves_only_once_its_own_engine_is_ready(digits_plan, tmp_path):
    """Every peer heard and ready, our engine still loading: not serving. A frame started then
    would reach peers whose latest report from us says "not ready", and they would release us
    from it as stalled (seen in loaded runs: a restarted node's first frames were answered by
    one or two nodes)."""
    from robustdice.mesh import Mesh, load_peers
    with LocalCluster(digits_plan, tmp_path / "cluster") as cluster:   # keys and peers.yaml; no node runs
        config = load_node_config(cluster.peers_path, "n1")
        endpoint = f"ipc://{tmp_path}/engine.sock"
        handler = Handler(config, endpoint)
        handler.start()
        peers = load_peers(cluster.peers_path)
        others = [Mesh(peers, p, handler.plan.plan_hash).start() for p in ("n0", "n2", "n3")]
        context = zmq.Context()
        engine = context.socket(zmq.DEALER)
        engine.linger = 0

        def step_all() -> None:
            now = time.monotonic()
            handler.step(now)
            for m in others:
                m.process(now)

        try:
            connected = lambda: step_all() or handler.mesh.membership.connected(time.monotonic()) == {"n0", "n2", "n3"}
            nh.wait_for(connected, 10, "n1 to hear every peer ready, hearing it", interval_s=0.002)
            # Longer than the grace and several heartbeats: the old rule served here at once.
            def not_serving() -> None:
                assert not handler.serving, "served with every peer heard but its own engine not ready"

            run_for(step_all, 1.5 * config.startup_grace_s, not_serving)
            engine.connect(endpoint)
            engine.send(ipc.READY)
            nh.wait_for(lambda: step_all() or handler.serving, 5, "serving once the engine is ready",
                        interval_s=0.002)
            # The peers learn it (the mesh test checks that this comes ahead of any frame).
            nh.wait_for(lambda: step_all() or all(m.membership.report("n1").ready for m in others), 5,
                        "every peer to read n1 as ready", interval_s=0.002)
        finally:
            engine.close(0)
            context.term()
            for m in others:
                m.close()
            handler.close()
