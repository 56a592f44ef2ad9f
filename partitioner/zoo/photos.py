"""Unlabelled natural photos for the 224x224 models: their calibration and distillation images.

The 224x224 models' default evaluation set is scikit-image's photos and their crops
(data.evaluation_set). Nothing is tuned on it: neuron scores, fill statistics and fine-tuning
by distillation take their images from the photo wallpapers of two Debian packages instead
(`make photo-data` installs them), a disjoint source. Only the photographs are used, not the
drawn or abstract wallpapers of the same packages:

    mate-backgrounds              /usr/share/backgrounds/mate/nature/*.jpg (12 photos)
    plasma-workspace-wallpapers   /usr/share/wallpapers/<NAME>/contents/images/ (12 photos)

Random crops and flips of 24 photos give as many different inputs as a run asks for.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

from robustdice.partitioner.errors import DataError

MATE_NATURE = "/usr/share/backgrounds/mate/nature"
PLASMA_WALLPAPERS = "/usr/share/wallpapers"
# The photographs among Plasma's wallpapers (the others are drawings and abstract shapes).
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
                 "Grey", "Kite", "Kokkini", "Path", "Shell", "summer_1am")
PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")
# Both packages, every photo: calibration must not depend on which of them a machine has.
MIN_PHOTOS = 24
# Photos are decoded once per process at this short side (the wallpapers are up to 5120 wide):
# a 224 crop of at least 0.35 of the area still has more pixels than it needs.
DECODE_SHORT_SIDE_PX = 448
# Plasma ships a wallpaper at one or many sizes: the widest landscape one up to this width is read
# (else the narrowest landscape one).
PLASMA_MAX_WIDTH_PX = 2560
INSTALL_HINT = ("run `make photo-data` (as root: apt-get install -y " + " ".join(PACKAGES) + "), "
                "or pass a folder of your own images (--calib DIR)")


def _plasma_file(name: str, root: str) -> Optional[str]:
    folder = os.path.join(root, name, "contents", "images")
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    sizes = []
    for n in names:
        stem, _, ext = n.rpartition(".")
        width, _, height = stem.partition("x")
        if ext.lower() in ("jpg", "jpeg", "png") and width.isdigit() and height.isdigit():
            w, h = int(width), int(height)
            if h <= w:
                sizes.append((w, n))
    if not sizes:
        return None
    within = [s for s in sizes if s[0] <= PLASMA_MAX_WIDTH_PX]
    return os.path.join(folder, max(within)[1] if within else min(sizes)[1])


def photo_files() -> List[str]:
    """The photo files installed here, in a fixed order (empty when neither package is)."""
    files = []
    if os.path.isdir(MATE_NATURE):
        files += sorted(os.path.join(MATE_NATURE, n) for n in os.listdir(MATE_NATURE) if n.lower().endswith(".jpg"))
    files += [f for f in (_plasma_file(n, PLASMA_WALLPAPERS) for n in PLASMA_PHOTOS) if f is not None]
    return files


def photos_missing(files: Optional[List[str]] = None) -> Optional[str]:
    """Why the training photos (`files`, default photo_files()) cannot be used here, or None."""
    found = len(photo_files() if files is None else files)
    if found >= MIN_PHOTOS:
        return None
    return (f"the unlabelled training photos are not installed ({found} of the {MIN_PHOTOS} "
            f"expected from {', '.join(PACKAGES)}): {INSTALL_HINT}")


def _decode(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (DECODE_SHORT_SIDE_PX * 2, DECODE_SHORT_SIDE_PX * 2))   # JPEG: decode at a fraction
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"unreadable photo {path}: {exc}") from None
    scale = DECODE_SHORT_SIDE_PX / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return image


@functools.lru_cache(maxsize=1)
def training_photos() -> Tuple[object, ...]:
    """The photos as PIL images (decoded once per process and only read afterwards)."""
    files = photo_files()
    missing = photos_missing(files)
    if missing is not None:
        raise DataError(missing)
    return tuple(_decode(f) for f in files)


def describe() -> str:
    return f"{len(photo_files())} photos of the Debian packages {' and '.join(PACKAGES)} (random crops and flips)"
