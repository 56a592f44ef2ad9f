"""The one place that imports torchvision, so that a CUDA-built wheel still works on CPU torch.

The PyPI torchvision for x86 is built against CUDA torch; imported beside the CPU torch it
fails while registering the fake kernel of its `nms` op, because the compiled extension that
should have defined the op's schema did not load (`operator torchvision::nms does not exist`).
Nothing here uses nms; defining the two schemas ourselves lets the Python side finish
importing, after which models, transforms and torch.fx work. On a matching build (JetPack on
a Jetson) the first import simply succeeds and none of this runs.
"""

import importlib
import sys

import torch

# Kept at module level: a torch.library.Library deregisters its definitions when collected.
_SCHEMA_LIB = None

_MISSING_OP = "operator torchvision::nms does not exist"


def _define_missing_schemas():
    global _SCHEMA_LIB
    if _SCHEMA_LIB is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")
    # Same signatures as torchvision/csrc/ops/nms.cpp, so that torchvision's
    # register_fake decorators find what they expect.
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMA_LIB = lib


def import_torchvision():
    """Return the torchvision module, working around a CPU-torch / CUDA-torchvision mismatch."""
    module = sys.modules.get("torchvision")
    if module is not None and hasattr(module, "models"):
        return module
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:
        if _MISSING_OP not in str(exc):
            raise
    _define_missing_schemas()
    # The failed import left partial modules behind; a second import would reuse them.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    return importlib.import_module("torchvision")
