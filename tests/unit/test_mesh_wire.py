"""mesh/wire.py, protocol 2: every message type round-trips, tensors travel zero-copy, and every
malformed message is rejected by `decode` with a `WireError` whose reason names its drop counter.
The property-based fuzzing of the same module is in test_wire_fuzz.py."""
import msgpack
import numpy as np
import pytest

from robustdice.mesh import wire
from robustdice.mesh.errors import MeshError, WireError

# Every reason `decode` may give (the mesh's drop-counter names for undecodable messages).
DECODE_REASONS = {"garbage", "truncated", "bad_version", "bad_type", "bad_dtype", "bad_shape", "oversized"}


def as_bytes(frames):
    return [f if isinstance(f, bytes) else bytes(memoryview(f).cast("B")) for f in frames]


def roundtrip(msg):
    return wire.decode(as_bytes(wire.encode(msg)))


def rejection(frames, **kw):
    with pytest.raises(WireError) as info:
        wire.decode(frames, **kw)
    return info.value


# ---------------------------------------------------------------- frame ids

@pytest.mark.parametrize("device,sequence", [(0, 0), (0, 1), (3, 12345), (255, wire.FRAME_SEQ_MASK), (2 ** 22, 7)])
def test_frame_id_carries_its_origin_device(device, sequence):
    frame = wire.frame_id(device, sequence)
    assert wire.frame_device(frame) == device
    assert frame & wire.FRAME_SEQ_MASK == sequence
    assert 0 <= frame <= wire.MAX_FRAME_ID


def test_frame_sequence_wraps_within_its_origin():
    assert wire.frame_id(2, wire.FRAME_SEQ_MASK + 1) == wire.frame_id(2, 0)
    assert wire.frame_device(wire.frame_id(2, wire.FRAME_SEQ_MASK + 5)) == 2


def test_frame_ids_of_one_origin_grow_with_the_sequence_and_sort_by_origin():
    assert wire.frame_id(1, 5) < wire.frame_id(1, 6) < wire.frame_id(2, 0)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", sorted(wire.ALLOWED_DTYPES))
def test_slice_roundtrip_every_dtype(dtype):
    array = (np.arange(24).reshape(4, 3, 2) % 2).astype(dtype)
    msg = wire.Slices((wire.Slice(7, 3, "", np.array([5, 0, 9, 2]), array),), "n1", 11)
    (out,) = roundtrip(msg).slices
    assert (out.frame, out.stage, out.sender, out.incarnation) == (7, 3, "n1", 11)
    assert out.neuron_ids.dtype == np.int32 and out.neuron_ids.tolist() == [5, 0, 9, 2]
    assert out.array.dtype == np.dtype(dtype) and out.array.shape == (4, 3, 2)
    np.testing.assert_array_equal(out.array, array)


def test_batched_slices_keep_their_order_and_degradation_records():
    first = wire.Slice(wire.frame_id(1, 4), 0, "", np.array([0, 1]), np.ones((2, 3), np.float32))
    second = wire.Slice(wire.frame_id(2, 9), 5, "", np.array([7]), np.full((1, 3), 2.5, np.float32),
                        degraded=((1, 0b101, 40), (3, 0b10, 0)))
    msg = roundtrip(wire.Slices((first, second), "n0", 3))
    assert (msg.sender, msg.incarnation) == ("n0", 3)
    assert [(s.frame, s.stage, s.neuron_ids.tolist(), s.degraded) for s in msg.slices] == [
        (wire.frame_id(1, 4), 0, [0, 1], ()), (wire.frame_id(2, 9), 5, [7], ((1, 0b101, 40), (3, 0b10, 0)))]
    assert all(s.sender == "n0" and s.incarnation == 3 for s in msg.slices)
    np.testing.assert_array_equal(msg.slices[1].array, [[2.5, 2.5, 2.5]])


def test_a_full_batch_of_degraded_slices_is_decodable_or_refused_at_encode():
    deg = tuple((s, 0b0100, 1000) for s in range(49))  # device 2 missing at every earlier stage
    batch = tuple(wire.Slice(wire.frame_id(3, i), 49, "", np.arange(8), np.zeros((8, 7, 7), np.float32),
                             degraded=deg) for i in range(wire.MAX_BATCH_SLICES))
    try:
        frames = wire.encode(wire.Slices(batch, "n3", 1))
    except MeshError:
        return  # refused where it is made: the sender can split the batch
    assert len(wire.decode(as_bytes(frames)).slices) == wire.MAX_BATCH_SLICES


def test_slice_with_no_neurons_roundtrips():
    (out,) = roundtrip(wire.Slices((wire.Slice(1, 0, "", np.zeros(0, np.int32), np.zeros((0, 4), np.float16)),),
                                   "n0")).slices
    assert out.neuron_ids.size == 0 and out.array.shape == (0, 4)


def test_heartbeat_roundtrip_with_every_field():
    hb = wire.Heartbeat("n0", 3, "hash", "float16", ready=False, hears={"n1": (4, 120), "n2": (0, 0)},
                        progress={wire.frame_id(0, 1): 0, wire.frame_id(1, 2): 3},
                        inputs={"n0": wire.frame_id(0, 1), "n1": wire.frame_id(1, 2)})
    out = roundtrip(hb)
    assert out == hb and out.sender == "n0"
    assert out.hears["n1"] == (4, 120)


def test_heartbeat_defaults_roundtrip():
    hb = wire.Heartbeat("n0", 0, "hash")
    assert roundtrip(hb) == hb


def test_input_roundtrip_with_participants_and_admission_time():
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 2, 2)
    msg = wire.Input(wire.frame_id(2, 8), "n2", array, {"client": "c1", "k": [1, 2]}, "n2", 5,
                     participants=("n0", "n2"), t_ms=1_700_000_000_123)
    out = roundtrip(msg)
    assert out == msg  # frame, origin, meta, sender, incarnation, participants, t_ms
    assert isinstance(out.participants, tuple)
    np.testing.assert_array_equal(out.array, array)


def test_result_and_control_roundtrip():
    arrays = (np.zeros(3, bool), np.arange(2.0), np.arange(6, dtype=np.int64).reshape(2, 3))
    res = roundtrip(wire.Result(5, "n2", {"top1": 3}, arrays, "n1", 2))
    assert (res.frame, res.origin, res.meta, res.sender, res.incarnation) == (5, "n2", {"top1": 3}, "n1", 2)
    assert [(a.dtype, a.shape, a.tolist()) for a in res.arrays] == [(a.dtype, a.shape, a.tolist()) for a in arrays]
    ctl = wire.Control("status", {"verbose": True}, "n3", 1)
    assert roundtrip(ctl) == ctl


def test_zero_dimensional_array_keeps_its_shape():
    (out,) = roundtrip(wire.Result(5, "n2", {}, (np.array(7.0, np.float32),), "n1")).arrays
    assert (out.shape, out.tolist()) == ((), 7.0)


def test_with_sender_stamps_every_message_but_a_heartbeat():
    ctl = wire.with_sender(wire.Control("status"), "n1", 4)
    assert (ctl.sender, ctl.incarnation) == ("n1", 4)
    hb = wire.Heartbeat("n0", 2, "h")
    assert wire.with_sender(hb, "n1", 4) is hb


def test_big_endian_array_is_sent_little_endian():
    msg = wire.Slices((wire.Slice(0, 0, "", [0, 1], np.array([1.5, -2.0], dtype=">f8")),), "a")
    assert roundtrip(msg).slices[0].array.tolist() == [1.5, -2.0]


def test_decode_reads_memoryviews_and_zmq_frames():
    class FakeFrame:  # what recv_multipart(copy=False) gives: the data is in `.buffer`
        def __init__(self, data):
            self.buffer = memoryview(data)

    frames = as_bytes(wire.encode(wire.Slices((wire.Slice(1, 0, "", [3], np.ones((1, 2), np.float32)),), "a")))
    for wrapped in ([memoryview(f) for f in frames], [FakeFrame(f) for f in frames]):
        assert wire.decode(wrapped).slices[0].neuron_ids.tolist() == [3]


# ---------------------------------------------------------------- zero copy

def test_slice_payload_is_a_read_only_view_of_the_frame():
    frames = as_bytes(wire.encode(wire.Slices((wire.Slice(0, 0, "", np.arange(3), np.ones((3, 2), np.float32)),),
                                              "a")))
    out = wire.decode(frames).slices[0]
    assert not out.array.flags.owndata and not out.array.flags.writeable
    assert np.shares_memory(out.array, np.frombuffer(frames[2], np.uint8))


def test_encode_does_not_copy_the_arrays():
    array = np.ones((4, 256), np.float32)
    frames = wire.encode(wire.Slices((wire.Slice(0, 0, "", np.arange(4), array),), "a"))
    assert np.shares_memory(frames[2], array)
    image = np.zeros((1, 3, 8, 8), np.float32)
    assert np.shares_memory(wire.encode(wire.Input(1, "a", image))[1], image)


# ---------------------------------------------------------------- encode misuse

@pytest.mark.parametrize("msg", [
    wire.Slices((wire.Slice(0, 0, "", [0], np.zeros(1, np.complex64)),), "a"),
    wire.Slices((wire.Slice(0, 0, "", [0, 1, 2], np.zeros((2, 4), np.float32)),), "a"),
    wire.Slices((wire.Slice(0, 0, "", [], np.float32(1.0)),), "a"),
    wire.Slices((), "a"),
    wire.Slices(tuple(wire.Slice(f, 0, "", [0], np.zeros(1, np.float32)) for f in range(wire.MAX_BATCH_SLICES + 1)),
                "a"),
    wire.Input(0, "a", np.zeros(2, object)),
    wire.Result(0, "a", {}, (np.zeros(1, np.uint16),)),
    "not a message",
], ids=["complex", "ids_count", "scalar_slice", "no_slices", "too_many_slices", "object_input", "uint16_result",
        "not_a_message"])
def test_encode_rejects_misuse_with_mesh_error(msg):
    with pytest.raises(MeshError):
        wire.encode(msg)


# ---------------------------------------------------------------- decode rejections

def pack(header):
    return msgpack.packb(header, use_bin_type=True)


def base(tag, **over):
    """A valid header of type `tag`; `over` replaces fields (the value ... removes the field)."""
    header = {"v": 2, "t": tag, "sender": "n0", "inc": 1}
    header.update({
        "hb": dict(plan="P", dtype="float32", ready=True, hears={"n1": [1, 5]}, progress=[[3, 0]], inputs={"n0": 3}),
        "slices": dict(slices=[{"frame": 0, "stage": 0, "dtype": "float32", "shape": [2, 3], "deg": []}]),
        "input": dict(frame=0, origin="n0", t_ms=0, participants=["n0"], meta={}, dtype="uint8", shape=[1, 2]),
        "result": dict(frame=0, origin="n0", meta={}, arrays=[{"dtype": "uint8", "shape": [1]}]),
        "ctl": dict(kind="status", body={}),
    }[tag])
    header.update(over)
    return {k: v for k, v in header.items() if v is not ...}


def slice_item(**over):
    item = {"frame": 0, "stage": 0, "dtype": "float32", "shape": [2, 3], "deg": []}
    item.update(over)
    return {k: v for k, v in item.items() if v is not ...}


IDS = np.array([0, 1], "<i4").tobytes()
PAYLOAD = np.zeros((2, 3), "<f4").tobytes()
TAILS = {"hb": [], "slices": [IDS, PAYLOAD], "input": [b"\0\0"], "result": [b"\0"], "ctl": []}


def msg(tag, tail=None, **over):
    return [pack(base(tag, **over))] + (TAILS[tag] if tail is None else tail)


def slices(*items, tail=None):
    return [pack(base("slices", slices=list(items)))] + ([IDS, PAYLOAD] * len(items) if tail is None else tail)


@pytest.mark.parametrize("tag", sorted(TAILS))
def test_the_valid_base_messages_decode(tag):
    assert wire.decode(msg(tag)).TYPE == tag


REJECTIONS = [
    # framing
    ("no frames", [], "truncated"),
    ("not msgpack", [b"\xc1\xff\x00garbage"], "garbage"),
    ("cut-off header", [pack(base("ctl"))[:-3]], "truncated"),
    ("header not a map", [pack([1, 2, 3])], "garbage"),
    ("header with int keys", [pack({1: 2})], "garbage"),
    ("trailing bytes", [pack(base("ctl")) + b"xx"], "garbage"),
    ("header too big", [pack(base("ctl", body={"x": "y" * wire.MAX_HEADER_BYTES}))], "oversized"),
    # common fields
    ("version 1", msg("ctl", v=1), "bad_version"),
    ("version 1.0", msg("ctl", v=1.0), "bad_version"),
    ("version 2.0", msg("ctl", v=2.0), "bad_version"),
    ("version True", msg("ctl", v=True), "bad_version"),
    ("version '2'", msg("ctl", v="2"), "bad_version"),
    ("no version", msg("ctl", v=...), "bad_version"),
    ("unknown type", msg("ctl", t="slice"), "bad_type"),
    ("type not a string", msg("ctl", t=None), "bad_type"),
    ("no sender", msg("ctl", sender=...), "garbage"),
    ("empty sender", msg("ctl", sender=""), "garbage"),
    ("sender too long", msg("ctl", sender="x" * (wire.MAX_ID_CHARS + 1)), "garbage"),
    ("sender bytes", msg("ctl", sender=b"n0"), "garbage"),
    ("negative incarnation", msg("ctl", inc=-1), "garbage"),
    ("incarnation float", msg("ctl", inc=1.0), "garbage"),
    ("incarnation bool", msg("ctl", inc=True), "garbage"),
    ("incarnation past 63 bits", msg("ctl", inc=2 ** 63), "garbage"),
    # heartbeat
    ("hb extra frame", msg("hb", tail=[b"x"]), "garbage"),
    ("hb without plan", msg("hb", plan=...), "garbage"),
    ("hb plan too long", msg("hb", plan="p" * (wire.MAX_HASH_CHARS + 1)), "garbage"),
    ("hb without dtype", msg("hb", dtype=...), "garbage"),
    ("hb ready missing", msg("hb", ready=...), "garbage"),
    ("hb ready an int", msg("hb", ready=1), "garbage"),
    ("hb hears a list", msg("hb", hears=[["n1", 1, 5]]), "garbage"),
    ("hb hears one number", msg("hb", hears={"n1": 5}), "garbage"),
    ("hb hears three numbers", msg("hb", hears={"n1": [1, 2, 3]}), "garbage"),
    ("hb hears negative age", msg("hb", hears={"n1": [1, -5]}), "garbage"),
    ("hb hears empty id", msg("hb", hears={"": [1, 5]}), "garbage"),
    ("hb hears too many", msg("hb", hears={f"n{i}": [0, 0] for i in range(wire.MAX_PEERS + 1)}), "garbage"),
    ("hb progress a map", msg("hb", progress={"3": 0}), "garbage"),
    ("hb progress triple", msg("hb", progress=[[3, 0, 1]]), "garbage"),
    ("hb progress negative", msg("hb", progress=[[3, -1]]), "garbage"),
    ("hb progress bool", msg("hb", progress=[[True, 0]]), "garbage"),
    ("hb progress too long", msg("hb", progress=[[i, 0] for i in range(wire.MAX_PROGRESS + 1)]), "garbage"),
    ("hb inputs a pair", msg("hb", inputs={"n0": [3, 4]}), "garbage"),
    ("hb inputs a float", msg("hb", inputs={"n0": 3.0}), "garbage"),
    # slices
    ("slices missing payload", slices(slice_item(), tail=[IDS]), "truncated"),
    ("slices extra frame", slices(slice_item(), tail=[IDS, PAYLOAD, b"x"]), "garbage"),
    ("slices empty batch", slices(tail=[]), "garbage"),
    ("slices batch too big", slices(*[slice_item()] * (wire.MAX_BATCH_SLICES + 1)), "garbage"),
    ("slices not a list", msg("slices", slices={"frame": 0}), "garbage"),
    ("slice not a map", slices([0, 0]), "garbage"),
    ("slice dtype not allowed", slices(slice_item(dtype="complex64")), "bad_dtype"),
    ("slice dtype object", slices(slice_item(dtype="O")), "bad_dtype"),
    ("slice dtype big-endian", slices(slice_item(dtype=">f4")), "bad_dtype"),
    ("slice payload short", slices(slice_item(), tail=[IDS, PAYLOAD[:-4]]), "bad_shape"),
    ("slice payload long", slices(slice_item(), tail=[IDS, PAYLOAD + b"\0" * 4]), "bad_shape"),
    ("slice negative dim", slices(slice_item(shape=[-2, 3])), "bad_shape"),
    ("slice dim a float", slices(slice_item(shape=[2.0, 3])), "bad_shape"),
    ("slice dim a bool", slices(slice_item(shape=[True, 3])), "bad_shape"),
    ("slice shape a string", slices(slice_item(shape="2x3")), "bad_shape"),
    ("slice shape 9 dims", slices(slice_item(shape=[1] * 9), tail=[IDS[:4], PAYLOAD[:4]]), "bad_shape"),
    ("slice dim past 2^31", slices(slice_item(shape=[2, 2 ** 31])), "bad_shape"),
    ("slice declared huge", slices(slice_item(shape=[2, 2 ** 30])), "oversized"),
    ("slice scalar", slices(slice_item(shape=[]), tail=[b"", PAYLOAD[:4]]), "bad_shape"),
    ("slice ids count differs", slices(slice_item(), tail=[IDS + IDS, PAYLOAD]), "bad_shape"),
    ("slice ids ragged", slices(slice_item(), tail=[IDS + b"\0", PAYLOAD]), "bad_shape"),
    ("slice frame a string", slices(slice_item(frame="0")), "garbage"),
    ("slice frame a bool", slices(slice_item(frame=True)), "garbage"),
    ("slice frame past 63 bits", slices(slice_item(frame=2 ** 63)), "garbage"),
    ("slice negative stage", slices(slice_item(stage=-1)), "garbage"),
    ("slice stage past 2^31", slices(slice_item(stage=2 ** 31)), "garbage"),
    ("slice without deg", slices(slice_item(deg=...)), "garbage"),
    ("slice deg pair", slices(slice_item(deg=[[1, 2]])), "garbage"),
    ("slice deg negative", slices(slice_item(deg=[[1, -2, 0]])), "garbage"),
    ("slice deg not a list", slices(slice_item(deg={"1": 2})), "garbage"),
    # input
    ("input missing payload", msg("input", tail=[]), "truncated"),
    ("input extra frame", msg("input", tail=[b"\0\0", b""]), "garbage"),
    ("input meta not a map", msg("input", meta=[1]), "garbage"),
    ("input without origin", msg("input", origin=...), "garbage"),
    ("input negative t_ms", msg("input", t_ms=-1), "garbage"),
    ("input t_ms a float", msg("input", t_ms=1.5), "garbage"),
    ("input participants missing", msg("input", participants=...), "garbage"),
    ("input participants a map", msg("input", participants={"n0": 1}), "garbage"),
    ("input participant a list (unhashable)", msg("input", participants=[["n0"]]), "garbage"),
    ("input participant a map (unhashable)", msg("input", participants=[{"n": 0}]), "garbage"),
    ("input participant an int", msg("input", participants=[0]), "garbage"),
    ("input participant bytes", msg("input", participants=[b"n0"]), "garbage"),
    ("input participant empty", msg("input", participants=[""]), "garbage"),
    ("input participant too long", msg("input", participants=["x" * (wire.MAX_ID_CHARS + 1)]), "garbage"),
    ("input participants repeated", msg("input", participants=["n0", "n1", "n0"]), "garbage"),
    ("input participants too many", msg("input", participants=[f"n{i}" for i in range(wire.MAX_PEERS + 1)]),
     "garbage"),
    ("input payload short", msg("input", tail=[b"\0"]), "bad_shape"),
    # result and control
    ("result frame count", msg("result", tail=[]), "truncated"),
    ("result too many arrays", msg("result", arrays=[{"dtype": "uint8", "shape": [0]}] * (wire.MAX_RESULT_ARRAYS + 1),
                                   tail=[b""] * (wire.MAX_RESULT_ARRAYS + 1)), "garbage"),
    ("result descriptor not a map", msg("result", arrays=[["uint8", [1]]]), "garbage"),
    ("result meta missing", msg("result", meta=...), "garbage"),
    ("control body not a map", msg("ctl", body=3), "garbage"),
    ("control kind empty", msg("ctl", kind=""), "garbage"),
    ("control extra frame", msg("ctl", tail=[b""]), "garbage"),
]


@pytest.mark.parametrize("frames,reason", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_decode_rejects_with_the_named_reason(frames, reason):
    assert reason in DECODE_REASONS
    error = rejection(frames)
    # An explicit check said no, not the catch-all for exceptions the module did not expect.
    assert (error.reason, error.detail.startswith("undecodable")) == (reason, False)


@pytest.mark.parametrize("shape", [[0, 2 ** 63], [0, 2 ** 64 - 1], [2 ** 63, 0], [0, -1]])
def test_zero_size_shape_with_an_out_of_range_dim_is_bad_shape(shape):
    # issue 9: [0, 2**63] passed the byte check (0 bytes) and numpy's reshape raised ValueError.
    assert rejection(msg("input", shape=shape, tail=[b""])).reason == "bad_shape"


@pytest.mark.parametrize("shape", [[0], [0, 3], [3, 0, 5], [0, 2 ** 31 - 1]])
def test_zero_size_shape_within_limits_decodes_to_an_empty_array(shape):
    out = wire.decode(msg("input", shape=shape, tail=[b""]))
    assert out.array.shape == tuple(shape) and out.array.size == 0


@pytest.mark.parametrize("shape", [[0, 2 ** 31 - 1, 2 ** 31 - 1], [0] + [2 ** 31 - 1] * 7])
@pytest.mark.parametrize("dtype", ["uint8", "float64"])
def test_zero_size_shape_too_big_for_numpy_is_bad_shape(shape, dtype):
    # Empty, yet numpy's reshape refuses it: an explicit check must say so, not the catch-all.
    error = rejection(msg("input", shape=shape, dtype=dtype, tail=[b""]))
    assert (error.reason, error.detail.startswith("undecodable")) == ("bad_shape", False)


def test_oversized_message_is_rejected_before_parsing():
    error = rejection([b"\xc1" * 10, b"\0" * 20], max_message_bytes=20)
    assert error.reason == "oversized"  # the header is not msgpack: it was never looked at


def test_oversized_tensor_is_rejected_by_its_declared_size():
    frames = msg("input", shape=[1, 64], tail=[b"\0" * 64])
    assert rejection(frames, max_message_bytes=63 + len(frames[0])).reason == "oversized"
    assert wire.decode(frames, max_message_bytes=64 + len(frames[0])).array.size == 64


def test_hostile_strings_are_cut_in_the_error_detail():
    error = rejection(msg("ctl", sender="x" * 5000))
    assert len(error.detail) < 300

