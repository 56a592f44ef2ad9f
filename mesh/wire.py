"""The mesh wire format: the one place that knows how messages become ZeroMQ frames.

Every message is one ZeroMQ multipart message. Frame 0 is a msgpack-encoded map (the header);
tensor payloads follow as raw frames so that they are sent and received without copies.
All integers in raw frames and all tensor payloads are little-endian, C order (row-major).

Header keys common to every message:

    "v"      int   protocol version, currently 1 (`PROTOCOL_VERSION`); anything else is rejected
    "t"      str   type tag: "hb", "slice", "input", "result" or "ctl"
    "sender" str   id of the sending node (for CURVE connections the receiver checks it against
                   the id the authenticated public key belongs to)
    "inc"    int   the sender's incarnation (a new process picks a new one), >= 0

Tensor descriptors (used below) are maps {"dtype": str, "shape": [int, ...]}; dtype is one of
float32, float16, float64, int64, int32, uint8, bool (bool is one byte per element, 0 or 1);
the payload frame holds exactly prod(shape) * itemsize bytes.

Messages, frame by frame:

Heartbeat ("hb"), 1 frame
    0  header + {"plan": str plan hash, "newest": int newest frame id the sender has seen, or -1}

Slice ("slice"), 3 frames: one node's part of the output of one stage for one frame
    0  header + {"frame": int >= 0, "stage": int >= 0, "dtype": str, "shape": [n, ...]}
    1  neuron ids: n int32 values (axis 0 of the payload is the neuron axis)
    2  payload: the tensor, shape `shape`, whose row i is neuron ids[i]

Input ("input"), 2 frames: a client input broadcast by the node that received it
    0  header + {"frame": int, "origin": str node id that took the request, "meta": map,
                 "dtype": str, "shape": [int, ...]}
    1  payload

Result ("result"), 1 + k frames: results of a frame (logits, masks, ...)
    0  header + {"frame": int, "origin": str, "meta": map, "arrays": [descriptor, ...] (k of them)}
    1..k  payloads in the order of "arrays"

Control ("ctl"), 1 frame: generic request/response (status, shutdown, ...)
    0  header + {"kind": str, "body": map}

A message whose frame count, header or payload sizes disagree with this description is
rejected by `decode` with a `WireError` whose `reason` names the drop counter.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Sequence, Tuple, Union

import msgpack
import numpy as np

from .errors import MeshError, WireError

PROTOCOL_VERSION = 1
# The header is a handful of scalars plus a small meta map; anything bigger is not ours.
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 8
MAX_RESULT_ARRAYS = 64
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

ALLOWED_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")
}
_IDS_DTYPE = np.dtype("<i4")

Buffer = Union[bytes, memoryview, Any]  # bytes, memoryview, zmq.Frame or a numpy view


@dataclass(frozen=True)
class Heartbeat:
    node_id: str
    incarnation: int
    plan_hash: str
    newest_frame: int = -1
    TYPE = "hb"

    @property
    def sender(self) -> str:
        return self.node_id


@dataclass(frozen=True)
class Slice:
    frame: int
    stage: int
    sender: str
    neuron_ids: np.ndarray = field(compare=False)
    array: np.ndarray = field(compare=False)
    incarnation: int = 0
    TYPE = "slice"

    @property
    def dtype(self) -> str:
        return self.array.dtype.name

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class Input:
    frame: int
    origin: str
    array: np.ndarray = field(compare=False)
    meta: Mapping[str, Any] = field(default_factory=dict)
    sender: str = ""
    incarnation: int = 0
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


Message = Union[Heartbeat, Slice, Input, Result, Control]
MESSAGE_TYPES = (Heartbeat, Slice, Input, Result, Control)


# ---------------------------------------------------------------- encoding

def _wire_array(array: np.ndarray, what: str) -> Tuple[dict, np.ndarray]:
    array = np.asarray(array)
    name = array.dtype.name
    if name not in ALLOWED_DTYPES:
        raise MeshError(f"{what}: dtype {name} is not allowed on the wire ({', '.join(ALLOWED_DTYPES)})")
    # A no-op (no copy) for the usual native little-endian C-contiguous array.
    array = np.ascontiguousarray(array, dtype=ALLOWED_DTYPES[name])
    # A flat byte view keeps the buffer zero-copy whatever the dtype (bool buffers included).
    return {"dtype": name, "shape": list(array.shape)}, array.reshape(-1).view(np.uint8)


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
        return [_header(msg, msg.node_id, msg.incarnation, plan=msg.plan_hash, newest=int(msg.newest_frame))]
    if isinstance(msg, Slice):
        desc, payload = _wire_array(msg.array, "slice")
        ids = np.ascontiguousarray(msg.neuron_ids, dtype=_IDS_DTYPE).reshape(-1)
        if msg.array.ndim < 1 or ids.shape[0] != msg.array.shape[0]:
            raise MeshError(f"slice: {ids.shape[0]} neuron ids for an array of shape {msg.array.shape}")
        head = _header(msg, msg.sender, msg.incarnation, frame=int(msg.frame), stage=int(msg.stage), **desc)
        return [head, ids.view(np.uint8), payload]
    if isinstance(msg, Input):
        desc, payload = _wire_array(msg.array, "input")
        head = _header(msg, msg.sender, msg.incarnation, frame=int(msg.frame), origin=msg.origin,
                       meta=dict(msg.meta), **desc)
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


def _need(header: dict, key: str, kind, reason: str = "garbage"):
    value = header.get(key)
    # bool is an int subclass; a True frame id is garbage, not frame 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(reason, f"header field {key!r} is {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def _nonneg(header: dict, key: str) -> int:
    value = _need(header, key, int)
    if value < 0:
        raise WireError("garbage", f"header field {key!r} is {value}, expected >= 0")
    return value


def _descriptor(desc: Any) -> Tuple[np.dtype, Tuple[int, ...], int]:
    if not isinstance(desc, dict):
        raise WireError("garbage", f"tensor descriptor is {desc!r}")
    name = desc.get("dtype")
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise WireError("bad_dtype", f"dtype {name!r} is not allowed")
    shape = desc.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError("bad_shape", f"shape {shape!r} is not a list of at most {MAX_NDIM} sizes >= 0")
    dtype = ALLOWED_DTYPES[name]
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    return dtype, tuple(shape), nbytes


def _tensor(desc: Any, frame: memoryview, max_bytes: int) -> np.ndarray:
    dtype, shape, nbytes = _descriptor(desc)
    if nbytes > max_bytes:
        raise WireError("oversized", f"tensor of shape {shape} is {nbytes} bytes, limit {max_bytes}")
    if len(frame) != nbytes:
        raise WireError("bad_shape", f"payload is {len(frame)} bytes, shape {list(shape)} of {dtype.name} needs {nbytes}")
    # Zero-copy: the array is a read-only view of the received frame.
    return np.frombuffer(frame, dtype=dtype).reshape(shape)


def _frame_count(frames: Sequence[Buffer], expected: int, what: str) -> None:
    if len(frames) < expected:
        raise WireError("truncated", f"{what} has {len(frames)} frames, expected {expected}")
    if len(frames) > expected:
        raise WireError("garbage", f"{what} has {len(frames)} frames, expected {expected}")


def decode(frames: Sequence[Buffer], max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """The message in `frames`; raises `WireError` (never anything else) on bad input."""
    if not frames:
        raise WireError("truncated", "no frames")
    views = [_view(f) for f in frames]
    total = sum(len(v) for v in views)
    if total > max_message_bytes:
        raise WireError("oversized", f"{total} bytes, limit {max_message_bytes}")
    if len(views[0]) > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header is {len(views[0])} bytes, limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(views[0], raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise WireError("garbage", f"trailing bytes after the header: {exc}") from None
    except (ValueError, msgpack.UnpackException) as exc:
        # unpackb reports a cut-off buffer as "incomplete input" (OutOfData in older msgpack).
        cut_off = isinstance(exc, msgpack.OutOfData) or "incomplete" in str(exc)
        reason = "truncated" if cut_off else "garbage"
        raise WireError(reason, f"header is not msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises assorted errors on hostile input; all are garbage
        raise WireError("garbage", f"header is not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("garbage", f"header is a {type(header).__name__}, not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise WireError("bad_version", f"protocol version {version!r}, this node speaks {PROTOCOL_VERSION}")
    tag = header.get("t")
    sender = _need(header, "sender", str)
    if not sender:
        raise WireError("garbage", "empty sender")
    incarnation = _nonneg(header, "inc")
    if tag == Heartbeat.TYPE:
        _frame_count(views, 1, "heartbeat")
        newest = _need(header, "newest", int)
        return Heartbeat(sender, incarnation, _need(header, "plan", str), newest)
    if tag == Slice.TYPE:
        _frame_count(views, 3, "slice")
        frame, stage = _nonneg(header, "frame"), _nonneg(header, "stage")
        array = _tensor(header, views[2], max_message_bytes)
        if array.ndim < 1:
            raise WireError("bad_shape", "a slice needs a neuron axis")
        if len(views[1]) != array.shape[0] * _IDS_DTYPE.itemsize:
            raise WireError("bad_shape", f"{len(views[1])} bytes of neuron ids for {array.shape[0]} neurons")
        ids = np.frombuffer(views[1], dtype=_IDS_DTYPE)
        return Slice(frame, stage, sender, ids, array, incarnation)
    if tag == Input.TYPE:
        _frame_count(views, 2, "input")
        meta = _need(header, "meta", dict)
        array = _tensor(header, views[1], max_message_bytes)
        return Input(_nonneg(header, "frame"), _need(header, "origin", str), array, meta, sender, incarnation)
    if tag == Result.TYPE:
        descs = _need(header, "arrays", list)
        if len(descs) > MAX_RESULT_ARRAYS:
            raise WireError("garbage", f"{len(descs)} arrays, limit {MAX_RESULT_ARRAYS}")
        _frame_count(views, 1 + len(descs), "result")
        arrays = tuple(_tensor(d, v, max_message_bytes) for d, v in zip(descs, views[1:]))
        return Result(_nonneg(header, "frame"), _need(header, "origin", str), _need(header, "meta", dict),
                      arrays, sender, incarnation)
    if tag == Control.TYPE:
        _frame_count(views, 1, "control")
        return Control(_need(header, "kind", str), _need(header, "body", dict), sender, incarnation)
    raise WireError("bad_type", f"unknown message type {tag!r}")
