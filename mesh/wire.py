"""The mesh wire format: the one place that knows how messages become ZeroMQ frames.

Every message is one ZeroMQ multipart message. Frame 0 is a msgpack-encoded map (the header);
tensor payloads follow as raw frames so that they are sent and received without copies.
All integers in raw frames and all tensor payloads are little-endian, C order (row-major).

Header keys common to every message:

    "v"      int   protocol version, currently 2 (`PROTOCOL_VERSION`); anything else is rejected
    "t"      str   type tag: "hb", "slices", "input", "result" or "ctl"
    "sender" str   id of the sending node (for CURVE connections the receiver checks it against
                   the id the authenticated public key belongs to), at most 64 characters
    "inc"    int   the sender's incarnation (a new process picks a larger one), >= 0

Tensor descriptors (used below) are maps {"dtype": str, "shape": [int, ...]}; dtype is one of
float32, float16, float64, int64, int32, uint8, bool (bool is one byte per element, 0 or 1);
at most 8 dimensions, each below 2^31; the payload frame holds exactly prod(shape) * itemsize
bytes.

Frame ids are 63-bit integers: the origin's device index (its position in peers.yaml) times
2^40, plus a sequence number of that origin (`frame_id`, `frame_device`).

Messages, frame by frame:

Heartbeat ("hb"), 1 frame: every heartbeat interval, to every peer
    0  header + {
         "plan":     str, the sender's plan hash (at most 128 characters)
         "dtype":    str, the dtype the sender puts on the wire for slices
         "ready":    bool, the sender's engine is computing (not stalled)
         "hears":    {peer id: [incarnation, age_ms]} for every peer the sender heard directly
                     within its peer timeout: whom it hears, and how long ago
         "progress": [[frame, stages_sent], ...] every frame the sender holds: how many of the
                     frame's stages it has computed and sent its slice of (0: input held)
         "inputs":   {origin id: newest frame id} of the inputs the sender has received from
                     each origin (its own frames included); frames arrive in id order per origin
         "next":     str, optional: the hash of a second plan the sender has loaded beside
                     "plan" during a roll-out (node/plans.py); it computes frames of either
         "switch":   int, optional: the admission time (wall-clock ms) from which the sender's
                     frames run on the roll-out's plan, once agreed (0 or absent: none)
         "rdir":     str, optional: the folder of the roll-out's plan on the sender's disk (at
                     most 1024 characters), where a node that missed the roll-out finds it
       }

Slices ("slices"), 1 + 2k frames: k >= 1 slices, each one node's part of the output of one
stage for one frame (a node sends each peer, per pass of its loop, the slices it computed in
that pass in one message: fewer messages, fewer wakeups, when many frames are in flight)
    0  header + {"slices": [{"frame": int >= 0, "stage": int >= 0, "dtype": str, "shape": [n, ...],
                             "deg": [[stage, missing, zero], ...]}, ... k of them]}
       "deg" is what a slice rests on that was not whole: for each earlier stage at which the
       sender, or any slice it used, gathered without some holder, `missing` is the bitmask of
       those devices (bit d = device d) and `zero` the most neurons zero-filled at that stage;
       empty when nothing was missing anywhere upstream.
    then for each slice, in order:
    1  neuron ids: n int32 values (axis 0 of the payload is the neuron axis)
    2  payload: the tensor, shape `shape`, whose row i is neuron ids[i]

Input ("input"), 2 frames: a client's input, broadcast by the node that took the request
    0  header + {"frame": int, "origin": str node id that took the request, "t_ms": int origin's
                 wall-clock milliseconds at admission (every node orders work by (t_ms, frame)),
                 "participants": [node id, ...] the nodes that compute this frame,
                 "plan": str, optional: the hash of the plan the frame runs on (during a
                 roll-out a node holds two; absent: the receiver's current plan),
                 "meta": map, "dtype": str, "shape": [batch, C, H, W]}
       A client sending to a node leaves "participants" empty and "t_ms" 0.
    1  payload

Result ("result"), 1 + k frames: results of a frame (logits, masks, ...)
    0  header + {"frame": int, "origin": str, "meta": map, "arrays": [descriptor, ...] (k of them)}
    1..k  payloads in the order of "arrays"

Control ("ctl"), 1 frame: generic request/response (status, ...)
    0  header + {"kind": str, "body": map}

A message whose frame count, header or payload sizes disagree with this description is
rejected by `decode` with a `WireError` whose `reason` names the drop counter. `decode` raises
nothing else, whatever the input.

The bounds above are the format's. A receiver tightens them to what its own cluster can send
(`Limits`: the peer count bounds "hears", "inputs" and "participants", the frames a node can
hold bound "progress", the plan's stage count bounds "deg"), and a one-frame message whose
header is longer than the largest heartbeat within those bounds is rejected before it is parsed:
a message then costs no more to decode than a real one (a heartbeat at the format's bounds,
4,096 progress pairs and 256 peers in 23 KiB, took 5 ms).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import msgpack
import numpy as np

from .errors import MeshError, WireError

PROTOCOL_VERSION = 2
# The header is a handful of scalars plus small maps; anything bigger is not ours.
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 8
MAX_DIM = 2 ** 31 - 1
MAX_RESULT_ARRAYS = 64
MAX_ID_CHARS = 64
MAX_HASH_CHARS = 128
MAX_PATH_CHARS = 1024
MAX_PEERS = 256
MAX_PROGRESS = 4096
MAX_BATCH_SLICES = 256
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Bytes of a heartbeat header besides its maps: the keys, sender, incarnation, dtype, plan hash (hex).
# A roll-out adds a second hash, a switch time and a plan folder.
_HEARTBEAT_FIXED_BYTES = (128 + 2 * (4 * MAX_ID_CHARS) + (MAX_HASH_CHARS + 3)
                          + 32 + (MAX_HASH_CHARS + 3) + 9 + (4 * MAX_PATH_CHARS + 3))
# Most bytes one entry takes in msgpack: a "hears" entry (an id of up to 4 bytes a character,
# two uint64), an "inputs" entry (an id, one uint64), a "progress" pair (two uint64).
_HEARS_ENTRY_BYTES = 4 * MAX_ID_CHARS + 3 + 1 + 2 * 9
_INPUTS_ENTRY_BYTES = 4 * MAX_ID_CHARS + 3 + 9
_PROGRESS_ENTRY_BYTES = 1 + 2 * 9

FRAME_ID_SHIFT = 40
FRAME_SEQ_MASK = (1 << FRAME_ID_SHIFT) - 1
MAX_FRAME_ID = (1 << 63) - 1

ALLOWED_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")
}
_IDS_DTYPE = np.dtype("<i4")
# numpy's dtype.name walks the type hierarchy on every call; a dict lookup is what encoding needs.
_NAMES = {np.dtype(name): name for name in ALLOWED_DTYPES}
_NAMES.update({np.dtype(name).newbyteorder(">"): name for name in ALLOWED_DTYPES})


def dtype_name(dtype: np.dtype) -> str:
    return _NAMES.get(dtype) or dtype.name

Buffer = Union[bytes, memoryview, Any]  # bytes, memoryview, zmq.Frame or a numpy view


def frame_id(device: int, sequence: int) -> int:
    """The frame id of an origin's `sequence`-th frame (the sequence wraps at 2^40)."""
    return (int(device) << FRAME_ID_SHIFT) | (int(sequence) & FRAME_SEQ_MASK)


def frame_device(frame: int) -> int:
    """The device index of the origin of `frame`."""
    return int(frame) >> FRAME_ID_SHIFT


@dataclass(frozen=True)
class Heartbeat:
    node_id: str
    incarnation: int
    plan_hash: str
    wire_dtype: str = "float32"
    ready: bool = True
    hears: Mapping[str, Tuple[int, int]] = field(default_factory=dict)
    progress: Mapping[int, int] = field(default_factory=dict)
    inputs: Mapping[str, int] = field(default_factory=dict)
    next_plan: str = ""         # a roll-out's plan, loaded beside plan_hash ("" none)
    switch_ms: int = 0          # the agreed admission time of the roll-out's first frame (0 none)
    rollout_dir: str = ""       # where the roll-out's plan lies ("" none)
    TYPE = "hb"

    @property
    def sender(self) -> str:
        return self.node_id


@dataclass(frozen=True)
class Slice:
    """One slice; it travels inside a `Slices` message."""
    frame: int
    stage: int
    sender: str
    neuron_ids: np.ndarray = field(compare=False)
    array: np.ndarray = field(compare=False)
    incarnation: int = 0
    degraded: Tuple[Tuple[int, int, int], ...] = ()   # (stage, missing device mask, zero-filled)

    @property
    def dtype(self) -> str:
        return dtype_name(self.array.dtype)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class Slices:
    """Slices from one sender, sent together."""
    slices: Tuple[Slice, ...]
    sender: str = ""
    incarnation: int = 0
    TYPE = "slices"


@dataclass(frozen=True)
class Input:
    frame: int
    origin: str
    array: np.ndarray = field(compare=False)
    meta: Mapping[str, Any] = field(default_factory=dict)
    sender: str = ""
    incarnation: int = 0
    participants: Tuple[str, ...] = ()
    t_ms: int = 0
    plan: str = ""              # the hash of the plan the frame runs on ("" the receiver's current)
    TYPE = "input"


@dataclass(frozen=True)
class Result:
    frame: int
    origin: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    arrays: Tuple[np.ndarray, ...] = field(default=(), compare=False)
    sender: str = ""
    incarnation: int = 0
    TYPE = "result"


@dataclass(frozen=True)
class Control:
    kind: str
    body: Mapping[str, Any] = field(default_factory=dict)
    sender: str = ""
    incarnation: int = 0
    TYPE = "ctl"


Message = Union[Heartbeat, Slices, Input, Result, Control]
MESSAGE_TYPES = (Heartbeat, Slices, Input, Result, Control)


@dataclass(frozen=True)
class Limits:
    """What a receiver admits within the format's bounds: no more than its cluster can send."""

    max_peers: int = MAX_PEERS        # entries of "hears", "inputs" and "participants"
    max_progress: int = MAX_PROGRESS  # pairs of "progress": the frames one node can hold
    max_stages: int = MAX_PROGRESS    # entries of a slice's "deg": one per stage at most

    @property
    def one_frame_header_bytes(self) -> int:
        """The longest heartbeat header within these bounds; a one-frame message (heartbeat or
        control) with a longer header is rejected unparsed."""
        per_peer = _HEARS_ENTRY_BYTES + _INPUTS_ENTRY_BYTES
        return min(MAX_HEADER_BYTES, _HEARTBEAT_FIXED_BYTES + self.max_peers * per_peer
                   + self.max_progress * _PROGRESS_ENTRY_BYTES)


FORMAT_LIMITS = Limits()


# ---------------------------------------------------------------- encoding

def _wire_array(array: np.ndarray, what: str) -> Tuple[dict, np.ndarray]:
    array = np.asarray(array)
    name = dtype_name(array.dtype)
    if name not in ALLOWED_DTYPES:
        raise MeshError(f"{what}: dtype {name} is not allowed on the wire ({', '.join(ALLOWED_DTYPES)})")
    shape = list(array.shape)  # before ascontiguousarray, which makes a 0-d array 1-d
    # A no-op (no copy) for the usual native little-endian C-contiguous array.
    array = np.ascontiguousarray(array, dtype=ALLOWED_DTYPES[name])
    # A flat byte view keeps the buffer zero-copy whatever the dtype (bool buffers included).
    return {"dtype": name, "shape": shape}, array.reshape(-1).view(np.uint8)


def _header(msg: Message, sender: str, incarnation: int, **fields) -> bytes:
    header = {"v": PROTOCOL_VERSION, "t": msg.TYPE, "sender": sender, "inc": int(incarnation)}
    header.update(fields)
    return msgpack.packb(header, use_bin_type=True)


def encode(msg: Message) -> List[Buffer]:
    """Frames of `msg`, ready for `socket.send_multipart(frames, copy=False)`.

    Tensor frames are views of the message's arrays, not copies: the caller must not modify
    those arrays while ZeroMQ may still be sending them.
    """
    if isinstance(msg, Heartbeat):
        return [_header(msg, msg.node_id, msg.incarnation, plan=msg.plan_hash, dtype=msg.wire_dtype,
                        ready=bool(msg.ready),
                        hears={p: [int(i), int(a)] for p, (i, a) in msg.hears.items()},
                        progress=[[int(f), int(s)] for f, s in msg.progress.items()],
                        inputs={o: int(f) for o, f in msg.inputs.items()},
                        **({"next": msg.next_plan} if msg.next_plan else {}),
                        **({"switch": int(msg.switch_ms)} if msg.switch_ms else {}),
                        **({"rdir": msg.rollout_dir} if msg.rollout_dir else {}))]
    if isinstance(msg, Slices):
        if not 1 <= len(msg.slices) <= MAX_BATCH_SLICES:
            raise MeshError(f"slices: {len(msg.slices)} slices in one message (1..{MAX_BATCH_SLICES})")
        items, frames = [], []
        for sl in msg.slices:
            desc, payload = _wire_array(sl.array, "slice")
            ids = np.ascontiguousarray(sl.neuron_ids, dtype=_IDS_DTYPE).reshape(-1)
            if sl.array.ndim < 1 or ids.shape[0] != sl.array.shape[0]:
                raise MeshError(f"slice: {ids.shape[0]} neuron ids for an array of shape {sl.array.shape}")
            items.append(dict(frame=int(sl.frame), stage=int(sl.stage),
                              deg=[[int(s), int(m), int(z)] for s, m, z in sl.degraded], **desc))
            frames += [ids.view(np.uint8), payload]
        head = _header(msg, msg.sender, msg.incarnation, slices=items)
        if len(head) > MAX_HEADER_BYTES:  # a receiver would drop it as oversized: split it here
            raise MeshError(f"slices: a header of {len(head)} bytes (limit {MAX_HEADER_BYTES}); send fewer per message")
        return [head] + frames
    if isinstance(msg, Input):
        desc, payload = _wire_array(msg.array, "input")
        head = _header(msg, msg.sender, msg.incarnation, frame=int(msg.frame), origin=msg.origin,
                       t_ms=int(msg.t_ms), participants=list(msg.participants), meta=dict(msg.meta),
                       **({"plan": msg.plan} if msg.plan else {}), **desc)
        return [head, payload]
    if isinstance(msg, Result):
        pairs = [_wire_array(a, f"result.arrays[{i}]") for i, a in enumerate(msg.arrays)]
        head = _header(msg, msg.sender, msg.incarnation, frame=int(msg.frame), origin=msg.origin,
                       meta=dict(msg.meta), arrays=[d for d, _ in pairs])
        return [head] + [p for _, p in pairs]
    if isinstance(msg, Control):
        return [_header(msg, msg.sender, msg.incarnation, kind=msg.kind, body=dict(msg.body))]
    raise MeshError(f"cannot encode {type(msg).__name__}")


def with_sender(msg: Message, sender: str, incarnation: int) -> Message:
    """`msg` stamped with the sending node's id and incarnation (no array is copied)."""
    if isinstance(msg, Heartbeat):
        return msg
    return dataclasses.replace(msg, sender=sender, incarnation=incarnation)


# ---------------------------------------------------------------- decoding

def _view(frame: Buffer) -> memoryview:
    buffer = getattr(frame, "buffer", None)  # zmq.Frame received with copy=False
    return memoryview(buffer if buffer is not None else frame).cast("B")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a True frame id is garbage, not frame 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _need(header: dict, key: str, kind, reason: str = "garbage"):
    value = header.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(reason, f"header field {key!r} is {_short(value)}, expected {getattr(kind, '__name__', kind)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut: what a hostile sender writes must not flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _name(header: dict, key: str, limit: int = MAX_ID_CHARS) -> str:
    value = _need(header, key, str)
    if not value or len(value) > limit:
        raise WireError("garbage", f"header field {key!r} is {_short(value)}, expected 1 to {limit} characters")
    return value


def _optional_name(header: dict, key: str, limit: int) -> str:
    """A string field that may be absent ("")."""
    return _name(header, key, limit) if key in header else ""


def _uint(header: dict, key: str, upper: int = MAX_FRAME_ID) -> int:
    value = _need(header, key, int)
    if not 0 <= value <= upper:
        raise WireError("garbage", f"header field {key!r} is {value}, expected 0..{upper}")
    return value


# Descriptors already found valid, by (dtype, shape): a node sees the same few shapes in every
# frame, and checking one costs more than the rest of a slice's decoding. Bounded: a sender
# cycling through shapes only empties it.
_VALID_DESCRIPTORS: Dict[Tuple[str, Tuple[int, ...]], Tuple[np.dtype, Tuple[int, ...], int]] = {}
_VALID_DESCRIPTORS_MAX = 256


def _descriptor(desc: Any) -> Tuple[np.dtype, Tuple[int, ...], int]:
    if not isinstance(desc, dict):
        raise WireError("garbage", f"tensor descriptor is {_short(desc)}")
    name, shape = desc.get("dtype"), desc.get("shape")
    if type(name) is str and type(shape) is list and all(type(d) is int for d in shape):
        key = (name, tuple(shape))
        known = _VALID_DESCRIPTORS.get(key)
        if known is not None:
            return known
        known = _check_descriptor(name, shape)
        if len(_VALID_DESCRIPTORS) >= _VALID_DESCRIPTORS_MAX:
            _VALID_DESCRIPTORS.clear()
        _VALID_DESCRIPTORS[key] = known
        return known
    return _check_descriptor(name, shape)


def _check_descriptor(name: Any, shape: Any) -> Tuple[np.dtype, Tuple[int, ...], int]:
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise WireError("bad_dtype", f"dtype {_short(name)} is not allowed")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        raise WireError("bad_shape", f"shape {_short(shape)} is not a list of at most {MAX_NDIM} sizes in 0..{MAX_DIM}")
    dtype = ALLOWED_DTYPES[name]
    # A zero-size tensor still needs a shape numpy can hold: [0, 2**31, 2**31, 2**31] is empty
    # but "too big" for numpy, so the non-zero dimensions are bounded too.
    if math.prod(d for d in shape if d) > MAX_DIM * MAX_NDIM:
        raise WireError("bad_shape", f"shape {_short(shape)} spans more than {MAX_DIM * MAX_NDIM} elements")
    return dtype, tuple(shape), dtype.itemsize * math.prod(shape)


def _tensor(desc: Any, frame: memoryview, max_bytes: int) -> np.ndarray:
    dtype, shape, nbytes = _descriptor(desc)
    if nbytes > max_bytes:
        raise WireError("oversized", f"tensor of shape {list(shape)} is {nbytes} bytes, limit {max_bytes}")
    if len(frame) != nbytes:
        raise WireError("bad_shape", f"payload is {len(frame)} bytes, shape {list(shape)} of {dtype.name} needs {nbytes}")
    # Zero-copy: the array is a read-only view of the received frame.
    return np.frombuffer(frame, dtype=dtype).reshape(shape)


def _frame_count(frames: Sequence[Buffer], expected: int, what: str) -> None:
    if len(frames) < expected:
        raise WireError("truncated", f"{what} has {len(frames)} frames, expected {expected}")
    if len(frames) > expected:
        raise WireError("garbage", f"{what} has {len(frames)} frames, expected {expected}")


def _int_pairs(value: Any, key: str, limit: int) -> List[Tuple[int, int]]:
    if not isinstance(value, list) or len(value) > limit:
        raise WireError("garbage", f"header field {key!r} is not a list of at most {limit} pairs")
    out = []
    # Unrolled, with `type(v) is int` (never a bool: msgpack gives exact types): a heartbeat lists
    # every frame in flight; with 100 of them it decodes in 71 us this way, 144 us with all().
    for item in value:
        if type(item) is not list or len(item) != 2:
            raise WireError("garbage", f"header field {key!r} holds {_short(item)}, expected [int >= 0, int >= 0]")
        a, b = item
        if type(a) is not int or type(b) is not int or not (0 <= a <= MAX_FRAME_ID and 0 <= b <= MAX_FRAME_ID):
            raise WireError("garbage", f"header field {key!r} holds {_short(item)}, expected [int >= 0, int >= 0]")
        out.append((a, b))
    return out


def _name_map(value: Any, key: str, arity: int, limit: int) -> Dict[str, Any]:
    """{node id: int} (arity 1) or {node id: [int, int]} (arity 2), every int >= 0."""
    if not isinstance(value, dict) or len(value) > limit:
        raise WireError("garbage", f"header field {key!r} is not a map of at most {limit} node ids")
    out: Dict[str, Any] = {}
    # Unrolled with `type(v) is int` (msgpack gives exact types, never a bool for an int): every
    # heartbeat carries two of these maps, and all() over a generator cost more than the rest.
    for name, item in value.items():
        if type(name) is not str or not name or len(name) > MAX_ID_CHARS:
            raise WireError("garbage", f"header field {key!r} has a key {_short(name)}")
        if arity == 1:
            if type(item) is not int or not 0 <= item <= MAX_FRAME_ID:
                raise WireError("garbage", f"header field {key!r}[{_short(name)}] is {_short(item)}")
            out[name] = item
            continue
        if type(item) is not list or len(item) != 2:
            raise WireError("garbage", f"header field {key!r}[{_short(name)}] is {_short(item)}")
        a, b = item
        if type(a) is not int or type(b) is not int or not (0 <= a <= MAX_FRAME_ID and 0 <= b <= MAX_FRAME_ID):
            raise WireError("garbage", f"header field {key!r}[{_short(name)}] is {_short(item)}")
        out[name] = (a, b)
    return out


def _degraded(value: Any, limit: int) -> Tuple[Tuple[int, int, int], ...]:
    if type(value) is list and not value:   # nothing missing upstream: nearly every slice
        return ()
    if not isinstance(value, list) or len(value) > limit:
        raise WireError("garbage", f"header field 'deg' is not a list of at most {limit} entries")
    out = []
    for item in value:
        if type(item) is not list or len(item) != 3:
            raise WireError("garbage", f"header field 'deg' holds {_short(item)}, expected [stage, mask, zero]")
        stage, mask, zero = item
        if (type(stage) is not int or type(mask) is not int or type(zero) is not int
                or stage < 0 or zero < 0 or not 0 <= mask < 1 << MAX_PEERS):
            raise WireError("garbage", f"header field 'deg' holds {_short(item)}, expected [stage, mask, zero]")
        out.append((stage, mask, zero))
    return tuple(out)


def _names(value: Any, key: str, limit: int) -> Tuple[str, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise WireError("garbage", f"header field {key!r} is not a list of at most {limit} node ids")
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS for v in value) or len(set(value)) != len(value):
        raise WireError("garbage", f"header field {key!r} is {_short(value)}, expected distinct node ids")
    return tuple(value)


def decode(frames: Sequence[Buffer], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
           limits: Limits = FORMAT_LIMITS) -> Message:
    """The message in `frames`; raises `WireError` (never anything else) on bad input."""
    try:
        return _decode(frames, max_message_bytes, limits)
    except WireError:
        raise
    except Exception as exc:  # a check this module lacks must still never reach the caller's loop
        raise WireError("garbage", f"undecodable ({type(exc).__name__}: {_short(str(exc))})") from None


def _decode(frames: Sequence[Buffer], max_message_bytes: int, limits: Limits) -> Message:
    if not frames:
        raise WireError("truncated", "no frames")
    views = [_view(f) for f in frames]
    total = sum(map(len, views))
    if total > max_message_bytes:
        raise WireError("oversized", f"{total} bytes, limit {max_message_bytes}")
    if len(views[0]) > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header is {len(views[0])} bytes, limit {MAX_HEADER_BYTES}")
    if len(views) == 1 and len(views[0]) > limits.one_frame_header_bytes:
        raise WireError("oversized", f"a one-frame message of {len(views[0])} bytes, longer than any heartbeat "
                                     f"of this cluster ({limits.one_frame_header_bytes})")
    try:
        header = msgpack.unpackb(views[0], raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise WireError("garbage", f"trailing bytes after the header: {_short(str(exc))}") from None
    except (ValueError, msgpack.UnpackException) as exc:
        # unpackb reports a cut-off buffer as "incomplete input" (OutOfData in older msgpack).
        cut_off = isinstance(exc, msgpack.OutOfData) or "incomplete" in str(exc)
        raise WireError("truncated" if cut_off else "garbage", f"header is not msgpack: {_short(str(exc))}") from None
    if not isinstance(header, dict):
        raise WireError("garbage", f"header is a {type(header).__name__}, not a map")
    version = header.get("v")
    if not _is_int(version) or version != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {_short(version)}, this node speaks {PROTOCOL_VERSION}")
    tag = header.get("t")
    sender, incarnation = header.get("sender"), header.get("inc")
    # The checks of _name and _uint, inline for what every message holds (they raise with the
    # precise complaint when this quick look fails).
    if type(sender) is not str or not 0 < len(sender) <= MAX_ID_CHARS:
        sender = _name(header, "sender")
    if type(incarnation) is not int or not 0 <= incarnation <= MAX_FRAME_ID:
        incarnation = _uint(header, "inc")
    if tag == Heartbeat.TYPE:
        _frame_count(views, 1, "heartbeat")
        ready = header.get("ready")
        if not isinstance(ready, bool):
            raise WireError("garbage", f"header field 'ready' is {_short(ready)}, expected true or false")
        progress = _int_pairs(header.get("progress"), "progress", limits.max_progress)
        return Heartbeat(sender, incarnation, _name(header, "plan", MAX_HASH_CHARS), _name(header, "dtype", 16),
                         ready, _name_map(header.get("hears"), "hears", 2, limits.max_peers), dict(progress),
                         _name_map(header.get("inputs"), "inputs", 1, limits.max_peers),
                         _optional_name(header, "next", MAX_HASH_CHARS),
                         _uint(header, "switch") if "switch" in header else 0,
                         _optional_name(header, "rdir", MAX_PATH_CHARS))
    if tag == Slices.TYPE:
        items = _need(header, "slices", list)
        if not 1 <= len(items) <= MAX_BATCH_SLICES:
            raise WireError("garbage", f"{len(items)} slices in one message, expected 1..{MAX_BATCH_SLICES}")
        _frame_count(views, 1 + 2 * len(items), "slices")
        out = []
        for k, item in enumerate(items):
            if type(item) is not dict:
                raise WireError("garbage", f"slices[{k}] is {_short(item)}, not a map")
            frame, stage = item.get("frame"), item.get("stage")
            if type(frame) is not int or not 0 <= frame <= MAX_FRAME_ID:
                frame = _uint(item, "frame")
            if type(stage) is not int or not 0 <= stage <= MAX_DIM:
                stage = _uint(item, "stage", MAX_DIM)
            array = _tensor(item, views[2 + 2 * k], max_message_bytes)
            if array.ndim < 1:
                raise WireError("bad_shape", "a slice needs a neuron axis")
            ids_view = views[1 + 2 * k]
            if len(ids_view) != array.shape[0] * _IDS_DTYPE.itemsize:
                raise WireError("bad_shape", f"{len(ids_view)} bytes of neuron ids for {array.shape[0]} neurons")
            out.append(Slice(frame, stage, sender, np.frombuffer(ids_view, dtype=_IDS_DTYPE), array, incarnation,
                             _degraded(item.get("deg"), limits.max_stages)))
        return Slices(tuple(out), sender, incarnation)
    if tag == Input.TYPE:
        _frame_count(views, 2, "input")
        meta = _need(header, "meta", dict)
        array = _tensor(header, views[1], max_message_bytes)
        return Input(_uint(header, "frame"), _name(header, "origin"), array, meta, sender, incarnation,
                     _names(header.get("participants"), "participants", limits.max_peers), _uint(header, "t_ms"),
                     _optional_name(header, "plan", MAX_HASH_CHARS))
    if tag == Result.TYPE:
        descs = _need(header, "arrays", list)
        if len(descs) > MAX_RESULT_ARRAYS:
            raise WireError("garbage", f"{len(descs)} arrays, limit {MAX_RESULT_ARRAYS}")
        _frame_count(views, 1 + len(descs), "result")
        arrays = tuple(_tensor(d, v, max_message_bytes) for d, v in zip(descs, views[1:]))
        return Result(_uint(header, "frame"), _name(header, "origin"), _need(header, "meta", dict),
                      arrays, sender, incarnation)
    if tag == Control.TYPE:
        _frame_count(views, 1, "control")
        return Control(_name(header, "kind"), _need(header, "body", dict), sender, incarnation)
    raise WireError("bad_type", f"unknown message type {_short(tag)}")
