"""A user's own CNN (`--model package.module:factory`) and the graph the plan carries for it.

The models are defined here, in the test file, and named by this module's import path, as a
user's would be. What the boards get is architecture.py's JSON: these tests check that it
rebuilds the same function, that it is refused where it could reach beyond torch, and that a
plan of a user model is simulated without the user's module.
"""
import copy
import json
import sys

import pytest
import torch
import torch.fx
from torch import nn
import torch.nn.functional as F

from robustdice.partitioner.core.partition import PartitionRequest, partition
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.core.runtime import Cluster, weights_digest
from robustdice.partitioner.errors import ModelError, PartitionerError, PlanError
from robustdice.partitioner.experiments.evaluate import verify_plan
from robustdice.partitioner.zoo import architecture, usermodel
from robustdice.partitioner.zoo.inputs import InputSpec
from robustdice.partitioner.zoo.models import build_model, input_spec

MODULE = __name__
SHAPE = (3, 12, 12)


class Scale(nn.Module):
    """A user's layer with its own parameter: tracing inlines it into a get_attr and a mul."""

    def __init__(self, channels):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(1, channels, 1, 1))

    def forward(self, x):
        return x * self.gain


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.scale = Scale(channels)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return x + self.scale(self.depthwise(h))


class OwnNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(Residual(8), Residual(8))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(8 * 2 * 2, classes)

    def forward(self, x):
        x = self.pool(self.body(self.stem(x)))
        return self.head(x.flatten(1))


def own_net():
    return OwnNet()


own_net.robustdice_input = {"shape": list(SHAPE), "mean": 0.5, "resize": "crop"}


def undeclared_net():
    return OwnNet()


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.blocks = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x):
        return self.blocks(self.conv(x))


def gated_net():
    return GatedNet()


@torch.fx.wrap
def user_helper(x):
    return x * 2


class WrappedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return user_helper(self.conv(x))


def not_a_module():
    return 42


def trained_weights(path, seed=7):
    """A state_dict file of OwnNet with non-trivial BatchNorm statistics (as after training)."""
    torch.manual_seed(seed)
    model = OwnNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return model.eval()


def roundtrip(gm):
    data = json.loads(json.dumps(architecture.encode(gm)))
    rebuilt = architecture.build(data)
    rebuilt.load_state_dict(gm.state_dict(), strict=True)
    return data, rebuilt


# --- the stored graph ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["own", "digits_cnn", "convnext_tiny"])
def test_the_stored_graph_rebuilds_the_same_function(name):
    """convnext_tiny: layer-scale parameters (get_attr), permutes, LayerNorm, torchvision's
    stochastic_depth; the user model: its own layers inlined, grouped convs, residual adds."""
    model = OwnNet().eval() if name == "own" else build_model(name, "none", seed=1)
    shape = SHAPE if name == "own" else input_spec(name).shape
    gm = architecture.trace(model, name)
    data, rebuilt = roundtrip(gm)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), model(x))
    assert architecture.encode(rebuilt) == data  # stable: the plan hash of the same model is the same
    with torch.device("meta"):  # what a board's engine does: nothing materialised
        meta = architecture.build(data)
    assert all(p.is_meta for p in meta.parameters())


def test_arguments_equal_to_the_default_are_left_out_for_older_torch():
    data = architecture.encode(architecture.trace(OwnNet(), "own"))
    assert data["modules"]["stem.0"] == {"class": "Conv2d", "args": {
        "in_channels": 3, "out_channels": 8, "kernel_size": {"tuple": [3, 3]}, "stride": {"tuple": [2, 2]},
        "padding": {"tuple": [1, 1]}, "dilation": {"tuple": [1, 1]}}}
    assert data["tensors"]["body.0.scale.gain"] == {"kind": "parameter", "shape": [1, 8, 1, 1], "dtype": "float32"}


def test_tracing_failure_names_the_layer_and_the_operation():
    with pytest.raises(ModelError) as err:
        architecture.trace(GatedNet(), f"model {MODULE}:gated_net")
    message = str(err.value)
    assert "\n" not in message
    assert f"model {MODULE}:gated_net" in message
    assert "layer 'blocks.1' (Gate)" in message
    assert "control flow" in message
    assert "if x.mean() > 0:" in message and "test_user_model.py:" in message


def test_a_function_hidden_from_tracing_is_refused_naming_the_layer():
    with pytest.raises(ModelError, match=r"node 'user_helper'.*user_helper, which is not a torch function"):
        architecture.encode(architecture.trace(WrappedNet(), "wrapped"))


def _stored(**node):
    data = architecture.encode(architecture.trace(OwnNet(), "own"))
    data = copy.deepcopy(data)
    data["nodes"].insert(-1, dict({"name": "evil"}, **node))
    return data


@pytest.mark.parametrize("node,message", [
    ({"op": "call_function", "target": "torch.load", "args": ["/etc/passwd"]}, "'torch.load' is not a torch function"),
    ({"op": "call_function", "target": "builtins.eval", "args": ["1"]}, "'builtins.eval' is not a torch function"),
    ({"op": "call_function", "target": "os.system", "args": ["true"]}, "'os.system' is not a torch function"),
    ({"op": "call_function", "target": "builtins.getattr", "args": [{"node": "x"}, "__class__"]},
     "getattr of .*__class__.* is not a tensor attribute"),
    ({"op": "call_method", "target": "numpy", "args": [{"node": "x"}]}, "'numpy' is not a tensor method"),
    ({"op": "call_module", "target": "nowhere", "args": [{"node": "x"}]}, "'nowhere' is not in the architecture"),
    ({"op": "call_function", "target": "torch.flatten", "args": [{"node": "later"}]}, "is not a value"),
])
def test_a_crafted_graph_cannot_reach_beyond_torch(node, message):
    with pytest.raises(PlanError, match=message) as err:
        architecture.build(_stored(**node))
    assert "plan field architecture.nodes[" in str(err.value)


@pytest.mark.parametrize("module,message", [
    ({"class": "DataParallel", "args": {}}, "'DataParallel' is not a torch.nn layer"),
    ({"class": "Conv2d", "args": {"in_channels": 3}}, "cannot build Conv2d"),
    ({"class": "Conv2d", "args": {"in_channels": 3, "out_channels": 4, "kernel_size": {"exec": "x"}}},
     "is not a value"),
])
def test_a_crafted_module_is_refused_naming_the_field(module, message):
    data = architecture.encode(architecture.trace(OwnNet(), "own"))
    data["modules"]["stem.0"] = module
    with pytest.raises(PlanError, match=message) as err:
        architecture.build(data)
    assert "plan field architecture.modules.stem.0" in str(err.value)


# --- the user's model through the partitioner ---------------------------------------------------

def test_import_path_errors_name_the_model():
    with pytest.raises(ModelError, match="cannot import no_such_package_x"):
        build_model("no_such_package_x.mod:build")
    with pytest.raises(ModelError, match=f"{MODULE} has no attribute 'missing'"):
        build_model(f"{MODULE}:missing")
    with pytest.raises(ModelError, match="returned a int, not an nn.Module"):
        build_model(f"{MODULE}:not_a_module")
    with pytest.raises(ModelError, match="is not package.module:factory"):
        build_model("a b:c")
    with pytest.raises(ModelError, match=f"cannot trace model {MODULE}:gated_net: layer 'blocks.1' \\(Gate\\)"):
        build_model(f"{MODULE}:gated_net")


def test_input_spec_command_line_then_factory_then_defaults():
    assert input_spec(f"{MODULE}:own_net") == InputSpec(SHAPE, (0.5,) * 3, (1.0,) * 3, "crop")
    assert usermodel.input_spec(f"{MODULE}:own_net", (1, 8, 8), "std=0.25") == \
        InputSpec((1, 8, 8), (0.5,), (0.25,), "crop")
    assert usermodel.input_spec(f"{MODULE}:undeclared_net", (3, 4, 4)) == \
        InputSpec((3, 4, 4), (0.0,) * 3, (1.0,) * 3, "stretch")
    assert usermodel.input_spec(f"{MODULE}:undeclared_net", (3, 4, 4), "imagenet").mean == (0.485, 0.456, 0.406)
    assert usermodel.parse_preprocess("mean=0.1/0.2/0.3,resize=stretch") == {"mean": (0.1, 0.2, 0.3), "resize": "stretch"}
    with pytest.raises(PartitionerError, match=f"--input-shape is needed for --model {MODULE}:undeclared_net"):
        usermodel.input_spec(f"{MODULE}:undeclared_net")
    with pytest.raises(PartitionerError, match="'size=3' is not mean="):
        usermodel.parse_preprocess("size=3")
    with pytest.raises(PartitionerError, match="mean='a/b' is not numbers"):
        usermodel.parse_preprocess("mean=a/b")
    with pytest.raises(PartitionerError, match="std: .* is not 3 > 0 number"):
        usermodel.input_spec(f"{MODULE}:undeclared_net", (3, 4, 4), "std=1/2")
    with pytest.raises(PartitionerError, match="--input-shape '3,x,4' is not C,H,W"):
        usermodel.parse_shape("3,x,4")


def test_options_for_a_user_model_are_refused_for_a_built_in(tmp_path):
    with pytest.raises(PartitionerError, match="--input-shape is for your own --model .*digits_cnn has its own"):
        partition(PartitionRequest("digits_cnn", 2, "lop", tmp_path, input_shape=(1, 8, 8), show_progress=False))


@pytest.fixture(scope="module")
def own_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    model = trained_weights(root / "weights.pt")
    out = root / "plan"
    partition(PartitionRequest(f"{MODULE}:own_net", 2, "robust", out, weights=str(root / "weights.pt"),
                               preprocess="mean=0.5,std=0.25", calib_size=4, show_progress=False))
    return out, model


@pytest.mark.needs_photos   # own_plan calibrates s2 and s3 on them
def test_the_plan_records_the_model_its_weights_and_its_input(own_plan):
    out, model = own_plan
    plan = load_plan(out)
    assert plan.model == f"{MODULE}:own_net"
    assert plan.weights.endswith("weights.pt")
    assert plan.weights_digest == weights_digest(model)  # the file's weights, not the factory's init
    assert plan.input == InputSpec(SHAPE, (0.5,) * 3, (0.25,) * 3, "crop")
    assert plan.architecture == architecture.encode(architecture.trace(model, "own"))
    # Each depthwise conv runs in the stage of the conv before it (stages.py: no gather between).
    assert [s.name for s in plan.stages] == ["stem.0", "body.0.conv", "body.1.conv", "head"]
    assert plan.stages[1].followers == ("body.0.bn", "relu", "body.0.depthwise")
    assert verify_plan(out)["allclose"]


@pytest.mark.needs_photos   # own_plan calibrates s2 and s3 on them
def test_a_plan_of_a_user_model_runs_without_the_users_module(own_plan, monkeypatch):
    out, model = own_plan
    monkeypatch.setitem(sys.modules, MODULE, None)  # `import test_user_model` now fails
    with pytest.raises(ModelError, match=f"cannot import {MODULE}"):
        verify_plan(out)  # the plain model needs the user's code; the plan does not
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    cluster = Cluster(out)
    with torch.inference_mode():
        reference = model(x)
        assert torch.allclose(cluster.simulate(x), reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(cluster.simulate(x, failed=[1]), reference)  # device 1's neurons matter
