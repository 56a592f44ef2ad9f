"""A node behind its peers drops the frames their origin has finished (node/handler.py,
_prune_finished): the real handler of n1 in-process, its sockets bound, no engine, and n0's
heartbeat delivered to its membership as the mesh would deliver it."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.mesh import wire  # noqa: E402
from robustdice.mesh.gather import FINISHED  # noqa: E402
from robustdice.node.config import load_node_config  # noqa: E402
from robustdice.node.frames import MAX_FRAMES_PER_ORIGIN  # noqa: E402
from robustdice.node.handler import Handler  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(60)]


def heartbeat(handler, progress, newest):
    """n0's heartbeat: the frames it still holds (frame -> stages sent) and its newest input."""
    m = handler.mesh.membership
    reason, _ = m.on_heartbeat("n0", time.monotonic(), 1, handler.plan.plan_hash, progress=progress,
                               inputs={"n0": newest})
    assert reason is None, reason


def until_held(handler, frames, timeout_s=5.0):
    """Run the handler's passes until it holds exactly `frames` (housekeeping, which prunes, runs
    every HOUSEKEEPING_S, not on every pass)."""
    def held():
        handler.step(time.monotonic())
        return sorted(handler.book.frames) == sorted(frames)
    nh.wait_for(held, timeout_s, f"the handler to hold {len(frames)} frame(s) of n0", interval_s=0.001)


def test_frames_their_origin_finished_are_dropped_and_free_its_window(digits_plan, tmp_path):
    with LocalCluster(digits_plan, tmp_path / "cluster") as cluster:   # keys and peers.yaml; no process
        handler = Handler(load_node_config(cluster.peers_path, "n1"), f"ipc://{tmp_path}/engine.sock")
        handler.start()
        try:
            x = np.zeros((1, 1, 8, 8), dtype=np.float32)
            window = 2 * MAX_FRAMES_PER_ORIGIN
            frames = [wire.frame_id(0, s) for s in range(window)]
            for f in frames:
                assert handler.book.admit_peer(f, "n0", 0, ("n0", "n1"), x, x.nbytes, time.monotonic(), None) is None
            # n1 is full for n0: without pruning, n0's next input would be dropped, and n0 would
            # then zero-fill n1 although it is alive.
            late = wire.frame_id(0, window)
            assert handler.book.admit_peer(late, "n0", 0, ("n0", "n1"), x, x.nbytes, time.monotonic(), None)

            # n0 has finished all but the newest two (it went on with the replicas' copies)
            heartbeat(handler, {frames[-2]: 1, frames[-1]: 0}, frames[-1])
            until_held(handler, frames[-2:])
            assert handler.book.counters["frames_pruned"] == window - 2
            # what still comes for a pruned frame is routine (logged at DEBUG), not a `late` warning
            ids = np.array(handler.plan.stages[0].holders(2), dtype=np.int32)
            assert handler.mesh.book.add_slice("n2", frames[0], 0, ids, np.zeros((len(ids), 4, 8, 8), np.float32),
                                               time.monotonic()) == FINISHED
            # a frame newer than a heartbeat's newest input is not judged by it: n0 finished
            # frames[-2], and `newer` stays although that heartbeat does not list it
            newer = wire.frame_id(0, window + 1)
            assert handler.book.admit_peer(newer, "n0", 0, ("n0", "n1"), x, x.nbytes, time.monotonic(), None) is None
            heartbeat(handler, {frames[-1]: 1}, frames[-1])
            until_held(handler, [frames[-1], newer])
            # the next one is past `newer` and lists it; n0 finished frames[-1]
            heartbeat(handler, {newer: 0}, newer)
            until_held(handler, [newer])
            assert handler.status(time.monotonic())["frames_pruned"] == window
        finally:
            handler.close()
