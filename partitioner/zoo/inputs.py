"""What a model takes as input: its shape and how an image becomes that tensor.

An `InputSpec` travels in the plan, so that every tool that feeds a model (calibration,
evaluation, `robustdice submit`, `robustdice cluster`) preprocesses images the way that model
was trained, wherever it runs. Pure data: no torch here (the node's handler reads plans).

    shape   (C, H, W) of one image
    mean    per-channel mean subtracted after scaling pixels to [0, 1]
    std     per-channel divisor after that
    resize  "crop":    short side to round(min(H, W) * 256 / 224), then a centre crop of (H, W)
                       (torchvision's ImageNet evaluation);
            "stretch": straight to (H, W), whatever the aspect ratio (small grayscale models)

C is 1 (grayscale) or 3 (RGB); mean and std have one value per channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

from robustdice.partitioner.errors import PlanError

RESIZE_MODES = ("crop", "stretch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    shape: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    resize: str = "crop"

    def __post_init__(self) -> None:
        check_spec(self.shape, self.mean, self.std, self.resize, where="input")

    @property
    def channels(self) -> int:
        return self.shape[0]

    def to_json(self) -> Dict[str, Any]:
        return {"shape": list(self.shape), "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_json(cls, data: Any, where: str = "input") -> "InputSpec":
        if not isinstance(data, dict):
            raise PlanError(f"plan field {where}: {data!r} is not an object")
        for key in ("shape", "mean", "std", "resize"):
            if key not in data:
                raise PlanError(f"plan field {where}.{key} is missing")
        check_spec(data["shape"], data["mean"], data["std"], data["resize"], where=f"plan field {where}")
        return cls(tuple(data["shape"]), tuple(float(v) for v in data["mean"]),
                   tuple(float(v) for v in data["std"]), data["resize"])


def check_spec(shape: Sequence[Any], mean: Sequence[Any], std: Sequence[Any], resize: Any, where: str) -> None:
    """Raise PlanError naming the field unless this is a usable input specification."""
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise PlanError(f"{where}.shape: {shape!r} is not three sizes > 0 (C, H, W)")
    if shape[0] not in (1, 3):
        raise PlanError(f"{where}.shape: {shape[0]} channels; images give 1 (grayscale) or 3 (RGB)")
    for name, values, positive in (("mean", mean, False), ("std", std, True)):
        if (not isinstance(values, (list, tuple)) or len(values) != shape[0]
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           and (v > 0 or not positive) for v in values)):
            need = "> 0" if positive else "finite"
            raise PlanError(f"{where}.{name}: {values!r} is not {shape[0]} {need} number(s), one per channel")
    if resize not in RESIZE_MODES:
        raise PlanError(f"{where}.resize: {resize!r} is not one of {', '.join(RESIZE_MODES)}")


def imagenet(shape: Tuple[int, int, int] = (3, 224, 224)) -> InputSpec:
    return InputSpec(tuple(shape), IMAGENET_MEAN, IMAGENET_STD, "crop")
