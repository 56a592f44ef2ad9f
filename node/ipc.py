"""The engine ↔ event-handler protocol on one board (ZeroMQ DEALER ↔ DEALER over ipc://).

The handler binds, the engine connects; one connection, messages in order both ways. Every
message is multipart: frame 0 is the kind (ASCII), frame 1 a msgpack list of item headers, and
the items' tensors follow as raw frames, in item order (each header says how many are its own
in "n"), sent with copy=False (C order, little-endian; the kernel's socket buffer is the only
copy on the way).

The engine is a dataflow engine: it never waits on the network. The handler sends work items
(the frames it decides run next: node/frames.py, oldest first), several per message when
several are ready; the engine computes them in order and answers each message with one
`results` message, one result per input or gathered item.

    engine → handler  ready    []                                   (the shard is loaded)
    engine → handler  results  [{kind: "telemetry", device, dtype, ..., row_elements: [int per stage]}]
        right after ready, and telemetry rides along on later results; row_elements is the
        values per neuron and image of each stage's slices (the handler's message bound)
    handler → engine  work     items, each one of:
        {kind: "input", frame, alone, plan?, dtype, shape}          1 frame: the input tensor
            start the frame: compute this device's slice of its first stage; with alone=true
            (no other participant) run every stage here and answer `done`; `plan` is the hash
            of the plan it runs on (a roll-out's next one; absent: the current)
        {kind: "gathered", frame, stage, failed: [device], from: [device, ...], dtype,
         trailing: [...]}                                           1 frame per device in `from`:
            its rows of the stage, in the plan's order for that device (the handler checked
            them): what came from the peers (the engine has its own slice); `failed` are the
            devices whose rows did not come
        {kind: "drop", frame}                                       0 frames; no result
            forget the frame (expired)
        {kind: "prepare", plan_dir, plan_hash}                      0 frames
            load that plan's shard beside the current one (a roll-out: node/plans.py)
        {kind: "retire", plan_hash}                                 0 frames; no result
            drop that plan (no frame runs on it any more); the other one is the current
    engine → handler  results  items, each one of (every work result also carries `ms`, the
    engine's time on that item, which sizes the handler's window: node/serving.py):
        {kind: "slice", frame, stage, zero_before, dtype, shape}    1 frame: this device's slice
            (neuron-major; its neuron ids are the plan's for this device and stage);
            zero_before: neurons zero-filled at stage - 1 (null at stage 0)
        {kind: "done", frame, zero: {stage: neurons zero-filled}, compute_ms, dtype, shape}
                                                                    1 frame: the logits
        {kind: "error", frame, message, reason?}                    0 frames: the frame failed here;
            reason "not_finite": this device's slice of a stage held NaN or Inf
        {kind: "prepared", plan_hash, row_elements, error?}         0 frames: the plan of a
            `prepare` is loaded (row_elements as in telemetry), or `error` says why not
    handler → engine  stop     []
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import msgpack
import numpy as np

from robustdice.mesh.wire import dtype_name

READY, WORK, RESULTS, STOP = b"ready", b"work", b"results", b"stop"
INPUT, GATHERED, DROP = "input", "gathered", "drop"
PREPARE, RETIRE, PREPARED = "prepare", "retire", "prepared"
SLICE, DONE, ERROR = "slice", "done", "error"
TELEMETRY = "telemetry"     # rides along with results; not a work item
NOT_FINITE = "not_finite"   # the reason of an error for a slice with NaN or Inf

Item = Tuple[Dict[str, Any], Sequence[Any]]   # (header, tensors or received buffers)


def raw(a: np.ndarray) -> Any:
    """A tensor as one frame: its buffer, no copy (one made contiguous first if it is not)."""
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.data if a.size else b""


def pack(kind: bytes, items: Sequence[Item]) -> List[Any]:
    headers, frames = [], []
    for header, arrays in items:
        headers.append(dict(header, n=len(arrays)))
        frames += [raw(a) if isinstance(a, np.ndarray) else a for a in arrays]
    return [kind, msgpack.packb(headers, use_bin_type=True)] + frames


def unpack(frames: Sequence[Any]) -> Tuple[bytes, List[Item]]:
    kind = bytes(frames[0])
    headers = msgpack.unpackb(bytes(frames[1]), raw=False, strict_map_key=False) if len(frames) > 1 else []
    bufs = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames[2:]]
    items, at = [], 0
    for header in headers:
        n = header.get("n", 0)
        items.append((header, bufs[at:at + n]))
        at += n
    return kind, items


def describe(array: np.ndarray) -> Dict[str, Any]:
    return {"dtype": dtype_name(array.dtype), "shape": list(array.shape)}


_DTYPES: Dict[str, np.dtype] = {}   # np.dtype(name) parses the name at every call


def array(buffer: memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """A view of a received frame (read-only; no copy)."""
    known = _DTYPES.get(dtype)
    if known is None:
        known = np.dtype(dtype)
        if len(_DTYPES) < 64:   # the names come from the other process of this node: a handful
            _DTYPES[dtype] = known
    return np.frombuffer(buffer, dtype=known).reshape(shape)
