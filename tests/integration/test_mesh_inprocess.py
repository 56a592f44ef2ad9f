"""Two meshes in one process (one context each), driven by one poller: the API surface a node uses."""
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mesh_procs as mp  # noqa: E402

from robustdice.mesh import Mesh, MeshError, SliceData, load_peers, wire  # noqa: E402
from robustdice.mesh import mesh as mesh_module  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(60)]


def pump(meshes, until, timeout_s=10.0):
    """Run every mesh's loop through one poller until `until()` is true."""
    poller = zmq.Poller()
    for m in meshes:
        for s in m.sockets:
            poller.register(s, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        now = time.monotonic()
        poller.poll(min(m.next_due(now) for m in meshes) * 1000.0)
        for m in meshes:
            m.process(time.monotonic())


@pytest.fixture(params=["curve", "insecure"])
def pair(request, tmp_path):
    config = load_peers(mp.make_config(tmp_path, ["a", "b"], insecure=request.param == "insecure"))
    events = []
    a = Mesh(config, "a", "P", on_event=events.append)
    b = Mesh(config, "b", "P")
    with a, b:
        pump([a, b], lambda: a.membership.is_alive("b") and b.membership.is_alive("a"))
        yield a, b, events


def test_gather_and_application_messages(pair):
    a, b, events = pair
    assert [(e.kind, e.peer_id) for e in events] == [("joined", "b")]
    holders = {"a": np.array([0, 2]), "b": np.array([1, 3])}
    b.begin_gather(4, 1, SliceData(holders["b"], np.full((2, 3), 2.0, np.float16)), holders, 4)
    result = None

    def a_done():
        nonlocal result
        done = a.take_completed()
        result = done[0] if done else result
        return result is not None

    a.begin_gather(4, 1, SliceData(holders["a"], np.full((2, 3), 1.0, np.float16)), holders, 4)
    pump([a, b], a_done)
    assert result.array[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0] and result.array.dtype == np.float16
    assert result.contributors == {"a", "b"} and not result.zero_mask.any()
    pump([a, b], lambda: bool(b._completed))
    assert b.take_completed()[0].array[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0]

    got = []
    a.send("b", wire.Input(9, "a", np.arange(6, dtype=np.uint8), {"client": "c"}))
    a.broadcast(wire.Control("status", {"q": 1}))
    b.send("a", wire.Result(9, "a", {"top1": 4}, (np.array([0.5, 0.25]), np.zeros(2, bool))))
    pump([a, b], lambda: (got.extend(b.take_messages()), len(got) >= 2)[1])
    assert isinstance(got[0], wire.Input) and got[0].sender == "a" and got[0].array.tolist() == list(range(6))
    assert got[1] == wire.Control("status", {"q": 1}, "a", a.incarnation)
    back = []
    pump([a, b], lambda: (back.extend(a.take_messages()), back)[1])
    assert back[0].meta == {"top1": 4} and back[0].arrays[0].tolist() == [0.5, 0.25]


def test_newest_frame_travels_in_heartbeats_and_status(pair):
    a, b, _ = pair
    a.newest_frame = 77
    pump([a, b], lambda: b.status()["peers"]["a"]["newest_frame"] == 77)
    status = b.status()
    assert status["peers"]["a"]["state"] == "alive" and status["peers"]["a"]["incarnation"] == a.incarnation


def test_own_stall_does_not_make_peers_dead(pair):
    """After this node itself was not running, its peers' heartbeats may still be unread, so it
    must wait before judging them; a peer that stays silent is still declared dead after that."""
    a, b, events = pair
    now = time.monotonic()
    a.process(now)
    gap_s = 2 * a.config.peer_timeout_ms / 1000.0  # far past the peer timeout
    assert a.process(now + gap_s) == [] and a.membership.is_alive("b")
    assert a.counters["self_stalls"] == 1
    assert a.next_due(now + gap_s) <= a.stall_grace_s + 0.001  # the loop wakes when the hold ends
    # b is never processed again, so it sends no more heartbeats: walking a's clock on, b dies,
    # and not before the hold ends. (Heartbeats b sent before may still be drained on the way;
    # each only restarts b's timeout from that step, so the walk has a real-time deadline.)
    hold_end, t, died = now + gap_s + a.stall_grace_s, now + gap_s, []
    deadline = time.monotonic() + 10.0
    while not died and time.monotonic() < deadline:
        t += 0.01
        died = [e for e in a.process(t) if e.kind == "died" and e.peer_id == "b"]
    assert died and died[0].now_s >= hold_end


def test_oversized_message_is_counted_and_not_sent(tmp_path):
    """A message over max_message_bytes would make the receiver's libzmq drop the connection
    (and what is queued behind it): the sender counts it instead, and the mesh goes on."""
    path = mp.make_config(tmp_path, ["a", "b"])
    path.write_text(path.read_text() + "max_message_bytes: 4096\n")
    config = load_peers(path)
    a, b = Mesh(config, "a", "P"), Mesh(config, "b", "P")
    with a, b:
        pump([a, b], lambda: a.membership.is_alive("b") and b.membership.is_alive("a"))
        assert a.send("b", wire.Input(1, "a", np.zeros(8192, np.uint8), {})) is False
        assert a.broadcast(wire.Input(2, "a", np.zeros(8192, np.uint8), {})) == 0
        assert a.counters["oversized_send"] == 2
        assert a.send("b", wire.Input(3, "a", np.ones(100, np.uint8), {}))
        got = []
        pump([a, b], lambda: (got.extend(b.take_messages()), got)[1])
        assert [m.frame for m in got] == [3]
        assert b.counters["oversized"] == 0 and b.membership.is_alive("a")


def test_blocking_gather_alone_zero_fills_the_silent_peer(tmp_path):
    config = load_peers(mp.make_config(tmp_path, ["a", "b"], sync_timeout_ms=100))
    with Mesh(config, "a", "P") as a:
        # "b" never joined: it is not waited for, so the gather ends at once with its rows zero.
        r = a.gather(0, 0, SliceData(np.array([0]), np.ones((1, 2), np.float32)), {"b": [1]}, 2)
        assert r.zero_mask.tolist() == [False, True] and not r.timed_out and r.elapsed_ms < 50
        with pytest.raises(MeshError):
            a.send("zz", wire.Control("x"))
    a.close()  # idempotent


def test_wrong_secret_key_is_a_config_error(tmp_path):
    config_path = mp.make_config(tmp_path, ["a", "b"])
    (tmp_path / "keys" / "a.key_secret").write_bytes((tmp_path / "keys" / "b.key_secret").read_bytes())
    with pytest.raises(MeshError, match="public key"):
        Mesh(load_peers(config_path), "a", "P").start()


def test_drop_logging_is_rate_limited(tmp_path, caplog):
    config = load_peers(mp.make_config(tmp_path, ["a", "b"], insecure=True))
    mesh = Mesh(config, "a", "P")  # counting needs no sockets
    caplog.set_level(logging.WARNING, logger=mesh_module.__name__)
    for k in range(100):
        mesh._drop("garbage", now_s=k * 0.1)  # 10 s of drops
    mesh._drop("garbage", now_s=10.5)
    warnings = [r for r in caplog.records if "garbage" in r.getMessage()]
    assert mesh.counters["garbage"] == 101
    assert len(warnings) == 2 and "dropped 100 message(s)" in warnings[1].getMessage()
