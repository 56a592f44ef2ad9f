"""Issue 25, item 8, fuzz finding: a peer's slice of finite but huge values (3e38) passed every
check, a later stage overflowed, and the non-finite logits were answered as a prediction with no
error. Now a slice of this device that is not finite ends the frame at the engine with an error
`not_finite`, and logits that are not finite are an error answer (node/frames.py), counted."""
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
import node_helpers as nh  # noqa: E402

from robustdice.mesh import wire  # noqa: E402
from robustdice.node import ipc  # noqa: E402
from robustdice.node.engine import Engine, serve  # noqa: E402
from robustdice.node.frames import FrameBook  # noqa: E402

NODES = ["n0", "n1", "n2"]
DEVICE = 1


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("origin", ["n0", "n1"], ids=["own", "peers"])
def test_logits_that_are_not_finite_are_an_error_answer_never_a_prediction(bad, origin):
    book = FrameBook("n0", NODES, ["s0"], [10], frame_timeout_s=5.0)
    frame = wire.frame_id(NODES.index(origin), 1)
    if origin == "n0":
        assert book.admit_local(frame, 1, "x", 100, b"client", {}, 0.0) is None
        book.start(frame, NODES)
    else:
        assert book.admit_peer(frame, origin, 1, NODES, "x", 100, 0.0, None) is None
    book.next_work()
    logits = np.zeros((1, 10), np.float32)
    logits[0, 3] = bad
    f = book.on_done(frame, logits, {}, 1.0, 0.5)
    assert f is not None and f.logits is None
    assert book.counters["frames_not_finite"] == 1 and book.stats()["frames_not_finite"] == 1
    if origin == "n0":
        (answered,) = book.take_answers()
        assert "prediction" not in answered.answer and "NaN or infinite" in answered.answer["error"]
    else:
        assert frame not in book.frames
    assert book.in_flight() == 0 and book._queued_bytes == 0


def test_finite_logits_are_still_a_prediction():
    book = FrameBook("n0", NODES, ["s0"], [10], frame_timeout_s=5.0)
    frame = wire.frame_id(0, 1)
    book.admit_local(frame, 1, "x", 100, b"client", {}, 0.0)
    book.start(frame, NODES)
    book.next_work()
    book.on_done(frame, np.full((1, 10), 3e38, np.float32), {}, 1.0, 0.5)
    (answered,) = book.take_answers()
    assert answered.answer["prediction"] == [0] and book.counters["frames_not_finite"] == 0


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    nh.start_pyzmq_gc()
    return nh.make_plan(tmp_path_factory, "digits_cnn", 4, "robust")


def test_huge_finite_rows_from_a_peer_make_the_frame_an_engine_error(digits_plan):
    """The real engine (device 1's shard of digits_cnn) behind a socket, as the handler drives it:
    its stage-0 slice goes out, device 0's rows come back as 3e38, and the stage after overflows."""
    engine = Engine(str(digits_plan), DEVICE)
    ctx = zmq.Context()
    handler_end, engine_end = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    handler_end.rcvtimeo = 30_000
    handler_end.bind("inproc://engine")
    engine_end.connect("inproc://engine")
    stopping = threading.Event()
    thread = threading.Thread(target=serve, args=(engine, engine_end, stopping.is_set), daemon=True)
    thread.start()

    def exchange(items):
        handler_end.send_multipart(ipc.pack(ipc.WORK, items), copy=False)
        while True:
            kind, results = ipc.unpack(handler_end.recv_multipart(copy=False))
            results = [(h, b) for h, b in results if h.get("kind") != "telemetry"]
            if results:
                return results

    try:
        assert handler_end.recv() == ipc.READY
        x = torch.rand((1, 1, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
        ((first, bufs),) = exchange([({"kind": ipc.INPUT, "frame": 5, "alone": False, **ipc.describe(x)}, [x])])
        assert first["kind"] == ipc.SLICE and first["stage"] == 0
        trailing = first["shape"][1:]
        rows = engine.assembler.counts[0][0]
        huge = np.full([rows] + trailing, 3e38, np.float32)
        assert np.isfinite(huge).all()
        ((result, _),) = exchange([({"kind": ipc.GATHERED, "frame": 5, "stage": 0, "failed": [2, 3], "from": [0],
                                     "dtype": "float32", "trailing": trailing}, [huge])])
        assert result["kind"] == ipc.ERROR and result.get("reason") == ipc.NOT_FINITE, result
        assert "NaN or infinite" in result["message"] and 5 not in engine.runs
    finally:
        stopping.set()
        thread.join(10)
        handler_end.close(0)
        engine_end.close(0)
        ctx.term()
