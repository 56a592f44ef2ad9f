"""Property-based tests (Hypothesis) of what the network can send a node.

1. `wire.decode` decodes or raises `WireError`, nothing else, for any frames: random bytes, valid
   headers with mutated fields (wrong types, huge and negative ints, zero-size shapes, nested
   junk), byte flips of valid messages. What it accepts is well-formed and re-encodes to itself.
2. encode -> decode round-trips every message type.
3. GatherBook takes any sequence of begin / add_slice / poll / peer_changed / abandon /
   expire_early without raising (but MeshError for a misused begin), names every drop by one of
   its constants, and never keeps a gather waiting forever.

Runs are kept short (a few seconds in all); raise max_examples locally to search harder.
"""
import numpy as np
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from robustdice.mesh import gather as g
from robustdice.mesh import wire
from robustdice.mesh.errors import MeshError, WireError
from robustdice.mesh.gather import GatherBook
from robustdice.mesh.membership import PeerState, Report

DECODE_REASONS = {"garbage", "truncated", "bad_version", "bad_type", "bad_dtype", "bad_shape", "oversized"}
DROP_REASONS = {g.STALE, g.LATE, g.LATE_REPLICA, g.FINISHED, g.BAD_SLICE, g.NOT_WAITED, g.NOT_FINITE, g.DUPLICATE,
                g.EARLY_EVICTED, g.EARLY_EXPIRED, g.BAD_STAGE, g.NOT_PARTICIPANT}
RELEASE_REASONS = {g.RELEASED_DEAD, g.RELEASED_STALLED, g.RELEASED_LOST, g.RELEASED_ABSENT, g.RELEASED_TIMEOUT,
                   g.RELEASED_UNREACHABLE, g.RELEASED_SUSPECTED}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_bytes(frames):
    return [f if isinstance(f, bytes) else bytes(memoryview(f).cast("B")) for f in frames]


def decode_or_wire_error(frames):
    """The message, or None after a WireError with a known reason; anything else fails the test."""
    try:
        return wire.decode(frames)
    except WireError as exc:
        assert exc.reason in DECODE_REASONS, exc
        return None


# ---------------------------------------------------------------- strategies: junk

EDGE_INTS = st.sampled_from([0, 1, -1, 2, 255, 256, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 63 - 1, 2 ** 63,
                             2 ** 64 - 1, -2 ** 31, -2 ** 63])
MSGPACK_INTS = st.one_of(EDGE_INTS, st.integers(-2 ** 63, 2 ** 64 - 1))
SCALARS = st.one_of(st.none(), st.booleans(), MSGPACK_INTS, st.floats(), st.text(max_size=8), st.binary(max_size=8))
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                    max_leaves=12)
SHAPES = st.lists(st.one_of(st.integers(0, 4), EDGE_INTS), max_size=10)
IDS = st.sampled_from(["n0", "n1", "n2"])


def templates(frame_count_junk=False):
    """A valid header and frames of each type (what the fields are mutated from)."""
    ids, payload = np.array([0, 1], "<i4").tobytes(), np.zeros((2, 3), "<f4").tobytes()
    common = {"v": 2, "sender": "n0", "inc": 1}
    return {
        "hb": ({**common, "t": "hb", "plan": "P", "dtype": "float32", "ready": True, "hears": {"n1": [1, 5]},
                "progress": [[3, 0]], "inputs": {"n0": 3}}, []),
        "slices": ({**common, "t": "slices", "slices": [{"frame": 0, "stage": 0, "dtype": "float32", "shape": [2, 3],
                                                         "deg": [[0, 1, 2]]}]}, [ids, payload]),
        "input": ({**common, "t": "input", "frame": 0, "origin": "n0", "t_ms": 0, "participants": ["n0", "n1"],
                   "meta": {}, "dtype": "uint8", "shape": [1, 2]}, [b"\0\0"]),
        "result": ({**common, "t": "result", "frame": 0, "origin": "n0", "meta": {},
                    "arrays": [{"dtype": "uint8", "shape": [1]}]}, [b"\0"]),
        "ctl": ({**common, "t": "ctl", "kind": "status", "body": {}}, []),
    }


TAGS = sorted(templates())
# Fields of every template, and of a slice's and a result descriptor's maps ("slices.0.shape").
FIELDS = sorted({k for h, _ in templates().values() for k in h}
                | {f"slices.0.{k}" for k in templates()["slices"][0]["slices"][0]} | {"arrays.0.shape",
                                                                                       "arrays.0.dtype"})


def mutate(header, path, value):
    """`header` with the field at `path` set to `value` (removed for the value ...); unchanged
    where the path leads nowhere (an earlier mutation replaced a map on the way)."""
    *steps, last = path.split(".")
    target = header
    for step in steps:
        if isinstance(target, list) and step.isdigit() and int(step) < len(target):
            target = target[int(step)]
        elif isinstance(target, dict) and step in target:
            target = target[step]
        else:
            return header
    if isinstance(target, dict):
        if value is ...:
            target.pop(last, None)
        else:
            target[last] = value
    return header


TAILS = st.one_of(st.just(None), st.lists(st.binary(max_size=32), max_size=4))
VALUES = st.one_of(JUNK, SHAPES, st.just(...))


# ---------------------------------------------------------------- 1. decode takes anything

@FAST
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames_decode_or_raise_wire_error(frames):
    decode_or_wire_error(frames)


@FAST
@given(st.lists(JUNK, max_size=3))
def test_msgpack_junk_headers_decode_or_raise_wire_error(values):
    decode_or_wire_error([msgpack.packb(v) for v in values])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TAGS), st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3), TAILS)
def test_valid_headers_with_mutated_fields_decode_or_raise_wire_error(tag, mutations, tail):
    header, frames = templates()[tag]
    for path, value in mutations:
        header = mutate(header, path, value)
    decode_or_wire_error([msgpack.packb(header)] + (frames if tail is None else tail))


@FAST
@given(st.sampled_from(["slices", "input", "result"]), SHAPES,
       st.sampled_from(sorted(wire.ALLOWED_DTYPES) + ["complex64", "O", ""]), st.integers(0, 64))
def test_any_tensor_descriptor_decodes_or_raises_wire_error(tag, shape, dtype, payload_bytes):
    header, frames = templates()[tag]
    desc = {"dtype": dtype, "shape": shape}
    if tag == "slices":
        header["slices"][0].update(desc)
    elif tag == "result":
        header["arrays"] = [desc]
    else:
        header.update(desc)
    n = shape[0] if shape and isinstance(shape[0], int) and 0 <= shape[0] < 64 else 0
    payload = b"\0" * payload_bytes
    tail = [b"\0" * 4 * n, payload] if tag == "slices" else [payload]
    decode_or_wire_error([msgpack.packb(header)] + tail)


@FAST
@given(st.sampled_from(TAGS), st.data())
def test_byte_flips_of_valid_messages_decode_or_raise_wire_error(tag, data):
    header, tail = templates()[tag]
    frames = [bytearray(f) for f in [msgpack.packb(header)] + tail]
    for _ in range(data.draw(st.integers(1, 6))):
        f = frames[data.draw(st.integers(0, len(frames) - 1))]
        if f:
            f[data.draw(st.integers(0, len(f) - 1))] = data.draw(st.integers(0, 255))
    keep = data.draw(st.integers(0, len(frames)))  # and sometimes cut frames off the end
    decode_or_wire_error([bytes(f) for f in frames[:keep]])


def check_well_formed(msg):
    """What the module docstring promises of every decoded message."""
    assert 1 <= len(msg.sender) <= wire.MAX_ID_CHARS and 0 <= msg.incarnation <= wire.MAX_FRAME_ID
    arrays = []
    if isinstance(msg, wire.Slices):
        assert 1 <= len(msg.slices) <= wire.MAX_BATCH_SLICES
        for sl in msg.slices:
            assert sl.neuron_ids.dtype == np.int32 and sl.array.ndim >= 1
            assert sl.neuron_ids.shape == (sl.array.shape[0],)
            assert (sl.sender, sl.incarnation) == (msg.sender, msg.incarnation)
            arrays.append(sl.array)
    elif isinstance(msg, wire.Input):
        assert len(set(msg.participants)) == len(msg.participants)
        assert all(isinstance(p, str) and 0 < len(p) <= wire.MAX_ID_CHARS for p in msg.participants)
        arrays.append(msg.array)
    elif isinstance(msg, wire.Result):
        arrays.extend(msg.arrays)
    elif isinstance(msg, wire.Heartbeat):
        assert isinstance(msg.ready, bool)
        assert all(len(v) == 2 for v in msg.hears.values())
    for a in arrays:
        assert a.dtype.name in wire.ALLOWED_DTYPES and a.ndim <= wire.MAX_NDIM


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.sampled_from(TAGS), st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), max_size=2))
def test_what_decode_accepts_is_well_formed_and_reencodes_to_itself(tag, mutations):
    header, tail = templates()[tag]
    for path, value in mutations:
        header = mutate(header, path, value)
    msg = decode_or_wire_error([msgpack.packb(header)] + tail)
    assume(msg is not None)
    check_well_formed(msg)
    # A 0-d array travels as shape [1] (see test_mesh_wire.test_zero_dimensional_array_keeps_its_shape).
    assume(not isinstance(msg, wire.Result) or all(a.ndim for a in msg.arrays))
    frames = as_bytes(wire.encode(msg))
    again = as_bytes(wire.encode(wire.decode(frames)))
    assert again == frames


# ---------------------------------------------------------------- 2. round trips

NAMES = st.text(min_size=1, max_size=wire.MAX_ID_CHARS)
FRAME_IDS = st.integers(0, wire.MAX_FRAME_ID)
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1),
                                 st.floats(allow_nan=False), st.text(max_size=8)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                       max_leaves=8)
META = st.dictionaries(st.text(max_size=8), JSONISH, max_size=4)
DTYPES = st.sampled_from(sorted(wire.ALLOWED_DTYPES))


def arrays(min_dims=0, max_dims=3, first=None):
    return DTYPES.flatmap(lambda dt: hnp.arrays(
        dt, hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=4)
        if first is None else first.flatmap(lambda n: hnp.array_shapes(min_dims=0, max_dims=2, min_side=0,
                                                                        max_side=3).map(lambda s: (n,) + s))))


@st.composite
def slices(draw):
    n = draw(st.integers(0, 5))
    array = draw(arrays(first=st.just(n)))
    ids = draw(hnp.arrays(np.int32, n))
    deg = draw(st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(0, 2 ** 63), st.integers(0, 2 ** 31)),
                        max_size=3))
    return wire.Slice(draw(FRAME_IDS), draw(st.integers(0, wire.MAX_DIM)), "", ids, array, degraded=tuple(deg))


HEARTBEATS = st.builds(
    wire.Heartbeat, NAMES, FRAME_IDS, st.text(min_size=1, max_size=wire.MAX_HASH_CHARS),
    st.text(min_size=1, max_size=16), st.booleans(),
    st.dictionaries(NAMES, st.tuples(FRAME_IDS, FRAME_IDS), max_size=4),
    st.dictionaries(FRAME_IDS, FRAME_IDS, max_size=4), st.dictionaries(NAMES, FRAME_IDS, max_size=4))
SLICES = st.builds(wire.Slices, st.lists(slices(), min_size=1, max_size=4).map(tuple), NAMES, FRAME_IDS)
INPUTS = st.builds(wire.Input, FRAME_IDS, NAMES, arrays(min_dims=1), META, NAMES, FRAME_IDS,
                   st.lists(NAMES, unique=True, max_size=4).map(tuple), FRAME_IDS)
RESULTS = st.builds(wire.Result, FRAME_IDS, NAMES, META, st.lists(arrays(min_dims=1), max_size=3).map(tuple),
                    NAMES, FRAME_IDS)
CONTROLS = st.builds(wire.Control, NAMES, META, NAMES, FRAME_IDS)


def same_array(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == b.tobytes()


@FAST
@given(st.one_of(HEARTBEATS, SLICES, INPUTS, RESULTS, CONTROLS))
def test_every_message_type_roundtrips(msg):
    out = wire.decode(as_bytes(wire.encode(msg)))
    assert type(out) is type(msg)
    if isinstance(msg, wire.Slices):
        assert (out.sender, out.incarnation, len(out.slices)) == (msg.sender, msg.incarnation, len(msg.slices))
        for a, b in zip(msg.slices, out.slices):
            assert (b.frame, b.stage, b.degraded, b.sender) == (a.frame, a.stage, a.degraded, msg.sender)
            assert b.neuron_ids.tolist() == a.neuron_ids.tolist() and same_array(a.array, b.array)
        return
    assert out == msg  # every field but the arrays
    if isinstance(msg, wire.Input):
        assert same_array(msg.array, out.array)
    if isinstance(msg, wire.Result):
        assert len(out.arrays) == len(msg.arrays) and all(map(same_array, msg.arrays, out.arrays))


# ---------------------------------------------------------------- 3. the gather book

SENDERS = ["me", "a", "b", "c", "zz"]
N_IDS = 6
MAX_STAGE = 3
SYNC_MS = 1000


def plan_ids(frame, stage):
    """Each holder's ids for (frame, stage): a fixed plan with replicas and an empty holder."""
    k = (frame + stage) % 3
    return {"me": [k, k + 1], "a": [2, 3], "b": [4, 5, k], "c": []}


STATES = st.sampled_from(list(PeerState))
REPORTS = st.one_of(st.none(), st.builds(
    lambda ready, progress, inputs, age: (ready, progress, inputs, age), st.booleans(),
    st.dictionaries(st.integers(0, 1), st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["o", "a"]), st.integers(0, 1), max_size=2), st.floats(0, 3)))


FRAMES = st.integers(0, 1)
STAGES = st.sampled_from([0, 0, 1, 1, MAX_STAGE])  # MAX_STAGE: past the plan
PAYLOADS = st.one_of(
    st.just((np.float32, hnp.from_dtype(np.dtype(np.float32), min_value=-10, max_value=10))),
    st.just((np.float32, hnp.from_dtype(np.dtype(np.float32), min_value=-10, max_value=10))),
    st.sampled_from([np.float16, np.float32, np.float64, np.int32]).map(lambda dt: (dt, None)),  # NaN, Inf too
)


@st.composite
def slice_op(draw):
    sender = draw(st.sampled_from(SENDERS))
    frame, stage = draw(FRAMES), draw(STAGES)
    holders = plan_ids(frame, stage)
    how = draw(st.sampled_from(["exact", "exact", "exact", "random", "repeat"]))
    if how == "exact" and sender in holders:
        ids = holders[sender]
    elif how == "repeat" and holders.get(sender):
        ids = [holders[sender][0]] * len(holders[sender])
    else:
        ids = draw(st.lists(st.integers(-2, N_IDS + 1), max_size=4))
    rows = max(0, len(ids) + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
    trailing = draw(st.sampled_from([(2,), (2,), (2,), (3,), ()]))
    dtype, elements = draw(PAYLOADS)
    array = draw(hnp.arrays(dtype, (rows,) + trailing, elements=elements))
    deg = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 15), st.integers(0, 6)), max_size=2))
    return ("add", sender, frame, stage, np.array(ids, np.int32), array, tuple(deg))


BEGIN = st.tuples(st.just("begin"), FRAMES, STAGES, st.sampled_from([False, False, False, True]))
OPS = st.one_of(
    slice_op(), slice_op(), slice_op(), BEGIN, BEGIN,
    st.tuples(st.just("poll"), st.floats(0, 0.6)),
    st.tuples(st.just("peer"), st.sampled_from(SENDERS[1:4]), STATES, REPORTS),
    st.tuples(st.just("abandon"), FRAMES),
    st.tuples(st.just("admit"), FRAMES, st.sets(st.sampled_from(SENDERS))),
    st.tuples(st.just("expire_early"), st.floats(0, 3)),
)


class Peers:
    def __init__(self):
        self.states, self.reports = {}, {}

    def __call__(self, peer):
        return self.states.get(peer, PeerState.ALIVE), self.reports.get(peer)


def check_result(r, book_holders, finished):
    key = (r.frame, r.stage)
    assert key not in finished, "a gather finished twice"
    finished.add(key)
    holders = book_holders[key]
    assert set(r.released.values()) <= RELEASE_REASONS
    assert set(r.released) <= set(holders) and "me" in r.contributors
    covered = set(plan_ids(*key)["me"])
    for p in r.pieces:  # only exact answers of holders are used
        assert p.sender in holders and p.neuron_ids.tolist() == holders[p.sender]
        assert p.array.shape[0] == len(holders[p.sender])
        assert p.array.dtype.kind != "f" or np.isfinite(p.array).all()
        covered |= set(holders[p.sender])
        assert p.sender not in r.released
    assert r.uncovered == N_IDS - len(covered)


# +Inf and -Inf in one payload make numpy warn (test_mesh_gather: ..._without_a_numpy_warning)
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OPS, min_size=10, max_size=60), st.integers(1, 6), st.integers(40, 400))
def test_gather_book_takes_any_sequence_and_names_every_drop(ops, max_early, max_early_bytes):
    book = GatherBook("me", SYNC_MS, max_stage=MAX_STAGE, max_early_slices=max_early,
                      max_early_bytes=max_early_bytes, early_ttl_s=2.0, finished_memory=64)
    peers, now = Peers(), 0.0
    begun, finished = {}, set()
    for op in ops:
        if op[0] == "add":
            _, sender, frame, stage, ids, array, deg = op
            reason = book.add_slice(sender, frame, stage, ids, array, now, deg)
            assert reason is None or reason in DROP_REASONS
        elif op[0] == "begin":
            _, frame, stage, misuse = op
            holders = plan_ids(frame, stage)
            local = holders["me"] + ([N_IDS] if misuse else [])
            try:
                rejected = book.begin(frame, stage, "o", np.array(local), holders, N_IDS, now)
            except MeshError:
                assert misuse or (frame, stage) in begun
                continue
            assert not misuse and (frame, stage) not in begun
            assert all(reason in DROP_REASONS for _, reason in rejected)
            begun[(frame, stage)] = {h: ids for h, ids in holders.items() if h != "me"}
        elif op[0] == "poll":
            now += op[1]
            for r in book.poll(now, peers):
                check_result(r, begun, finished)
        elif op[0] == "peer":
            _, peer, state, rep = op
            peers.states[peer] = state
            peers.reports[peer] = None if rep is None else Report(now - rep[3], rep[0], {}, rep[1], rep[2])
            book.peer_changed(peer)
        elif op[0] == "abandon":
            for key in [k for k in book.active_keys() if k[0] == op[1]]:
                finished.add(key)
            book.abandon(op[1])
        elif op[0] == "admit":
            assert all(reason in DROP_REASONS for _, reason in book.admit(op[1], op[2], now))
        else:
            now += op[1]
            book.expire_early(now)
            book.expire_unadmitted(now)
        assert book.early_count <= max_early and 0 <= book.early_bytes <= max_early_bytes
        assert book.early_count or book.early_bytes == 0
        deadline = book.next_deadline_s()
        assert deadline is None or book.active_keys()
    # Nothing waits forever: long after every deadline, every gather has finished.
    later = now + 10 * SYNC_MS / 1000
    for peer in SENDERS[1:4]:
        book.peer_changed(peer)
    for r in book.poll(later, peers):
        check_result(r, begun, finished)
    assert book.active_keys() == []
    assert book.expire_early(later) >= 0 and book.expire_unadmitted(later) >= 0 and book.early_count == 0

