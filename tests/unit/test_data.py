"""Data loading: the fixed digits split, image folders, calibration batches, evaluation splits."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from robustdice.partitioner.zoo.data import (calibration_batch, evaluation_set, evaluation_split, load_image_folder,
                                              photo_crops, preprocess)
from robustdice.partitioner.zoo.photos import MIN_PHOTOS, photo_files, training_photos
from robustdice.partitioner.zoo.digits import digits_split
from robustdice.partitioner.zoo.inputs import InputSpec, imagenet
from robustdice.partitioner.zoo.models import input_spec

IMAGENET = imagenet()
GRAY8 = input_spec("digits_cnn")
from robustdice.partitioner.errors import DataError, PartitionerError


def _write_image(path, value, size=(40, 30)):
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    # Created out of order on purpose: classes must come back sorted by name.
    for label, cls in [(1, "zebra"), (0, "ant")]:
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _write_image(root / cls / f"{i}.png", 40 * label + 10 * i)
    (root / "ant" / "notes.txt").write_text("not an image; ignored")
    return root


def test_digits_split_is_fixed_stratified_and_20_percent():
    digits = load_digits()
    a, b = digits_split(), digits_split()
    assert torch.equal(a.test_indices, b.test_indices)
    n = len(digits.target)
    # train_test_split rounds the test share up: ceil(0.2 * 1797) = 360.
    assert len(a.test_labels) == int(np.ceil(0.2 * n)) == 360
    assert len(a.test_labels) + len(a.train_labels) == n
    # Each class keeps its share of the whole set, to within one image.
    whole = np.bincount(digits.target, minlength=10) / n
    test_counts = np.bincount(a.test_labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - whole * len(a.test_labels)) <= 1)
    # The indices really point at the test images and labels in load_digits().
    idx = a.test_indices.numpy()
    assert np.array_equal(digits.target[idx], a.test_labels.numpy())
    assert np.allclose(digits.images[idx] / 16.0, a.test_images[:, 0].numpy())
    assert a.test_images.dtype == torch.float32 and a.test_images.shape[1:] == (1, 8, 8)
    assert 0.0 <= a.test_images.min() and a.test_images.max() <= 1.0


def test_digits_split_returns_fresh_tensors():
    a = digits_split()
    a.test_images.zero_()
    assert digits_split().test_images.sum() > 0


def test_evaluation_split_for_digits_is_the_test_split():
    images, labels, indices = evaluation_split("digits_cnn")
    split = digits_split()
    assert torch.equal(images, split.test_images)
    assert torch.equal(labels, split.test_labels)
    assert torch.equal(indices, split.test_indices)


def test_evaluation_split_needs_a_folder_for_imagenet_models():
    with pytest.raises(DataError, match="--data"):
        evaluation_split("alexnet")


def test_evaluation_split_from_a_folder(image_folder):
    images, labels, indices = evaluation_split("alexnet", data_dir=str(image_folder))
    assert images.shape == (6, 3, 224, 224)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert indices.tolist() == list(range(6))


def test_load_image_folder_sorted_classes_and_shapes(image_folder):
    images, labels = load_image_folder(str(image_folder), IMAGENET)
    assert images.shape == (6, 3, 224, 224) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    # "ant"/0.png is black: after ImageNet normalisation each channel sits at -mean/std.
    assert torch.allclose(images[0, 0], torch.full((224, 224), -0.485 / 0.229), atol=1e-5)
    gray, _ = load_image_folder(str(image_folder), GRAY8)
    assert gray.shape == (6, 1, 8, 8) and 0.0 <= gray.min() and gray.max() <= 1.0


def test_load_image_folder_limit_spans_classes(image_folder):
    _, labels = load_image_folder(str(image_folder), GRAY8, limit=2)
    assert labels.tolist() == [0, 1]


def test_load_image_folder_errors_name_the_folder(tmp_path, image_folder):
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=str(missing)):
        load_image_folder(str(missing), IMAGENET)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        load_image_folder(str(empty), IMAGENET)
    (empty / "cls").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(str(empty), IMAGENET)
    (image_folder / "ant" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="broken.jpg") as err:
        load_image_folder(str(image_folder), IMAGENET)
    assert isinstance(err.value, PartitionerError)


def test_calibration_batch_digits_deterministic():
    a = calibration_batch("digits_cnn", n=16, seed=0)
    assert a.shape == (16, 1, 8, 8)
    assert torch.equal(a, calibration_batch("digits_cnn", n=16, seed=0))
    assert not torch.equal(a, calibration_batch("digits_cnn", n=16, seed=1))
    # Drawn from the train split, never the evaluation split.
    train = digits_split().train_images.flatten(1)
    assert all((train == row).all(dim=1).any() for row in a.flatten(1))


@pytest.mark.needs_photos
def test_calibration_batch_photos_deterministic_and_varied():
    a = calibration_batch("efficientnet_lite0", n=12, seed=0)
    assert a.shape == (12, 3, 224, 224)
    assert torch.equal(a, calibration_batch("efficientnet_lite0", n=12, seed=0))
    assert not torch.equal(a, calibration_batch("efficientnet_lite0", n=12, seed=1))
    # More images than photos: the extra ones are crops/flips, not copies.
    flat = a.flatten(1)
    assert len({tuple(row[:64].tolist()) for row in flat}) == 12
    # Seeding is local: the caller's global RNG stream is left alone.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibration_batch("alexnet", n=2, seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.needs_photos
def test_224_models_calibrate_and_distil_on_photos_that_are_not_their_evaluation_set():
    """scikit-image's photos are the evaluation set: no calibration or training image is one
    of them, nor a crop of one (a crop's pixels would correlate with its photo's)."""
    spec = input_spec("efficientnet_lite0")
    calib = calibration_batch("efficientnet_lite0", n=32, seed=0)
    crops = photo_crops(spec, 32, seed=7)
    assert crops.shape == (32, 3, 224, 224) and torch.equal(crops, photo_crops(spec, 32, seed=7))
    assert not torch.equal(crops, photo_crops(spec, 32, seed=8))
    evaluation, labels, _, described = evaluation_set("efficientnet_lite0")
    assert labels is None and "scikit-image" in described
    files = photo_files()
    assert len(files) >= MIN_PHOTOS and all(f.startswith(("/usr/share/backgrounds/", "/usr/share/wallpapers/"))
                                             for f in files)

    def thumbs(batch):   # 8x8 colour thumbnails, normalised: near-copies and crops of one photo match
        t = torch.nn.functional.adaptive_avg_pool2d(batch, 8).flatten(1)
        return torch.nn.functional.normalize(t - t.mean(1, keepdim=True), dim=1)
    source = thumbs(torch.stack([preprocess(p, spec) for p in training_photos()]))
    assert (thumbs(evaluation) @ source.T).max() < 0.9
    same = thumbs(calib[:len(source)]) @ source.T   # the first of a batch are the photos themselves
    assert same.max(1).values.min() > 0.99


def test_without_the_photos_calibrating_a_224_model_names_make_photo_data(monkeypatch, tmp_path):
    import robustdice.partitioner.zoo.photos as photos
    monkeypatch.setattr(photos, "MATE_NATURE", str(tmp_path / "none"))
    monkeypatch.setattr(photos, "PLASMA_WALLPAPERS", str(tmp_path / "none"))
    photos.training_photos.cache_clear()
    try:
        with pytest.raises(DataError, match="make photo-data"):
            calibration_batch("alexnet", n=2)
        # Models with their own training data do not need them.
        assert calibration_batch("digits_cnn", n=2).shape == (2, 1, 8, 8)
    finally:
        photos.training_photos.cache_clear()


def test_calibration_batch_from_folders(tmp_path, image_folder):
    from_tree = calibration_batch("alexnet", calib_dir=str(image_folder), n=4, seed=0)
    assert from_tree.shape == (4, 3, 224, 224)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        _write_image(flat / f"{i}.jpg", 100 + 50 * i)
    # Fewer files than n: random crops and flips fill the batch, reproducibly.
    a = calibration_batch("digits_cnn", calib_dir=str(flat), n=5, seed=0)
    assert a.shape == (5, 1, 8, 8)
    assert torch.equal(a, calibration_batch("digits_cnn", calib_dir=str(flat), n=5, seed=0))


def test_calibration_batch_missing_or_empty_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        calibration_batch("alexnet", calib_dir=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        calibration_batch("alexnet", calib_dir=str(empty))


def test_preprocess_matches_imagenet_reference():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    out = preprocess(image, IMAGENET)
    assert out.shape == (3, 224, 224)
    # Reference: shorter side to 256 (300x400 -> 256x341), then the central 224x224.
    resized = np.asarray(image.resize((341, 256), Image.BILINEAR), dtype=np.float32) / 255
    top, left = (256 - 224) // 2, (341 - 224) // 2
    crop = resized[top:top + 224, left:left + 224, 0]
    torch.testing.assert_close(out[0], torch.from_numpy((crop - 0.485) / 0.229), atol=0.03, rtol=0)


def test_each_model_carries_its_own_normalisation():
    """efficientnet_lite0's TensorFlow weights expect [-1, 1]; torchvision's, ImageNet's mean/std."""
    white = Image.new("RGB", (300, 300), (255, 255, 255))
    lite = preprocess(white, input_spec("efficientnet_lite0"))
    torch.testing.assert_close(lite, torch.ones(3, 224, 224))
    alex = preprocess(white, input_spec("alexnet"))
    torch.testing.assert_close(alex[0], torch.full((224, 224), (1 - 0.485) / 0.229))
    assert input_spec("digits_cnn") == InputSpec((1, 8, 8), (0.0,), (1.0,), "stretch")


@pytest.mark.parametrize("field,value,message", [
    ("shape", [3, 224], "input.shape"),
    ("shape", [2, 8, 8], "1 \\(grayscale\\) or 3"),
    ("mean", [0.5], "input.mean"),
    ("std", [0.5, 0.0, 0.5], "input.std"),
    ("resize", "zoom", "input.resize"),
])
def test_input_spec_errors_name_the_field(field, value, message):
    good = imagenet().to_json()
    with pytest.raises(PartitionerError, match=message):
        InputSpec.from_json(dict(good, **{field: value}))
    assert InputSpec.from_json(good) == imagenet()
