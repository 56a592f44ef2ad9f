"""Fashion-MNIST and `fashion_vgg`: a VGG-style CNN trained here, the robustness benchmark.

digits_cnn is small and its test split has 360 images; Fashion-MNIST (60k train, 10k test,
28x28 grayscale clothing, 10 classes) is a harder task on real data that this machine can
still train on, and a VGG with BatchNorm is the kind of deep network whose accuracy under lost
channels the paper measures. The Debian package `dataset-fashion-mnist` installs the IDX files
under /usr/share/datasets/fashion-mnist/ (`make fashion-data` does that).

    python -m robustdice.partitioner.zoo.fashion train --out partitioner/zoo/weights/fashion_vgg.pt
    python -m robustdice.partitioner.zoo.fashion eval [--weights FILE]
"""

import argparse
import functools
import gzip
import os
import struct
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from robustdice.partitioner.errors import DataError
from robustdice.partitioner.zoo.digits import accuracy  # noqa: F401 (this module's API too)
from robustdice.partitioner.zoo.digits import package_state_dict
from robustdice.partitioner.zoo.trainer import train_classifier

DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
INSTALL_HINT = ("install it with `make fashion-data` (runs `apt-get install -y dataset-fashion-mnist`), "
                f"or put the four IDX .gz files of Fashion-MNIST in {DATA_DIR}")
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
# Pixel mean and std of the 60k training images scaled to [0, 1] (computed once, rounded).
MEAN = 0.2860
STD = 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
DEFAULT_EPOCHS = 20
BATCH_SIZE = 128
# Training augmentation: shifts of up to this many pixels and left-right flips (clothes are
# roughly symmetric; the test set is not augmented).
SHIFT_PX = 2
WEIGHTS_RESOURCE = ("weights", "fashion_vgg.pt")


class FashionVGG(nn.Module):
    """Six 3x3 conv layers with BatchNorm (32-32, 64-64, 128-128, max-pooling between blocks),
    global average pooling, then a 128->128->10 classifier.

    Named like torchvision's VGG (`features.N`, `classifier.N`) so that plans read alike. The
    head is small on purpose: the weights ship inside the package (about 1.2 MB).
    """

    def __init__(self, num_classes=NUM_CLASSES, widths=(32, 64, 128)):
        super().__init__()
        layers = []
        cin = INPUT_SHAPE[0]
        for block, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                cin = width
            # 28 -> 14 -> 7, then global pooling: the last block keeps its 7x7 map
            layers.append(nn.MaxPool2d(2) if block < len(widths) - 1 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class FashionSplit(NamedTuple):
    """Fashion-MNIST's own train/test split, normalised by (MEAN, STD); test is the evaluation split."""

    train_images: torch.Tensor  # (60000, 1, 28, 28) float32
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor   # (10000, 1, 28, 28) float32
    test_labels: torch.Tensor


def data_missing(data_dir=DATA_DIR):
    """The IDX files not present in data_dir (empty when the dataset is installed)."""
    return [f for f in FILES.values() if not os.path.isfile(os.path.join(data_dir, f))]


def read_idx(path):
    """A numpy array from a (gzipped) IDX file: magic 0x0000 08 NDIM, big-endian dims, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[:3] != b"\x00\x00\x08":
                raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {head.hex()})")
            ndim = head[3]
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            data = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {data.size} bytes, its header says {dims}")
    return data.reshape(dims)


@functools.lru_cache(maxsize=2)
def _arrays(data_dir):
    missing = data_missing(data_dir)
    if missing:
        raise DataError(f"Fashion-MNIST is not installed ({', '.join(missing)} missing in {data_dir}); "
                        + INSTALL_HINT)
    return {key: read_idx(os.path.join(data_dir, name)) for key, name in FILES.items()}


def normalise(images_u8):
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28), scaled to [0, 1] then by MEAN and STD."""
    images = torch.from_numpy(np.array(images_u8, dtype=np.float32)).div_(255.0)
    return images.sub_(MEAN).div_(STD)[:, None]


def fashion_split(data_dir=DATA_DIR):
    """The 60k/10k split, as fresh tensors. Raises DataError saying how to install the data."""
    a = _arrays(str(data_dir))
    return FashionSplit(
        train_images=normalise(a["train_images"]),
        train_labels=torch.from_numpy(a["train_labels"].astype(np.int64)),
        test_images=normalise(a["test_images"]),
        test_labels=torch.from_numpy(a["test_labels"].astype(np.int64)),
    )


def augment(images, generator):
    """Random shifts of up to SHIFT_PX pixels (zero-padded in [0, 1] space) and left-right flips."""
    n, _, h, w = images.shape
    background = (0.0 - MEAN) / STD
    padded = nn.functional.pad(images, (SHIFT_PX,) * 4, value=background)
    dy = torch.randint(0, 2 * SHIFT_PX + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * SHIFT_PX + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * SHIFT_PX)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train(seed=0, epochs=DEFAULT_EPOCHS, data_dir=DATA_DIR, progress=True, log=None):
    """Train a FashionVGG on the 60k train split, deterministically for a given seed and thread
    count; returns it in eval mode."""
    split = fashion_split(data_dir)

    def epoch_end(epoch, loss, model):
        if log is not None:
            acc = accuracy(model, split.test_images, split.test_labels)
            log(f"epoch {epoch + 1}/{epochs} loss {loss:.4f} test accuracy {acc:.4f}")
    return train_classifier(FashionVGG, split.train_images, split.train_labels, seed=seed, epochs=epochs,
                            batch_size=BATCH_SIZE, lr=3e-3, weight_decay=5e-4, label_smoothing=0.05,
                            augment=augment, progress=progress, desc="train fashion_vgg", epoch_end=epoch_end)


def shipped_state_dict():
    """The state_dict shipped inside the package (weights/fashion_vgg.pt)."""
    return package_state_dict(*WEIGHTS_RESOURCE)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m robustdice.partitioner.zoo.fashion",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train on the 60k train split and save a state_dict")
    p_train.add_argument("--out", required=True, help="where to write the state_dict (.pt)")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p_train.add_argument("--data", default=DATA_DIR, help=f"folder of the IDX files (default {DATA_DIR})")
    p_eval = sub.add_parser("eval", help="test accuracy of the shipped (or given) weights")
    p_eval.add_argument("--weights", help="a state_dict file instead of the shipped weights")
    p_eval.add_argument("--data", default=DATA_DIR)
    args = parser.parse_args(argv)
    try:
        split = fashion_split(args.data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "train":
        started = time.perf_counter()
        model = train(seed=args.seed, epochs=args.epochs, data_dir=args.data, log=print)
        elapsed = time.perf_counter() - started
        torch.save(model.state_dict(), args.out)
        acc = accuracy(model, split.test_images, split.test_labels)
        print(f"trained in {elapsed:.0f} s ({torch.get_num_threads()} threads); test accuracy {acc:.4f} "
              f"({len(split.test_labels)} images); saved {args.out}")
    else:
        model = FashionVGG()
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True)
                              if args.weights else shipped_state_dict())
        acc = accuracy(model, split.test_images, split.test_labels)
        print(f"test accuracy {acc:.4f} ({len(split.test_labels)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
