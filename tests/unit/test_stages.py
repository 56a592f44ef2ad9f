"""Stages: every supported class slices and reassembles exactly; unsupported layers are named."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustdice.partitioner.core.cluster import cdc_layout
from robustdice.partitioner.core.stages import (FOLLOWER_FUNCTIONS, FOLLOWER_METHODS, FOLLOWER_MODULES, STAGE_MODULES,
                                                apply_followers, compute_linear, full_stage_output, parity_params,
                                                slice_params, trace_stages)
from robustdice.partitioner.errors import ModelError

# One factory per follower class; a test checks this table covers FOLLOWER_MODULES exactly.
FOLLOWER_FACTORIES = {
    nn.BatchNorm2d: lambda c: nn.BatchNorm2d(c),
    nn.BatchNorm1d: lambda c: nn.BatchNorm1d(c),
    nn.ReLU: lambda c: nn.ReLU(),
    nn.ReLU6: lambda c: nn.ReLU6(),
    nn.GELU: lambda c: nn.GELU(),
    nn.SiLU: lambda c: nn.SiLU(),
    nn.Hardswish: lambda c: nn.Hardswish(),
    nn.LeakyReLU: lambda c: nn.LeakyReLU(0.2),
    nn.Sigmoid: lambda c: nn.Sigmoid(),
    nn.Tanh: lambda c: nn.Tanh(),
    nn.Dropout: lambda c: nn.Dropout(0.5),
    nn.Dropout2d: lambda c: nn.Dropout2d(0.5),
    nn.Identity: lambda c: nn.Identity(),
    nn.MaxPool2d: lambda c: nn.MaxPool2d(2),
    nn.AvgPool2d: lambda c: nn.AvgPool2d(2),
    nn.AdaptiveAvgPool2d: lambda c: nn.AdaptiveAvgPool2d(3),
    nn.AdaptiveMaxPool2d: lambda c: nn.AdaptiveMaxPool2d(2),
}

STAGE_FACTORIES = {
    nn.Conv2d: lambda: nn.Conv2d(4, 6, 3, padding=1),
    nn.Linear: lambda: nn.Linear(12, 6),
}


def _randomise_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model.eval()


class Chain(nn.Module):
    """layer → follower → flatten → Linear head (itself a second stage). The follower is a module,
    or a function that fx traces through (a call of a torch function or a tensor method)."""

    def __init__(self, layer, follower, sample):
        super().__init__()
        self.layer = layer
        self.follower = follower
        self.flat = nn.Flatten()
        self.eval()
        with torch.no_grad():
            width = self.flat(self.follower(self.layer(sample))).shape[1]
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.flat(self.follower(self.layer(x))))


class ChannelsLast(nn.Module):
    """ConvNeXt-like: depthwise conv, permute, LayerNorm, Linear-GELU-Linear on channels-last."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pw1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class GroupedNoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 6, 3, stride=2, dilation=2, padding=2, groups=3)

    def forward(self, x):
        x = F.relu(self.bn(self.a(x)))
        return self.b(x).relu().flatten(1)


def _split(n, seed):
    """Three devices with overlaps in shuffled order, plus one device holding nothing."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[0::3], perm[1::3] + perm[:1], perm[2::3], []]


def _sliced_run(staged, x, seed=0):
    """Run the model with every stage computed per device from slices, then reassembled."""
    def stage_fn(i, t):
        stage = staged.stages[i]
        pieces = []
        for ids in _split(stage.n_neurons, seed + i):
            params = slice_params(stage, ids)
            y = apply_followers(stage, params, compute_linear(stage, params, t))
            assert y.shape[stage.channel_dim] == len(ids)
            pieces.append((ids, y))
        template = pieces[0][1]
        shape = list(template.shape)
        shape[stage.channel_dim] = stage.n_neurons
        full = template.new_full(shape, float("nan"))
        for ids, y in pieces:
            if ids:
                full.index_copy_(stage.channel_dim % y.dim(), torch.as_tensor(ids), y)
        assert not full.isnan().any()
        return full
    with torch.no_grad():
        return staged.run(x, stage_fn)


def _check_sliced_equals_plain(model, x):
    torch.manual_seed(0)
    _randomise_batchnorm(model)
    staged = trace_stages(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(staged.run_full(x), expected)
    torch.testing.assert_close(_sliced_run(staged, x), expected, rtol=1e-5, atol=1e-5)
    return staged


def test_factory_tables_cover_every_supported_class():
    assert set(FOLLOWER_FACTORIES) == set(FOLLOWER_MODULES)
    assert set(STAGE_FACTORIES) == set(STAGE_MODULES)


FOLLOWER_CASES = [(stage_cls, cls) for cls, (_, kinds) in FOLLOWER_MODULES.items()
                  for stage_cls, kind in STAGE_MODULES.items() if kind in kinds]


@pytest.mark.parametrize("stage_cls,follower_cls", FOLLOWER_CASES,
                         ids=[f"{s.__name__}-{f.__name__}" for s, f in FOLLOWER_CASES])
def test_every_follower_slices_exactly(stage_cls, follower_cls):
    torch.manual_seed(1)
    layer = STAGE_FACTORIES[stage_cls]()
    sample = torch.randn(3, 4, 8, 8) if stage_cls is nn.Conv2d else torch.randn(3, 12)
    model = Chain(layer, FOLLOWER_FACTORIES[follower_cls](6), sample)
    staged = _check_sliced_equals_plain(model, sample)
    assert [s.name for s in staged.stages] == ["layer", "head"]
    assert staged.stages[0].follower_names == ["follower"], "the follower was not taken into the stage"


# One call per follower function and tensor method, as a forward() writes it; a test checks these
# cover FOLLOWER_FUNCTIONS and FOLLOWER_METHODS exactly, as FOLLOWER_FACTORIES covers the modules.
FUNCTION_CALLS = {
    F.relu: lambda x: F.relu(x),
    torch.relu: lambda x: torch.relu(x),
    F.relu6: lambda x: F.relu6(x),
    F.gelu: lambda x: F.gelu(x, approximate="tanh"),
    F.silu: lambda x: F.silu(x),
    F.hardswish: lambda x: F.hardswish(x),
    torch.sigmoid: lambda x: torch.sigmoid(x),
    F.dropout: lambda x: F.dropout(x, 0.5, training=False),
    F.max_pool2d: lambda x: F.max_pool2d(x, 2),
    F.avg_pool2d: lambda x: F.avg_pool2d(x, 3, stride=1, padding=1),
    F.adaptive_avg_pool2d: lambda x: F.adaptive_avg_pool2d(x, 3),
}
METHOD_CALLS = {
    "relu": lambda x: x.relu(),
    "sigmoid": lambda x: x.sigmoid(),
}


def test_call_tables_cover_every_follower_function_and_method():
    assert set(FUNCTION_CALLS) == set(FOLLOWER_FUNCTIONS)
    assert set(METHOD_CALLS) == set(FOLLOWER_METHODS)


CALL_CASES = [(stage_cls, target, table) for table in (FOLLOWER_FUNCTIONS, FOLLOWER_METHODS)
              for target, (_, kinds) in table.items()
              for stage_cls, kind in STAGE_MODULES.items() if kind in kinds]


@pytest.mark.parametrize("stage_cls,target,table", CALL_CASES,
                         ids=[f"{s.__name__}-{getattr(t, '__module__', None) or 'Tensor'}.{getattr(t, '__name__', t)}"
                              for s, t, _ in CALL_CASES])
def test_every_follower_function_and_method_slices_exactly(stage_cls, target, table):
    torch.manual_seed(1)
    layer = STAGE_FACTORIES[stage_cls]()
    sample = torch.randn(3, 4, 8, 8) if stage_cls is nn.Conv2d else torch.randn(3, 12)
    call = (FUNCTION_CALLS if table is FOLLOWER_FUNCTIONS else METHOD_CALLS)[target]
    staged = _check_sliced_equals_plain(Chain(layer, call, sample), sample)
    assert [s.name for s in staged.stages] == ["layer", "head"]
    followers = staged.stages[0].followers
    assert len(followers) == 1, f"the call was not taken into the stage: {staged.stages[0].follower_names}"
    assert followers[0].behaviour == table[target][0]
    if table is FOLLOWER_FUNCTIONS:
        assert followers[0].fn is target
    else:
        assert followers[0].name == target


def test_grouped_conv_without_bias_and_functional_followers():
    model = GroupedNoBias()
    staged = _check_sliced_equals_plain(model, torch.randn(2, 4, 9, 9))
    assert [s.name for s in staged.stages] == ["a", "b"]
    assert staged.stages[0].follower_names == ["bn", "relu"]
    assert staged.stages[1].follower_names == ["relu"]


def test_depthwise_conv_and_linear_on_channels_last():
    model = ChannelsLast()
    staged = _check_sliced_equals_plain(model, torch.randn(2, 3, 8, 8))
    kinds = {s.name: (s.kind, s.channel_dim) for s in staged.stages}
    assert kinds["dw"] == ("conv", 1) and kinds["pw1"] == ("linear", -1)
    assert staged.stages[[s.name for s in staged.stages].index("pw1")].follower_names == ["act"]
    assert "norm.weight" in staged.shared_state()  # LayerNorm runs whole, on every device


@pytest.mark.parametrize("bias", [True, False])
def test_a_depthwise_conv_after_a_conv_runs_in_its_stage(bias):
    """expand → BN → ReLU6 → depthwise (strided) → BN → ReLU6 → project: two stages, not three,
    and every device's slice of the fused stage equals the plain chain's channels."""
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU6(),
                          nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=bias), nn.BatchNorm2d(6),
                          nn.ReLU6(), nn.Conv2d(6, 4, 1))
    staged = _check_sliced_equals_plain(model, torch.randn(2, 3, 9, 9))
    assert [s.name for s in staged.stages] == ["0", "6"]
    assert staged.stages[0].follower_names == ["1", "2", "3", "4", "5"]
    assert [f.behaviour for f in staged.stages[0].followers][2] == "depthwise"
    # A device holding no neuron of the stage still gets the strided output's shape.
    stage, x = staged.stages[0], torch.randn(2, 3, 9, 9)
    empty = apply_followers(stage, slice_params(stage, []), compute_linear(stage, slice_params(stage, []), x))
    assert empty.shape == (2, 0, 5, 5)


def test_a_depthwise_conv_with_a_depth_multiplier_stays_a_stage():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1, groups=4))
    staged = _check_sliced_equals_plain(model, torch.randn(2, 3, 6, 6))
    assert [s.name for s in staged.stages] == ["0", "2"]


@pytest.mark.parametrize("layer,name", [
    (nn.ConvTranspose2d(4, 4, 3, padding=1), "ConvTranspose2d"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
])
def test_unsupported_conv_raises_naming_the_layer(layer, name):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.ReLU(), layer))
    with pytest.raises(ModelError, match=name) as err:
        trace_stages(model)
    assert "'1.1'" in str(err.value)


def test_conv1d_raises_naming_the_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(1, 2, 3))

        def forward(self, x):
            return self.body[1](self.body[0](x).unsqueeze(1))
    with pytest.raises(ModelError, match=r"'body\.1' \(Conv1d\)"):
        trace_stages(Net())


def test_model_without_splittable_layer_raises():
    with pytest.raises(ModelError, match="no Conv2d or Linear"):
        trace_stages(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("layer,x", [
    (nn.Conv2d(4, 7, 3, padding=1), torch.randn(2, 4, 6, 6)),
    (nn.Conv2d(7, 7, 3, padding=1, groups=7), torch.randn(2, 7, 6, 6)),
    (nn.Conv2d(4, 10, 3, groups=2), torch.randn(2, 4, 6, 6)),
    (nn.Linear(5, 7), torch.randn(2, 3, 5)),
], ids=["groups1", "depthwise", "grouped", "linear"])
def test_parity_rows_are_sums_of_members_linear_outputs(layer, x):
    torch.manual_seed(2)
    model = nn.Sequential(layer, nn.ReLU())
    stage = trace_stages(model).stages[0]
    members = cdc_layout(stage.n_neurons, 4).members  # 3 data devices: some rows are short
    assert len({len(m) for m in members}) > 1
    with torch.no_grad():
        parity = compute_linear(stage, parity_params(stage, members), x)
        for j, m in enumerate(members):
            own = compute_linear(stage, slice_params(stage, m, with_followers=False), x)
            torch.testing.assert_close(parity.select(stage.channel_dim, j),
                                       own.sum(stage.channel_dim), rtol=1e-5, atol=1e-5)


def test_full_stage_output_is_the_plain_chain():
    model = _randomise_batchnorm(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)))
    stage = trace_stages(model).stages[0]
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(full_stage_output(stage, x), model(x))
