"""The small CNN this machine can train and test on real data: scikit-learn's handwritten digits.

ImageNet and its pretrained weights cannot be fetched here, so the accuracy-under-failure
checks run on `load_digits()` (1797 real 8x8 scans, values 0..16) with a CNN trained here in
well under a minute. The net is deliberately wider than the task needs (32-64-128 channels,
a 128->64->10 head): it is split over 4 devices that may lose channels, and a redundant net
is what lets importance-aware placement show its advantage over a naive split.

    python -m robustdice.partitioner.zoo.digits train --out partitioner/zoo/weights/digits_cnn.pt
    python -m robustdice.partitioner.zoo.digits eval [--weights FILE]
"""

import argparse
import functools
import importlib.resources
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from robustdice.partitioner.zoo.trainer import train_classifier

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
# load_digits() pixels are counts 0..16 of set bits in 4x4 blocks of the original scan.
PIXEL_MAX = 16.0
TEST_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_EPOCHS = 40
BATCH_SIZE = 64
WEIGHTS_RESOURCE = ("weights", "digits_cnn.pt")


class DigitsCNN(nn.Module):
    """Conv 32-64-128 then a 128->64->10 head; only channel-sliceable layer types.

    Layers sit in two nn.Sequential blocks so that their torch.fx names are `features.N`
    and `classifier.N`, the names plans and logs use.
    """

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DigitsSplit(NamedTuple):
    """The fixed train/test split; the test part is the evaluation split."""

    train_images: torch.Tensor  # (n, 1, 8, 8) float32 in [0, 1]
    train_labels: torch.Tensor  # (n,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    test_indices: torch.Tensor  # (n,) int64, rows of load_digits() in the test part


@functools.lru_cache(maxsize=1)
def _split_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    images = (digits.images.astype(np.float32) / PIXEL_MAX)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    return images, labels, train_idx, test_idx


def digits_split():
    """The fixed stratified 80/20 split of load_digits(); fresh tensors on every call."""
    images, labels, train_idx, test_idx = _split_arrays()
    return DigitsSplit(
        train_images=torch.from_numpy(images[train_idx].copy()),
        train_labels=torch.from_numpy(labels[train_idx].copy()),
        test_images=torch.from_numpy(images[test_idx].copy()),
        test_labels=torch.from_numpy(labels[test_idx].copy()),
        test_indices=torch.from_numpy(test_idx.astype(np.int64)),
    )


def train(seed=0, epochs=DEFAULT_EPOCHS, log=None):
    """Train a DigitsCNN on the train split, deterministically for a given seed; eval mode."""
    split = digits_split()

    def epoch_end(epoch, loss, model):
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs} loss {loss:.4f}")
    return train_classifier(DigitsCNN, split.train_images, split.train_labels, seed=seed, epochs=epochs,
                            batch_size=BATCH_SIZE, lr=3e-3, weight_decay=1e-4, desc="train digits_cnn",
                            epoch_end=epoch_end)


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512):
    """Top-1 accuracy of `model` (put in eval mode) on the given images, as a fraction."""
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size])
        correct += (logits.argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def shipped_state_dict():
    """The state_dict of the weights shipped inside the package (weights/digits_cnn.pt)."""
    return package_state_dict(*WEIGHTS_RESOURCE)


def package_state_dict(*parts):
    """A state_dict stored inside this package, e.g. ("weights", "digits_cnn.pt")."""
    resource = importlib.resources.files(__package__).joinpath(*parts)
    with importlib.resources.as_file(resource) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def load_shipped():
    """A DigitsCNN with the shipped weights, in eval mode."""
    model = DigitsCNN()
    model.load_state_dict(shipped_state_dict())
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m robustdice.partitioner.zoo.digits",
                                      description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train on the train split and save a state_dict")
    p_train.add_argument("--out", required=True, help="where to write the state_dict (.pt)")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p_eval = sub.add_parser("eval", help="test accuracy of the shipped (or given) weights")
    p_eval.add_argument("--weights", help="a state_dict file instead of the shipped weights")
    args = parser.parse_args(argv)

    split = digits_split()
    if args.command == "train":
        started = time.perf_counter()
        model = train(seed=args.seed, epochs=args.epochs, log=print)
        elapsed = time.perf_counter() - started
        torch.save(model.state_dict(), args.out)
        acc = accuracy(model, split.test_images, split.test_labels)
        print(f"trained in {elapsed:.1f} s; test accuracy {acc:.4f} "
              f"({len(split.test_labels)} images); saved {args.out}")
    else:
        if args.weights:
            model = DigitsCNN()
            model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
            model.eval()
        else:
            model = load_shipped()
        acc = accuracy(model, split.test_images, split.test_labels)
        print(f"test accuracy {acc:.4f} ({len(split.test_labels)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
