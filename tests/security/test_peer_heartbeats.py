"""Issue 25, item 8, fuzz finding: heartbeats of the largest size the decoder admitted (4,096
`progress` pairs, 256-entry `hears` and `inputs`, 23 KiB) cost 3-5 ms each to decode, so a
listed peer could buy seconds of a node's loop with a few thousand of them. A node now admits
no more than its cluster can send (`wire.Limits`: the peer count, the frames a node can hold, the
plan's stages) and rejects a longer one-frame message before parsing it."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
import mesh_procs as mp  # noqa: E402

from robustdice.mesh import Mesh, load_peers, wire  # noqa: E402
from robustdice.mesh.errors import WireError  # noqa: E402
from robustdice.node.frames import FrameBook  # noqa: E402

IDS = ["a", "b", "c"]
STAGES = 4


def heartbeat(progress=0, peers=(), inputs=()):
    return wire.Heartbeat("b", 1, "p" * 64, "float32", True,
                          {p: (2 ** 62, 2 ** 40) for p in peers}, {i: 2 ** 40 for i in range(progress)},
                          {p: 2 ** 62 for p in inputs})


def fuzzed_heartbeat():
    """What the fuzz sent: the format's bounds, short ids."""
    names = [f"p{i}" for i in range(wire.MAX_PEERS)]
    return wire.Heartbeat("b", 1, "p" * 64, "float32", True, {p: (i, i) for i, p in enumerate(names)},
                          {i: i % 100 for i in range(wire.MAX_PROGRESS)}, {p: i for i, p in enumerate(names)})


@pytest.fixture
def mesh(tmp_path):
    """The mesh of node a of three, as the handler builds it (not started: decoding needs no socket)."""
    config = load_peers(mp.make_config(tmp_path, IDS, insecure=True))
    held = FrameBook("a", IDS, ["s"] * STAGES, [4] * STAGES, frame_timeout_s=10.0).max_frames_held
    return Mesh(config, "a", "P", max_stage=STAGES, max_progress=2 * held)


def test_the_fuzzed_heartbeat_is_rejected_unparsed_at_a_fraction_of_its_decoding_cost(mesh):
    frames = wire.encode(fuzzed_heartbeat())
    assert len(frames[0]) > 20_000
    costs = []
    for _ in range(20):
        t0 = time.perf_counter()
        with pytest.raises(WireError) as caught:
            wire.decode(frames, mesh.config.max_message_bytes, mesh.limits)
        costs.append(time.perf_counter() - t0)
    assert caught.value.reason == "oversized", caught.value
    # It took 5.2 ms to decode (and was accepted); a rejection before parsing takes microseconds.
    assert min(costs) < 0.5e-3, f"{min(costs) * 1e3:.3f} ms"


def test_the_largest_heartbeat_a_node_of_the_cluster_sends_is_admitted(mesh):
    """Within the bounds at the worst encoding: every frame a node can hold at the largest ids,
    64-character peer ids of 4-byte characters, a 128-character plan hash."""
    held = mesh.limits.max_progress // 2
    long_ids = ["\U0001F600" * (wire.MAX_ID_CHARS - 1) + str(i) for i in range(2)]
    hb = wire.Heartbeat("\U0001F600" * wire.MAX_ID_CHARS, 2 ** 63 - 1, "h" * wire.MAX_HASH_CHARS, "float16", True,
                        {p: (2 ** 63 - 1, 2 ** 63 - 1) for p in long_ids[:2]},
                        {wire.MAX_FRAME_ID - i: wire.MAX_FRAME_ID for i in range(2 * held)},
                        {p: wire.MAX_FRAME_ID for p in long_ids[:2] + ["a"]})
    frames = wire.encode(hb)
    assert wire.decode(frames, mesh.config.max_message_bytes, mesh.limits) == hb


@pytest.mark.parametrize("field", ["progress", "hears", "inputs"])
def test_heartbeat_fields_are_bounded_by_the_cluster_not_the_format(mesh, field):
    limits = mesh.limits
    assert (limits.max_peers, limits.max_stages) == (len(IDS), STAGES)
    fields = dict(progress=limits.max_progress, peers=IDS, inputs=IDS)
    ok = wire.encode(heartbeat(**fields))
    assert wire.decode(ok, mesh.config.max_message_bytes, limits).progress
    fields[{"hears": "peers"}.get(field, field)] = (limits.max_progress + 1 if field == "progress"
                                                    else IDS + ["d"])
    with pytest.raises(WireError) as caught:
        wire.decode(wire.encode(heartbeat(**fields)), mesh.config.max_message_bytes, limits)
    assert caught.value.reason == "garbage" and field in caught.value.detail


def test_a_slices_degradation_record_is_bounded_by_the_plans_stages(mesh):
    piece = wire.Slice(1, 0, "b", np.zeros(1, np.int32), np.zeros((1, 2), np.float32),
                       degraded=tuple((s, 1, 1) for s in range(STAGES + 1)))
    frames = wire.encode(wire.Slices((piece,), "b", 1))
    assert wire.decode(frames).slices[0].degraded == piece.degraded   # the format admits it
    with pytest.raises(WireError) as caught:
        wire.decode(frames, mesh.config.max_message_bytes, mesh.limits)
    assert caught.value.reason == "garbage" and "'deg'" in caught.value.detail
