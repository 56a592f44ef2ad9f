"""The user's own CNN: `--model package.module:factory`.

`factory` is any callable that `package.module` exposes (a function, or an nn.Module class)
and that returns an nn.Module taking one (N, C, H, W) batch. It is called with no arguments.

Input specification, first match wins per field (shape, mean, std, resize):
1. the command line: `--input-shape C,H,W` and `--preprocess` (see `parse_preprocess`);
2. the factory's own: an attribute `robustdice_input` on the factory, a dict with any of
   "shape", "mean", "std", "resize" (e.g. `build.robustdice_input = {"shape": [3, 32, 32]}`);
3. pixels scaled to [0, 1] (mean 0, std 1), resized straight to (H, W) ("stretch", which
   leaves images already of the model's size untouched). The shape has no default.

Weights: `--weights FILE` loads a state_dict (or a checkpoint dict holding one under
"state_dict" or "model") into the factory's model; `DEFAULT` and `none` keep what the factory
returns, after `torch.manual_seed(seed)`, so a factory that loads its own weights is used as is.

The model is traced once here (architecture.py); what is partitioned, digested and shipped is
that traced graph, rebuilt from its stored form, so the plan describes exactly what the boards
run, without the user's code.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from robustdice.partitioner.errors import ModelError, PartitionerError, PlanError
from robustdice.partitioner.zoo import architecture
from robustdice.partitioner.zoo.checkpoint import load_file, load_state
from robustdice.partitioner.zoo.inputs import InputSpec

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
SPEC_ATTRIBUTE = "robustdice_input"
PRESETS = {"imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "resize": "crop"}}


def is_import_path(name: Any) -> bool:
    """True for `package.module:factory` (a user's model) rather than a built-in name."""
    return isinstance(name, str) and ":" in name


def load_factory(path: str):
    if not _IMPORT_PATH.fullmatch(path):
        raise ModelError(f"model {path!r} is not package.module:factory")
    module_name, attr = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model {path}: cannot import {module_name} ({exc}); "
                         f"is it installed, or on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model {path}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {path}: {attr} is a {type(obj).__name__}, not a factory to call")
    return obj


def build(path: str, weights: Any = "DEFAULT", seed: int = 0) -> architecture.StoredModel:
    """The user's model as the boards will run it: traced, stored, rebuilt, weights loaded."""

    factory = load_factory(path)
    torch.manual_seed(seed)
    try:
        model = factory()
    except Exception as exc:  # the user's code may raise anything; say where and what
        raise ModelError(f"model {path}: the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {path}: the factory returned a {type(model).__name__}, not an nn.Module")
    if weights is not None and str(weights) not in ("DEFAULT", "none", "None"):
        load_state(model, path, load_file(str(weights)), str(weights))
    traced = architecture.trace(model, f"model {path}")
    rebuilt = architecture.build(architecture.encode(traced))
    rebuilt.load_state_dict(traced.state_dict(), strict=True)
    return rebuilt


def parse_shape(text: str) -> Tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise PartitionerError(f"--input-shape {text!r} is not C,H,W (three sizes >= 1, e.g. 3,32,32)")
    return shape  # type: ignore[return-value]


def parse_preprocess(text: str) -> Dict[str, Any]:
    """`imagenet`, or `mean=M,std=S,resize=crop|stretch` (any of them), where M and S are one
    value for every channel or one per channel separated by '/': mean=0.485/0.456/0.406."""
    text = str(text).strip()
    if text in PRESETS:
        return dict(PRESETS[text])
    out: Dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("mean", "std", "resize") or key in out:
            raise PartitionerError(f"--preprocess {text!r}: {item.strip()!r} is not mean=..., std=... or resize=... "
                                   f"(or give a preset: {', '.join(PRESETS)})")
        if key == "resize":
            out[key] = value.strip()
            continue
        try:
            out[key] = tuple(float(v) for v in value.split("/"))
        except ValueError:
            raise PartitionerError(f"--preprocess {text!r}: {key}={value!r} is not numbers separated by '/'") from None
    return out


def declared_input(path: str) -> Dict[str, Any]:
    """The factory's own `robustdice_input`, checked for its keys ({} when it has none)."""
    declared = getattr(load_factory(path), SPEC_ATTRIBUTE, None)
    if declared is None:
        return {}
    if not isinstance(declared, dict) or not set(declared) <= {"shape", "mean", "std", "resize"}:
        raise ModelError(f"model {path}: {SPEC_ATTRIBUTE} {declared!r:.80} is not a dict of shape, mean, std, resize")
    return dict(declared)


def input_spec(path: str, shape: Optional[Sequence[int]] = None, preprocess: Optional[str] = None) -> InputSpec:
    """The InputSpec of a user's model: command line, then the factory's own, then defaults."""
    fields = declared_input(path)
    if shape is not None:
        fields["shape"] = tuple(shape)
    if preprocess is not None:
        fields.update(parse_preprocess(preprocess))
    if "shape" not in fields:
        raise PartitionerError(f"--input-shape is needed for --model {path} (its factory declares no "
                               f"{SPEC_ATTRIBUTE}['shape'])")
    channels = fields["shape"][0] if isinstance(fields["shape"], (list, tuple)) and fields["shape"] else 1

    def per_channel(key: str, default: float):
        value = fields.get(key, default)
        value = (value,) if isinstance(value, (int, float)) else tuple(value)
        return value * channels if len(value) == 1 else value
    try:
        return InputSpec(tuple(fields["shape"]), per_channel("mean", 0.0), per_channel("std", 1.0),
                         fields.get("resize", "stretch"))
    except PlanError as exc:  # InputSpec names the field as a plan's; here it is the user's input
        raise PartitionerError(f"model {path}: {str(exc).replace('input.', 'input ', 1)}") from None
