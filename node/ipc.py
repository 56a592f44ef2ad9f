"""The engine ↔ event-handler protocol on one board (ZeroMQ over ipc://).

The handler binds one ROUTER; each engine worker thread connects its own DEALER, so a worker
owns one frame at a time and simply blocks on its socket for that frame's gathers. Every
message is a multipart message: frame 0 is the kind (ASCII), frame 1 a msgpack header, and
tensors follow as raw frames, sent with copy=False (C order, little-endian, no copies in
Python; the kernel's socket buffer is the only copy on the way).

    worker → handler  ready                                  (the worker is idle)
    handler → worker  frame     {frame, dtype, shape}        input tensor
    worker → handler  slice     {frame, stage, dtype, shape} neuron ids (int32), slice (neuron-major)
    handler → worker  gathered  {frame, stage, dtype, shape} received ids (int32), their rows
                                 (neuron-major): only what came from peers, since the worker has
                                 its own rows; ids that neither holds are the zero-filled ones
    worker → handler  done      {frame, dtype, shape, zero_filled: [fraction per stage],
                                 compute_ms}                 logits
    worker → handler  error     {frame, message}
    handler → worker  stop      {}
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import msgpack
import numpy as np

READY, FRAME, SLICE, GATHERED, DONE, ERROR, STOP = (b"ready", b"frame", b"slice", b"gathered", b"done",
                                                    b"error", b"stop")


def pack(kind: bytes, header: Dict[str, Any], *arrays: np.ndarray) -> List[Any]:
    frames: List[Any] = [kind, msgpack.packb(header, use_bin_type=True)]
    for a in arrays:
        a = np.ascontiguousarray(a)
        frames.append(a.reshape(-1).view(np.uint8) if a.size else b"")
    return frames


def describe(array: np.ndarray) -> Dict[str, Any]:
    return {"dtype": array.dtype.name, "shape": list(array.shape)}


def unpack(frames: Sequence[Any]) -> Tuple[bytes, Dict[str, Any], List[memoryview]]:
    kind = bytes(frames[0])
    raw = bytes(frames[1]) if len(frames) > 1 else b""
    header = msgpack.unpackb(raw, raw=False) if raw else {}
    return kind, header, [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames[2:]]


def array(buffer: memoryview, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """A view of a received frame (read-only; no copy)."""
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
