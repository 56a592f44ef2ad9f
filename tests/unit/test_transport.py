"""send_parts: the node's multipart send, on real ZeroMQ sockets."""
import numpy as np
import pytest
import zmq

from robustdice.mesh.transport import send_parts


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    b.bind("inproc://send-parts")
    a.connect("inproc://send-parts")
    b.rcvtimeo = 2000   # a message left open (SNDMORE on its last part) fails, never hangs
    yield a, b
    a.close(0)
    b.close(0)
    ctx.term()


def test_parts_arrive_as_one_message_in_order(pair):
    a, b = pair
    big = np.arange(40_000, dtype=np.float32)           # above pyzmq's copy threshold: zero-copy
    parts = [b"kind", memoryview(b"header"), np.arange(5, dtype=np.int32).view(np.uint8), big.view(np.uint8)]
    send_parts(a, parts)
    send_parts(a, [b"second"])
    got = b.recv_multipart()
    assert got[:2] == [b"kind", b"header"]
    assert np.array_equal(np.frombuffer(got[2], dtype=np.int32), np.arange(5))
    assert np.array_equal(np.frombuffer(got[3], dtype=np.float32), big)
    assert b.recv_multipart() == [b"second"]
    assert not b.poll(0)


def test_noblock_on_a_full_queue_raises_and_queues_nothing_partial(pair):
    a, b = pair
    a.sndhwm = b.rcvhwm = 1
    sent = 0
    with pytest.raises(zmq.Again):
        for _ in range(10_000):
            send_parts(a, [b"x", b"y", b"z"], zmq.NOBLOCK)
            sent += 1
    assert sent >= 1
    for _ in range(sent):
        assert b.recv_multipart() == [b"x", b"y", b"z"]   # every message whole
    assert not b.poll(0)
