import msgpack
import numpy as np
import pytest

from robustdice.mesh import wire
from robustdice.mesh.errors import MeshError, WireError


def _frames_as_bytes(frames):
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


def roundtrip(msg):
    return wire.decode(_frames_as_bytes(wire.encode(msg)))


@pytest.mark.parametrize("dtype", sorted(wire.ALLOWED_DTYPES))
def test_slice_roundtrip_every_dtype(dtype):
    array = (np.arange(24).reshape(4, 3, 2) % 2).astype(dtype)
    msg = wire.Slice(7, 3, "n1", np.array([5, 0, 9, 2]), array, incarnation=11)
    out = roundtrip(msg)
    assert (out.frame, out.stage, out.sender, out.incarnation) == (7, 3, "n1", 11)
    assert out.neuron_ids.dtype == np.int32 and out.neuron_ids.tolist() == [5, 0, 9, 2]
    assert out.array.dtype == np.dtype(dtype) and out.array.shape == (4, 3, 2)
    np.testing.assert_array_equal(out.array, array)


def test_slice_payload_is_a_view_of_the_frame_not_a_copy():
    frames = _frames_as_bytes(wire.encode(wire.Slice(0, 0, "a", np.arange(3), np.ones((3, 2), np.float32))))
    out = wire.decode(frames)
    assert not out.array.flags.owndata and not out.array.flags.writeable


def test_encode_does_not_copy_the_array():
    array = np.ones((4, 256), np.float32)
    frames = wire.encode(wire.Slice(0, 0, "a", np.arange(4), array))
    assert np.shares_memory(frames[2], array)


def test_other_messages_roundtrip():
    hb = roundtrip(wire.Heartbeat("n0", 3, "hash", 42))
    assert hb == wire.Heartbeat("n0", 3, "hash", 42) and hb.sender == "n0"
    inp = roundtrip(wire.Input(5, "n2", np.arange(6, dtype=np.uint8).reshape(2, 3), {"client": "c1"}, "n2", 1))
    assert (inp.frame, inp.origin, inp.meta, inp.sender) == (5, "n2", {"client": "c1"}, "n2")
    assert inp.array.tolist() == [[0, 1, 2], [3, 4, 5]]
    res = roundtrip(wire.Result(5, "n2", {"top1": 3}, (np.zeros(3, bool), np.arange(2.0)), "n1"))
    assert res.meta == {"top1": 3} and len(res.arrays) == 2 and res.arrays[1].tolist() == [0.0, 1.0]
    ctl = roundtrip(wire.Control("status", {"verbose": True}, "n3"))
    assert ctl == wire.Control("status", {"verbose": True}, "n3")


def test_big_endian_input_is_sent_little_endian():
    out = roundtrip(wire.Slice(0, 0, "a", [0, 1], np.array([1.5, -2.0], dtype=">f8")))
    assert out.array.tolist() == [1.5, -2.0]


def test_encode_rejects_misuse():
    with pytest.raises(MeshError):
        wire.encode(wire.Slice(0, 0, "a", [0], np.zeros(2, np.complex64)))
    with pytest.raises(MeshError):
        wire.encode(wire.Slice(0, 0, "a", [0, 1, 2], np.zeros((2, 4), np.float32)))


def _header(**over):
    base = {"v": 1, "t": "slice", "sender": "n0", "inc": 1, "frame": 0, "stage": 0, "dtype": "float32", "shape": [2, 3]}
    base.update(over)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


IDS = np.array([0, 1], "<i4").tobytes()
PAYLOAD = np.zeros((2, 3), "<f4").tobytes()

REJECTIONS = [
    ("empty", [], "truncated"),
    ("not msgpack", [b"\xc1\xff\x00garbage"], "garbage"),
    ("cut-off header", [_header()[:-3], IDS, PAYLOAD], "truncated"),
    ("header not a map", [msgpack.packb([1, 2, 3])], "garbage"),
    ("trailing bytes", [_header() + b"xx", IDS, PAYLOAD], "garbage"),
    ("version 2", [_header(v=2), IDS, PAYLOAD], "bad_version"),
    ("no version", [_header(v=...), IDS, PAYLOAD], "bad_version"),
    ("unknown type", [_header(t="nope"), IDS, PAYLOAD], "bad_type"),
    ("missing payload frame", [_header(), IDS], "truncated"),
    ("extra frame", [_header(), IDS, PAYLOAD, b"x"], "garbage"),
    ("dtype not allowed", [_header(dtype="complex64"), IDS, PAYLOAD], "bad_dtype"),
    ("dtype object", [_header(dtype="O"), IDS, PAYLOAD], "bad_dtype"),
    ("payload too short", [_header(), IDS, PAYLOAD[:-4]], "bad_shape"),
    ("payload too long", [_header(), IDS, PAYLOAD + b"\0\0\0\0"], "bad_shape"),
    ("negative dim", [_header(shape=[-2, 3]), IDS, PAYLOAD], "bad_shape"),
    ("shape not a list", [_header(shape="2x3"), IDS, PAYLOAD], "bad_shape"),
    ("ids count differs", [_header(), IDS + IDS, PAYLOAD], "bad_shape"),
    ("scalar slice", [_header(shape=[]), b"", b"\0\0\0\0"], "bad_shape"),
    ("frame is a string", [_header(frame="0"), IDS, PAYLOAD], "garbage"),
    ("frame is a bool", [_header(frame=True), IDS, PAYLOAD], "garbage"),
    ("negative stage", [_header(stage=-1), IDS, PAYLOAD], "garbage"),
    ("no sender", [_header(sender=...), IDS, PAYLOAD], "garbage"),
    ("empty sender", [_header(sender=""), IDS, PAYLOAD], "garbage"),
    ("declared huge tensor", [_header(shape=[2, 1 << 40]), IDS, PAYLOAD], "oversized"),
    ("heartbeat without plan", [msgpack.packb({"v": 1, "t": "hb", "sender": "a", "inc": 0, "newest": 1})], "garbage"),
    ("control body not a map", [msgpack.packb({"v": 1, "t": "ctl", "sender": "a", "inc": 0, "kind": "x", "body": 3})], "garbage"),
    ("result frame count", [msgpack.packb({"v": 1, "t": "result", "sender": "a", "inc": 0, "frame": 1, "origin": "a",
                                           "meta": {}, "arrays": [{"dtype": "uint8", "shape": [1]}]})], "truncated"),
]


@pytest.mark.parametrize("name,frames,reason", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_decode_rejections(name, frames, reason):
    with pytest.raises(WireError) as info:
        wire.decode(frames)
    assert info.value.reason == reason


def test_oversized_message_rejected_before_parsing():
    frames = [_header(), IDS, PAYLOAD]
    with pytest.raises(WireError) as info:
        wire.decode(frames, max_message_bytes=20)
    assert info.value.reason == "oversized"


def test_random_garbage_only_ever_raises_wire_error():
    rng = np.random.default_rng(1)
    good = _frames_as_bytes(wire.encode(wire.Slice(1, 2, "n0", np.arange(3), np.ones((3, 2), np.float16))))
    for _ in range(3000):
        frames = [bytearray(f) for f in good[: rng.integers(0, 4)]]
        for f in frames:
            for _ in range(rng.integers(0, 4)):
                if f:
                    f[rng.integers(0, len(f))] = rng.integers(0, 256)
        try:
            wire.decode([bytes(f) for f in frames])
        except WireError:
            pass
