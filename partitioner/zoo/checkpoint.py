"""Weights files: a state_dict read safely and loaded into a model, with errors that name the
mismatch. Shared by the built-in models (models.py) and users' own (usermodel.py)."""
from __future__ import annotations

import hashlib
import os
from typing import Mapping

import torch

from robustdice.partitioner.errors import ModelError


def one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_file(path):
    if not os.path.isfile(path):
        raise ModelError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a usable state_dict"
        raise ModelError(f"cannot read weights file {path}: {one_line(exc)}") from None
    if isinstance(obj, dict):
        # Training scripts commonly wrap the state_dict in a checkpoint dict.
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} holds no state_dict (a dict of tensors)")
    return obj


def load_state(model, name, state, source):
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        raise ModelError(f"weights from {source} do not fit {name}: {'; '.join(parts)}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"weights from {source} do not fit {name}: {key} has shape "
                f"{tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def _first(keys, n=3):
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor of a state_dict, in key order (names, dtypes, shapes, bytes):
    what a plan records of the weights it was made from (runtime.weights_digest)."""
    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()
