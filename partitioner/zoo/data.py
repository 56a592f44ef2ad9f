"""Images in, tensors out: preprocessing, image folders, calibration batches, evaluation splits.

How an image becomes a model's input is the model's own `InputSpec` (partitioner/zoo/inputs.py,
recorded in every plan): its (C, H, W), its resize rule and its per-channel mean and std. The
224x224 ImageNet models take RGB photos resized to 256 on the short side and centre-cropped;
torchvision's use ImageNet's mean and std, efficientnet_lite0's TensorFlow weights 0.5 and 0.5;
digits_cnn takes 8x8 grayscale in [0, 1]; fashion_vgg 28x28 grayscale normalised by
Fashion-MNIST's mean and std. Without a folder, calibration uses digits' train split,
Fashion-MNIST's train split, or for the 224x224 models and users' own the photo wallpapers of
two Debian packages (zoo/photos.py). scikit-image's bundled photographs are the
224x224 models' evaluation set, and only that: nothing is calibrated or trained on them.
"""

import functools
import os

import numpy as np
import torch

from robustdice.partitioner.errors import DataError, PartitionerError
from robustdice.partitioner.zoo.compat import import_torchvision
from robustdice.partitioner.zoo.digits import digits_split
from robustdice.partitioner.zoo.inputs import InputSpec
from robustdice.partitioner.zoo.models import input_spec as model_input_spec

# torchvision's reference evaluation: resize to 256, crop 224; kept as a ratio for other sizes.
RESIZE_RATIO = 256 / 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
# scikit-image photographs bundled in its wheel (no network fetch); grayscale ones become RGB.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins",
                  "immunohistochemistry", "hubble_deep_field", "clock", "moon")
# Random crops keep at least this share of the photo, so the object usually stays in view.
CALIB_CROP_SCALE = (0.35, 1.0)


def _transforms():
    return import_torchvision().transforms


def _to_tensor(image, spec: InputSpec):
    """Colour mode, [0, 1] scaling and the spec's normalisation of an already sized image."""
    T = _transforms()
    tensor = T.ToTensor()(image.convert("L" if spec.channels == 1 else "RGB"))
    return T.Normalize(spec.mean, spec.std)(tensor)


def preprocess(image, spec: InputSpec):
    """A PIL image as the (C, H, W) float tensor that the model of `spec` takes."""
    T = _transforms()
    _, height, width = spec.shape
    if spec.resize == "stretch":
        sized = T.Resize((height, width))(image)
    else:
        sized = T.CenterCrop((height, width))(T.Resize(round(min(height, width) * RESIZE_RATIO))(image))
    return _to_tensor(sized, spec)


def _augment(image, spec: InputSpec):
    """A random crop and flip of `image`, drawn from torch's global RNG (seeded by the caller)."""
    T = _transforms()
    _, height, width = spec.shape
    image = T.RandomResizedCrop((height, width), scale=CALIB_CROP_SCALE)(image)
    return _to_tensor(T.RandomHorizontalFlip()(image), spec)


def _open(path, folder):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"unreadable image {path} in {folder}: {exc}") from None


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(folder):
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if _is_image(n) and os.path.isfile(os.path.join(folder, n)))


def _check_folder(path):
    if not os.path.isdir(path):
        raise DataError(f"data folder not found: {path}")


def _image_folder_samples(path):
    """(file, class index) pairs of an ImageFolder layout: sorted class folders, sorted files."""
    _check_folder(path)
    classes = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    samples = [(f, label) for label, c in enumerate(classes)
               for f in _image_files(os.path.join(path, c))]
    return classes, samples


def load_image_folder(path, spec: InputSpec, limit=None):
    """Load an ImageFolder (one sub-folder per class, classes sorted by name).

    Returns (images (n, C, H, W) float32, labels (n,) int64). `limit` keeps at most that many
    images, taken evenly across the sorted list so that a small limit still spans the classes.
    """
    classes, samples = _image_folder_samples(path)
    if not classes:
        raise DataError(f"no class sub-folders in {path} (expected an ImageFolder layout)")
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {path}")
    if limit is not None and limit < len(samples):
        if limit <= 0:
            raise DataError(f"limit must be positive, got {limit}")
        keep = np.linspace(0, len(samples) - 1, num=limit).round().astype(int)
        samples = [samples[i] for i in keep]
    images = torch.stack([preprocess(_open(f, path), spec) for f, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels


def _calibration_files(calib_dir):
    """Every image of calib_dir: an ImageFolder's, or those lying directly in a flat folder."""
    _check_folder(calib_dir)
    _, samples = _image_folder_samples(calib_dir)
    files = _image_files(calib_dir) + [f for f, _ in samples]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in calibration folder {calib_dir}")
    return files


@functools.lru_cache(maxsize=1)
def _skimage_photos():
    # Decoded once per process: the PIL images are only read, never changed in place.
    from PIL import Image
    import skimage.data

    return tuple(Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
                 for name in SKIMAGE_PHOTOS)


def _batch_from_images(images, spec: InputSpec, n, seed):
    """n tensors from `images`: each once as-is, then seeded random crops and flips to fill n."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.randperm(len(images)).tolist()
        out = []
        for i in range(n):
            image = images[order[i % len(images)]]
            out.append(preprocess(image, spec) if i < len(images) else _augment(image, spec))
    return torch.stack(out)


def calibration_batch(model_name, calib_dir=None, n=16, seed=0, spec=None):
    """A (n, C, H, W) batch for scoring neurons; the same for the same arguments.

    From calib_dir (an ImageFolder or a flat folder of images) if given; otherwise digits'
    train split for digits_cnn, Fashion-MNIST's train split for fashion_vgg, and the Debian
    packages' photos for the 224x224 models (zoo/photos.py; a DataError naming
    `make photo-data` where they are not installed).
    `spec` defaults to the named model's own input specification.
    """
    spec = spec or model_input_spec(model_name)
    if n <= 0:
        raise DataError(f"calibration batch size must be positive, got {n}")
    if calib_dir is not None:
        files = _calibration_files(calib_dir)
        if len(files) > n:
            # Read only the images that will be used.
            generator = torch.Generator().manual_seed(seed)
            files = [files[i] for i in sorted(torch.randperm(len(files), generator=generator)[:n])]
        images = [_open(f, calib_dir) for f in files]
        return _batch_from_images(images, spec, n, seed)
    if model_name == "fashion_vgg":
        from robustdice.partitioner.zoo.fashion import fashion_split
        train_images = fashion_split().train_images
        generator = torch.Generator().manual_seed(seed)
        return train_images[torch.randperm(len(train_images), generator=generator)[:n]].clone()
    if model_name == "digits_cnn":
        train_images = digits_split().train_images
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_images), generator=generator)[:n]
        if len(pick) < n:
            raise DataError(f"digits train split has only {len(train_images)} images, asked {n}")
        return train_images[pick].clone()
    from robustdice.partitioner.zoo.photos import training_photos
    return _batch_from_images(training_photos(), spec, n, seed)


def photo_crops(spec: InputSpec, n, seed):
    """n random crops and flips of the unlabelled training photos (zoo/photos.py), seeded:
    what distillation trains the 224x224 models on."""
    from robustdice.partitioner.zoo.photos import training_photos
    photos = training_photos()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        picks = torch.randint(len(photos), (n,)).tolist()
        return torch.stack([_augment(photos[i], spec) for i in picks])


def evaluation_split(model_name, data_dir=None, limit=None, spec=None):
    """(images, labels, indices) on which accuracy is measured.

    With data_dir: that ImageFolder (see load_image_folder), indices 0..n-1. Without:
    digits_cnn's fixed test split, indices being rows of load_digits(); other models have no
    bundled labelled data, so data_dir is required and its absence is a DataError.
    """
    if data_dir is not None:
        images, labels = load_image_folder(data_dir, spec or model_input_spec(model_name), limit=limit)
        return images, labels, torch.arange(len(labels), dtype=torch.int64)
    if model_name == "fashion_vgg":  # Fashion-MNIST's own 10k test images
        from robustdice.partitioner.zoo.fashion import fashion_split
        split = fashion_split()
        images, labels = split.test_images, split.test_labels
        indices = torch.arange(len(labels), dtype=torch.int64)
        if limit is not None:
            images, labels, indices = images[:limit], labels[:limit], indices[:limit]
        return images, labels, indices
    if model_name != "digits_cnn":
        raise DataError(f"{model_name} needs an evaluation ImageFolder (--data DIR): no labelled "
                        "ImageNet-style data ships with the package")
    split = digits_split()
    images, labels, indices = split.test_images, split.test_labels, split.test_indices
    if limit is not None:
        images, labels, indices = images[:limit], labels[:limit], indices[:limit]
    return images, labels, indices


# The models whose labelled training data can be here (digits ships with scikit-learn,
# Fashion-MNIST with `make fashion-data`): `finetune` trains them on labels, others by distillation.
LABELLED_MODELS = ("digits_cnn", "fashion_vgg")


def training_data(model: str):
    """(train images, train labels, test images, test labels) of a model that has them here
    (what `robustdice finetune` and `--method rocoin` train on)."""
    if model == "digits_cnn":
        s = digits_split()
        return s.train_images, s.train_labels, s.test_images, s.test_labels
    if model == "fashion_vgg":
        from robustdice.partitioner.zoo.fashion import fashion_split
        s = fashion_split()
        return s.train_images, s.train_labels, s.test_images, s.test_labels
    raise PartitionerError(f"{model} has no labelled training data here (only "
                           f"{' and '.join(LABELLED_MODELS)} have)")


# The default unlabelled evaluation set of the 224x224 models: each scikit-image photo as it is,
# then seeded random crops and flips of them (140 images in all). Their calibration and
# distillation images come from other photos (zoo/photos.py), so nothing is tuned on these.
PHOTO_EVAL_IMAGES = 140
PHOTO_EVAL_SEED = 1000


def evaluation_set(model_name, data_dir=None, limit=None, spec=None):
    """(images, labels or None, indices, description) on which a plan is evaluated.

    Like evaluation_split, and also unlabelled images: a flat folder of images (no class
    sub-folders), or, for the 224x224 models without --data, scikit-image's photos and crops.
    With no labels, evaluation measures agreement with the plan's own no-failure top-1.
    """
    spec = spec or model_input_spec(model_name)
    if data_dir is not None:
        classes, _ = _image_folder_samples(data_dir)
        if not classes:
            files = _image_files(data_dir)
            if not files:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no class folders in {data_dir}")
            if limit is not None and limit < len(files):
                keep = np.linspace(0, len(files) - 1, num=limit).round().astype(int)
                files = [files[i] for i in keep]
            images = torch.stack([preprocess(_open(f, data_dir), spec) for f in files])
            return images, None, torch.arange(len(files), dtype=torch.int64), f"{len(files)} unlabelled images in {data_dir}"
        images, labels, indices = evaluation_split(model_name, data_dir, limit, spec)
        return images, labels, indices, f"{len(labels)} labelled images in {data_dir}"
    if model_name in ("digits_cnn", "fashion_vgg"):
        images, labels, indices = evaluation_split(model_name, None, limit, spec)
        return images, labels, indices, f"{len(labels)} test images of {model_name}'s evaluation split"
    n = PHOTO_EVAL_IMAGES if limit is None else min(limit, PHOTO_EVAL_IMAGES)
    images = _batch_from_images(_skimage_photos(), spec, n, PHOTO_EVAL_SEED)
    return images, None, torch.arange(n, dtype=torch.int64), f"{n} scikit-image photos and crops (unlabelled)"
