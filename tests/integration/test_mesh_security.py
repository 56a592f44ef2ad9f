"""Who may talk to a node, and what garbage does to it."""
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mesh_procs as mp  # noqa: E402
from node_helpers import wait_for  # noqa: E402

from robustdice.mesh import Mesh, load_peers  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(90)]

IDS = ["n0", "n1", "n2", "n3"]
N_NEURONS = 32
DROP_REASONS = ("garbage", "truncated", "oversized", "bad_version", "bad_type", "bad_dtype", "bad_shape", "spoofed")


def counters(node):
    return node.status()["counters"]


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def pusher(ctx, endpoint, keys=None, server_key=None):
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey = keys
        sock.curve_serverkey = server_key
    sock.connect(endpoint)
    return sock


def test_unlisted_key_and_plaintext_are_refused(tmp_path, context):
    config_path = mp.make_config(tmp_path, IDS[:2])
    config = load_peers(config_path)
    target = config.peer("n0")
    with mp.Cluster(config_path, IDS[:2]) as c:
        c.wait_all_joined()
        plain = pusher(context, target.endpoint)
        plain.send_multipart([b"not", b"authenticated"])
        wait_for(lambda: counters(c.nodes["n0"]).get("handshake_failed", 0) >= 1, 10, "plaintext refused")
        stranger = pusher(context, target.endpoint, zmq.curve_keypair(), target.public_key.encode())
        stranger.send_multipart([b"garbage from a stranger"])
        seen = wait_for(lambda: (lambda k: k if k.get("unauthenticated", 0) >= 1 else None)(counters(c.nodes["n0"])),
                          10, "unlisted key refused")
        # Nothing reached the decoder, and the honest peer is unaffected.
        assert not any(seen.get(r) for r in DROP_REASONS), seen
        assert c.nodes["n0"].status()["peers"]["n1"]["state"] == "alive"
        plain.close()
        stranger.close()


def test_client_port_admits_listed_client_keys_only(tmp_path, context):
    config = load_peers(mp.make_config(tmp_path, ["n0", "n1"], clients=["ops"]))
    ops_keys = zmq.auth.load_certificate(tmp_path / "keys" / "ops.key_secret")
    with Mesh(config, "n0", "plan-A", context=context) as mesh:
        router = mesh.client_socket(zmq.ROUTER)
        server_key = config.peer("n0").public_key.encode()

        def dealer(keys):
            d = context.socket(zmq.DEALER)
            d.linger = 0
            d.curve_publickey, d.curve_secretkey = keys
            d.curve_serverkey = server_key
            d.connect(config.peer("n0").client_endpoint)
            return d

        good, bad = dealer(ops_keys), dealer(zmq.curve_keypair())
        good.send(b"hello from ops")
        bad.send(b"hello from nobody")
        received = []
        deadline = time.monotonic() + 10
        while (not received or mesh.counters["unauthenticated"] < 1) and time.monotonic() < deadline:
            mesh.poll_once(0.02)  # the ZAP handler is served by the mesh's own loop
            while router.poll(0):
                received.append(router.recv_multipart()[-1])
        assert received == [b"hello from ops"]
        assert mesh.counters["unauthenticated"] == 1
        good.close()
        bad.close()


def garbage_messages(rng, count):
    """Malformed or truncated messages, each a reason the node must count it under."""
    def h(item=None, **over):
        slice_ = {"frame": 5, "stage": 0, "dtype": "float32", "shape": [2, 2], "deg": []}
        slice_.update(item or {})
        base = {"v": 2, "t": "slices", "sender": "g", "inc": 1, "slices": [slice_]}
        base.update(over)
        return msgpack.packb(base)

    ids, payload = np.arange(2, dtype="<i4").tobytes(), np.zeros((2, 2), "<f4").tobytes()
    kinds = [
        ("garbage", lambda: [rng.bytes(int(rng.integers(1, 200)))]),
        ("truncated", lambda: [h()[:-2]]),
        ("truncated", lambda: [h(), ids]),
        ("bad_version", lambda: [h(v=9), ids, payload]),
        ("bad_type", lambda: [h(t="???"), ids, payload]),
        ("bad_dtype", lambda: [h(item={"dtype": "complex128"}), ids, payload]),
        ("bad_shape", lambda: [h(), ids, payload[:-1]]),
        ("oversized", lambda: [h(item={"shape": [2, 1 << 30]}), ids, payload]),
        ("spoofed", lambda: [msgpack.packb({"v": 2, "t": "hb", "sender": "n0", "inc": 1, "plan": "plan-A",
                                            "dtype": "float32", "ready": True, "hears": {}, "progress": [],
                                            "inputs": {}})]),
    ]
    out = []
    for k in range(count):
        reason, make = kinds[k % len(kinds)]
        out.append((reason, make()))
    return out


def test_garbage_flood_leaves_a_node_gathering_correctly(tmp_path, context):
    # "g" is a listed peer that never runs a mesh: its key gets the garbage past CURVE and ZAP.
    config_path = mp.make_config(tmp_path, IDS + ["g"], heartbeat_interval_ms=30, peer_timeout_ms=300,
                                 sync_timeout_ms=3000)
    config = load_peers(config_path)
    target = config.peer("n1")
    g_keys = zmq.auth.load_certificate(tmp_path / "keys" / "g.key_secret")
    rng = np.random.default_rng(5)
    flood = garbage_messages(rng, 10_000)
    expected = {}
    for reason, _ in flood:
        expected[reason] = expected.get(reason, 0) + 1
    holders = mp.assignment(np.random.default_rng(9), IDS, N_NEURONS, replicas=0.0)
    with mp.Cluster(config_path, IDS) as c:
        c.wait_all_joined()
        sock = pusher(context, target.endpoint, g_keys, target.public_key.encode())
        for i in IDS:
            c.nodes[i].command(op="gathers", frames=list(range(40)), stages=3, holders=holders, n=N_NEURONS)
        for _, frames in flood:
            sock.send_multipart(frames)
        results = {i: c.nodes[i].wait_for(lambda l: l.get("event") == "gathers", 60)["results"] for i in IDS}
        for node, rs in results.items():
            assert len(rs) == 120
            for r in rs:
                assert r["exact"] and not r["zero"] and not r["timed_out"], (node, r)
        got = wait_for(lambda: (lambda k: k if sum(k.get(r, 0) for r in DROP_REASONS) >= 10_000 else None)(
            counters(c.nodes["n1"])), 30, "all garbage counted")
        # Random bytes are sometimes a cut-off msgpack value, so garbage and truncated share a sum.

        def merged(d):
            out = {("garbage" if r == "truncated" else r): 0 for r in d}
            for r, n in d.items():
                out["garbage" if r == "truncated" else r] += n
            return out
        assert merged({r: got.get(r, 0) for r in expected}) == merged(expected)
        assert got.get("truncated", 0) >= expected["truncated"]
        # The honest peers are still alive and nobody mistook "g" for a member.
        peers = c.nodes["n1"].status()["peers"]
        assert all(peers[i]["state"] == "alive" for i in IDS if i != "n1") and peers["g"]["state"] == "unknown"
        # and gathering still works after the flood
        check = c.gathers(IDS, frames=[100], stages=2, holders=holders, n=N_NEURONS)
        assert all(r["exact"] and not r["zero"] for rs in check.values() for r in rs)
        sock.close()
