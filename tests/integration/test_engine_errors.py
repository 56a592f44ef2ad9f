"""The engine's error path: a work item that fails is answered with an `error` result naming the
failure, the frame's state is forgotten (and only that frame's), and the engine goes on computing
the next items exactly.

No input that passes the handler's checks (float32, the plan's shape, finite) makes the engine
raise: digits_cnn computes any such input. So this runs the real engine (its shard of a real
plan) and its real `serve` loop in-process: first behind a ZeroMQ socket pair standing in for the
handler, sending it items the handler would never send: an input with the wrong channel count,
a gathered stage for a frame the engine does not hold, and a peer's rows cut short; then behind
the real handler, with a failure injected for large batches (a board's GPU out of memory).
"""
import threading

import numpy as np
import pytest
import torch
import zmq

from robustdice.node import ipc
from robustdice.node.engine import Engine, serve
from robustdice.partitioner.core.runtime import Cluster as Simulation

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(120)]

DEVICE = 1
REPLY_TIMEOUT_MS = 30_000


def input_item(frame: int, x: np.ndarray, alone: bool) -> ipc.Item:
    return {"kind": ipc.INPUT, "frame": frame, "alone": alone, **ipc.describe(x)}, [x]


@pytest.fixture
def engine_behind_a_socket(digits_plan):
    """(engine, the handler's end of the socket pair), with `serve` running in a thread."""
    engine = Engine(str(digits_plan), DEVICE)
    ctx = zmq.Context()
    handler_end, engine_end = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    handler_end.rcvtimeo = REPLY_TIMEOUT_MS
    handler_end.bind("inproc://engine")
    engine_end.connect("inproc://engine")
    stopping = threading.Event()
    thread = threading.Thread(target=serve, args=(engine, engine_end, stopping.is_set), daemon=True)
    thread.start()
    try:
        assert handler_end.recv() == ipc.READY
        yield engine, handler_end
    finally:
        stopping.set()
        thread.join(10)
        assert not thread.is_alive(), "serve did not stop"
        handler_end.close(0)
        engine_end.close(0)
        ctx.term()


def exchange(sock, items):
    """Send work, return the results for it (telemetry, which rides along, left out)."""
    sock.send_multipart(ipc.pack(ipc.WORK, items), copy=False)
    while True:
        kind, results = ipc.unpack(sock.recv_multipart(copy=False))
        assert kind == ipc.RESULTS
        results = [(h, b) for h, b in results if h.get("kind") != "telemetry"]
        if results:
            return results


def test_a_failing_item_is_answered_with_an_error_and_the_next_items_are_exact(engine_behind_a_socket, digits_plan):
    engine, sock = engine_behind_a_socket
    images = torch.Generator().manual_seed(0)
    x = torch.rand((2, 1, 8, 8), generator=images).numpy()
    wrong_channels = np.zeros((1, 2, 8, 8), np.float32)   # digits_cnn takes 1 channel
    expected = Simulation(digits_plan).simulate(torch.from_numpy(x), failed=[0, 2, 3]).numpy()

    results = exchange(sock, [
        input_item(11, x[:1], alone=False),        # frames in progress: 11 must survive the errors,
        input_item(15, x[:1], alone=False),        # 15 fails below and must be forgotten
        input_item(12, wrong_channels, alone=True),
        ({"kind": ipc.GATHERED, "frame": 13, "stage": 0, "failed": [], "from": [], "dtype": "float32",
          "trailing": [8, 8]}, []),                # a gathered stage of a frame it never started
        ({"kind": ipc.GATHERED, "frame": 15, "stage": 0, "failed": [2, 3], "from": [0], "dtype": "float32",
          "trailing": [8, 8]}, [np.zeros(10, np.float32)]),   # device 0's rows, cut short
        input_item(14, x, alone=True),
    ])
    assert [(h["kind"], h["frame"]) for h, _ in results] == [
        (ipc.SLICE, 11), (ipc.SLICE, 15), (ipc.ERROR, 12), (ipc.ERROR, 13), (ipc.ERROR, 15), (ipc.DONE, 14)]
    _, _, (bad_input, _), (unknown, _), (short, _), (done, bufs) = results
    assert bad_input["message"].startswith("RuntimeError: ") and "channels" in bad_input["message"], bad_input
    assert unknown["message"] == "ValueError: frame 13: gathered stage 0 for a frame not at that stage"
    assert short["message"].startswith("ValueError: cannot reshape array of size 10"), short
    np.testing.assert_allclose(ipc.array(bufs[0], done["dtype"], done["shape"]), expected, rtol=1e-5, atol=1e-5)
    # the failed frames are forgotten; the frame in progress is not
    assert set(engine.runs) == set(engine.compute_ms) == set(engine.own) == {11}

    # the failed frame's id is free again, and the engine still answers exactly
    (again, bufs), = exchange(sock, [input_item(12, x[1:], alone=True)])
    assert (again["kind"], again["frame"]) == (ipc.DONE, 12)
    np.testing.assert_allclose(ipc.array(bufs[0], again["dtype"], again["shape"]), expected[1:],
                               rtol=1e-5, atol=1e-5)


def test_the_node_answers_an_engine_failure_with_its_error_and_goes_on(digits_plan, tmp_path):
    """The handler's side: the real handler and engine of node n1 in-process (no supervisor), the
    other nodes absent. The engine fails for a batch over 8 images, as a board's GPU runs out of
    memory; the client gets an error naming the failure, and the next frame's exact answer."""
    from robustdice.node.client import NodeClient
    from robustdice.node.config import load_node_config
    from robustdice.node.handler import Handler
    from robustdice.node.lab.localcluster import LocalCluster

    engine = Engine(str(digits_plan), DEVICE)
    start = engine.runtime.start

    def start_or_run_out_of_memory(x):
        if x.shape[0] > 8:
            raise torch.cuda.OutOfMemoryError(f"out of memory for a batch of {x.shape[0]} (test)")
        return start(x)
    engine.runtime.start = start_or_run_out_of_memory

    x = torch.rand((9, 1, 8, 8), generator=torch.Generator().manual_seed(1)).numpy()
    expected = Simulation(digits_plan).simulate(torch.from_numpy(x[:2]), failed=[0, 2, 3]).numpy()
    with LocalCluster(digits_plan, tmp_path / "cluster") as cluster:   # keys and peers.yaml; no process
        handler = Handler(load_node_config(cluster.peers_path, cluster.ids[DEVICE]), f"ipc://{tmp_path}/engine.sock")
        handler.start()
        loop = threading.Thread(target=handler.run, daemon=True)
        loop.start()
        ctx = zmq.Context()
        engine_end = ctx.socket(zmq.DEALER)
        engine_end.linger = 0
        engine_end.connect(f"ipc://{tmp_path}/engine.sock")
        stopping = threading.Event()
        compute = threading.Thread(target=serve, args=(engine, engine_end, stopping.is_set), daemon=True)
        compute.start()
        try:
            with NodeClient(cluster.config, cluster.ids[DEVICE], cluster.key_path) as client:
                failed = client.submit(x, timeout_s=30.0)
                answered = client.submit(x[:2], timeout_s=30.0)
                status = client.status(10.0)
        finally:
            handler.stop = True
            loop.join(10)
            stopping.set()
            compute.join(10)
            handler.close()
            engine_end.close(0)
            ctx.term()
    assert failed.meta["error"] == "engine: OutOfMemoryError: out of memory for a batch of 9 (test)", failed.meta
    assert not failed.arrays
    assert "error" not in answered.meta, answered.meta
    assert answered.meta["participants"] == [cluster.ids[DEVICE]]
    np.testing.assert_allclose(answered.arrays[0], expected, rtol=1e-5, atol=1e-5)
    assert status["frame_errors"] == 1 and status["frames_done"] == 1, status
