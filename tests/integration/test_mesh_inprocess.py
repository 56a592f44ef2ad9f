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
from robustdice.mesh.membership import EventKind  # noqa: E402

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
        pump([a, b], lambda: linked(a, b))
        yield a, b, events


def linked(a, b) -> bool:
    """Both hear each other, and each has a heartbeat of the other saying so: what a node waits
    for before it counts a peer in a frame. Before that, a heartbeat still on its way may say
    the peer cannot hear the frame's origin, and a gather there rightly releases it."""
    now = time.monotonic()
    return a.membership.hears_us(b.self_id, now) and b.membership.hears_us(a.self_id, now)


def test_gather_and_application_messages(pair):
    a, b, events = pair
    assert [(e.kind, e.peer_id) for e in events] == [("joined", "b")]
    holders = {"a": np.array([0, 2]), "b": np.array([1, 3])}
    local_a = SliceData(holders["a"], np.full((2, 3), 1.0, np.float16))
    b.begin_gather(4, 1, SliceData(holders["b"], np.full((2, 3), 2.0, np.float16)), {"a": holders["a"]}, 4)
    a.begin_gather(4, 1, local_a, {"b": holders["b"]}, 4)
    results = {}

    def both_done():
        for m, name in ((a, "a"), (b, "b")):
            for r in m.take_completed():
                results[name] = r
        return len(results) == 2

    pump([a, b], both_done)
    full, missing = mp.assembled(local_a, results["a"], 4)
    assert full[:, 0].tolist() == [1.0, 2.0, 1.0, 2.0] and full.dtype == np.float16 and not missing.any()
    assert results["a"].contributors == {"a", "b"} and not results["a"].released and results["a"].uncovered == 0
    (piece,) = results["a"].pieces
    assert piece.sender == "b" and piece.neuron_ids.tolist() == [1, 3]

    got = []
    a.send("b", wire.Input(wire.frame_id(0, 9), "a", np.arange(6, dtype=np.uint8), {"client": "c"},
                           participants=("a", "b"), t_ms=123))
    a.broadcast(wire.Control("status", {"q": 1}))
    pump([a, b], lambda: (got.extend(b.take_messages()), len(got) >= 2)[1])
    assert isinstance(got[0], wire.Input) and got[0].sender == "a" and got[0].array.tolist() == list(range(6))
    assert got[0].participants == ("a", "b") and got[0].t_ms == 123
    assert got[1] == wire.Control("status", {"q": 1}, "a", a.incarnation)
    # Peers never send results: one that does is dropped and counted.
    b.send("a", wire.Result(9, "a", {"top1": 4}, (np.array([0.5, 0.25]),)))
    pump([a, b], lambda: a.counters["unexpected_result"] == 1)
    assert a.take_messages() == []


def test_heartbeats_carry_progress_hears_and_readiness(pair):
    """What a peer's gathers decide on: the frames we hold and how far, the inputs we have, whom
    we hear, whether our engine computes."""
    a, b, _ = pair
    a.progress_source = lambda: ({wire.frame_id(1, 7): 2}, {"b": wire.frame_id(1, 7)})
    a.ready = False
    pump([a, b], lambda: (b.membership.report("a") or None) is not None
         and b.membership.report("a").progress == {wire.frame_id(1, 7): 2} and not b.membership.report("a").ready)
    report = b.membership.report("a")
    assert report.inputs == {"b": wire.frame_id(1, 7)}
    assert report.hears["b"][0] == b.incarnation
    # a's engine is not ready: b does not count on a for new frames.
    assert "a" not in b.membership.connected(time.monotonic())
    a.ready = True
    pump([a, b], lambda: "a" in b.membership.connected(time.monotonic()))
    assert b.membership.participants(time.monotonic()) == {"a", "b"}
    assert b.status()["peers"]["a"]["connected"] is True


def test_readiness_is_announced_before_anything_sent_after_it(pair):
    """A node that becomes ready and sends an input at once: the peer must already read "ready"
    in its report of the node when the input arrives, or its gathers of that frame release the
    node as stalled (seen in loaded runs: a restarted node's first frames answered by 1-2 nodes).
    Announced only at the next heartbeat slot, the input overtook it."""
    a, b, _ = pair
    a.ready = False
    pump([a, b], lambda: b.membership.report("a") is not None and not b.membership.report("a").ready)
    for i in range(5):   # several tries, each at a different point of the heartbeat interval
        a.ready = True
        a.send("b", wire.Input(wire.frame_id(0, 100 + i), "a", np.zeros(4, np.uint8), {}, participants=("a", "b")))
        seen = []

        def arrived():
            for m in b.take_messages():
                seen.append(b.membership.report("a").ready)   # what b's gathers would judge by now
            return bool(seen)

        pump([a, b], arrived)
        assert seen == [True], f"try {i}: the input arrived before a's heartbeat said it was ready"
        a.ready = False
        pump([a, b], lambda: not b.membership.report("a").ready)
        time.sleep(0.013 * (i + 1))   # move on within the 100 ms heartbeat interval


def test_a_peer_past_the_stage_is_not_waited_for(pair):
    """A heartbeat says b sent (frame, stage) already, yet nothing came: ZeroMQ keeps order per
    connection, so the slice was lost; a's gather goes on at once instead of waiting out the
    sync timeout (which would be 2 s here)."""
    a, b, _ = pair
    frame = wire.frame_id(1, 5)
    a.begin_gather(frame, 0, SliceData(np.array([0]), np.ones((1, 2), np.float32)), {"b": np.array([1])}, 2)
    b.progress_source = lambda: ({frame: 1}, {"b": frame})
    t0 = time.monotonic()
    done = []
    pump([a, b], lambda: (done.extend(a.take_completed()), done)[1])
    assert done[0].released == {"b": "lost"} and done[0].uncovered == 1
    assert time.monotonic() - t0 < a.config.sync_timeout_ms / 1000.0 / 2


def test_a_peer_busy_with_the_frame_is_waited_for_past_the_sync_timeout(tmp_path):
    """A live peer that says it is still on an earlier stage of this frame, and meanwhile delivers
    the slices of older frames, is busy, not gone: its slice is waited for even after
    sync_timeout_ms, and used when it comes."""
    config = load_peers(mp.make_config(tmp_path, ["a", "b"], sync_timeout_ms=150))
    with Mesh(config, "a", "P") as a, Mesh(config, "b", "P") as b:
        pump([a, b], lambda: linked(a, b))
        frame = wire.frame_id(0, 100)
        b.progress_source = lambda: ({frame: 0}, {"a": frame})   # b has the input, sent nothing yet
        a.begin_gather(frame, 0, SliceData(np.array([0]), np.ones((1, 2), np.float32)), {"b": np.array([1])}, 2)
        t0 = time.monotonic()
        older = iter(range(1, 100))

        def b_delivers_older_work():
            """b computes an older frame's slice every sync timeout / 3; a uses it."""
            if time.monotonic() - b_delivers_older_work.last_s < 0.05:
                return False
            b_delivers_older_work.last_s = time.monotonic()
            old = wire.frame_id(0, next(older))
            a.begin_gather(old, 0, SliceData(np.array([0]), np.ones((1, 2), np.float32)), {"b": np.array([1])}, 2)
            b.begin_gather(old, 0, SliceData(np.array([1]), np.ones((1, 2), np.float32)), {}, 2, send_to=["a"])
            return time.monotonic() - t0 > 3 * 0.150
        b_delivers_older_work.last_s = 0.0
        pump([a, b], b_delivers_older_work)
        pump([a, b], lambda: a.book.active_keys() == [(frame, 0)])   # the older frames' gathers are done
        done = [r for r in a.take_completed() if r.frame == frame]
        assert done == [] and (frame, 0) in a.book.active_keys()
        b.begin_gather(frame, 0, SliceData(np.array([1]), np.full((1, 2), 5.0, np.float32)), {}, 2, send_to=["a"])
        pump([a, b], lambda: (done.extend(r for r in a.take_completed() if r.frame == frame), done)[1])
        assert not done[0].released and done[0].pieces[0].array.tolist() == [[5.0, 5.0]]
        assert a.status()["suspected"] == [] and a.counters["peers_suspected"] == 0


def test_a_peer_that_claims_to_be_busy_but_delivers_nothing_is_released_and_suspected(tmp_path):
    """issue 25: a peer heartbeating "ready, busy with the frame" that never sends a slice cost
    each frame the frame timeout (10 s). Now one sync timeout, and new frames do not wait for it."""
    config = load_peers(mp.make_config(tmp_path, ["a", "b"], sync_timeout_ms=150))
    with Mesh(config, "a", "P") as a, Mesh(config, "b", "P") as b:
        pump([a, b], lambda: linked(a, b))
        frame = wire.frame_id(0, 1)
        b.progress_source = lambda: ({frame: 0}, {"a": frame})   # busy with it, forever
        a.begin_gather(frame, 0, SliceData(np.array([0]), np.ones((1, 2), np.float32)), {"b": np.array([1])}, 2)
        t0 = time.monotonic()
        done = []
        pump([a, b], lambda: (done.extend(a.take_completed()), done)[1])
        assert done[0].released == {"b": "timeout"} and time.monotonic() - t0 < 10 * 0.150
        assert a.status()["suspected"] == ["b"] and a.counters["peers_suspected"] == 1
        a.begin_gather(frame + 1, 0, SliceData(np.array([0]), np.ones((1, 2), np.float32)), {"b": np.array([1])}, 2)
        (second,) = a.take_completed()
        assert second.released == {"b": "suspected"}


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
        died = [e for e in a.process(t) if e.kind == EventKind.DIED and e.peer_id == "b"]
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
        assert a.broadcast(wire.Input(2, "a", np.zeros(8192, np.uint8), {}), to=["b"]) == 0
        assert a.counters["oversized_send"] == 2
        assert a.send("b", wire.Input(3, "a", np.ones(100, np.uint8), {}))
        got = []
        pump([a, b], lambda: (got.extend(b.take_messages()), got)[1])
        assert [m.frame for m in got] == [3]
        assert b.counters["oversized"] == 0 and b.membership.is_alive("a")


def test_a_peer_never_heard_is_not_waited_for(tmp_path):
    config = load_peers(mp.make_config(tmp_path, ["a", "b"], sync_timeout_ms=2000))
    with Mesh(config, "a", "P") as a:
        # "b" never joined: it is not waited for, so the gather ends at once with its rows missing.
        local = SliceData(np.array([0]), np.ones((1, 2), np.float32))
        r = mp.blocking_gather(a, 0, 0, local, {"a": np.array([0]), "b": np.array([1])}, 2)
        assert mp.assembled(local, r, 2)[1].tolist() == [False, True]
        assert r.released == {"b": "dead"} and not r.timed_out and r.elapsed_ms < 50
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
    assert len(warnings) == 2 and "and 99 more like it" in warnings[1].getMessage()
