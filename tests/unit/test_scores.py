"""s1, s2, s3 against computations written out independently here, on tiny models."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustdice.partitioner.core import scores as scores_mod
from robustdice.partitioner.core.scores import compute_scores, parse_scores, s1_scores, s2_scores, s3_scores
from robustdice.partitioner.core.stages import trace_stages
from robustdice.partitioner.errors import PartitionerError


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(self.flat(self.relu(self.conv(x))))


class Residual(nn.Module):
    """Two convs with a skip connection, pooling and a Linear head (8×8 input)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.relu2(self.conv2(y)) + y
        return self.fc(self.flat(self.pool(z)))


def _seeded(cls, seed=0):
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _jsd_bits_reference(p_logits, q_logits):
    """JSD in bits per row, float64, 0·log 0 = 0, written out from the definition."""
    p = F.softmax(p_logits.double(), dim=-1).numpy()
    q = F.softmax(q_logits.double(), dim=-1).numpy()
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / b), 0.0).sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_parse_scores_accepts_known_names_in_canonical_order():
    assert parse_scores("s3, s1") == ["s1", "s3"]
    assert parse_scores("s2,s2") == ["s2"]


@pytest.mark.parametrize("text", ["s4", "s1,l2", "", " , "])
def test_parse_scores_rejects_unknown_or_empty(text):
    with pytest.raises(PartitionerError, match="--scores"):
        parse_scores(text)


def test_s1_is_l1_norm_of_filter_plus_abs_bias():
    model = ConvHead().eval()
    with torch.no_grad():
        model.conv.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(3, 2, 2, 2) - 10)
        model.conv.bias.copy_(torch.tensor([-1.5, 0.0, 2.0]))
        model.fc.weight.copy_(torch.linspace(-1, 1, 4 * 27).reshape(4, 27))
        model.fc.bias.copy_(torch.tensor([0.25, -0.5, 0.0, 1.0]))
    conv, fc = trace_stages(model).stages
    # row r of conv weight holds the integers 8r-10 .. 8r-3
    expected_conv = [sum(abs(v) for v in range(8 * r - 10, 8 * r - 2)) for r in range(3)]
    expected_conv = np.array(expected_conv, dtype=float) + [1.5, 0.0, 2.0]
    np.testing.assert_allclose(s1_scores(conv), expected_conv)
    w = np.linspace(-1, 1, 4 * 27, dtype=np.float32).reshape(4, 27)
    np.testing.assert_allclose(s1_scores(fc), np.abs(w).sum(1) + [0.25, 0.5, 0.0, 1.0], rtol=1e-6)


def test_s1_without_bias():
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.5, -0.5]]))
    np.testing.assert_allclose(s1_scores(trace_stages(model).stages[0]), [6.0, 1.0])


@pytest.mark.parametrize("cls", [ConvHead, Residual])
def test_s2_matches_autograd_of_top1_log_probability(cls):
    model = _seeded(cls)
    x = torch.randn(5, *((2, 4, 4) if cls is ConvHead else (3, 8, 8)), generator=torch.Generator().manual_seed(1))
    staged = trace_stages(model)
    got = s2_scores(staged, x)

    logp = F.log_softmax(model(x), dim=1)
    y = logp[torch.arange(x.shape[0]), logp.argmax(1)].sum()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = [p for m in layers for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(y, params)
    assert set(got) == {s.name for s in staged.stages}
    for stage, layer, gw, gb in zip(staged.stages, layers, grads[0::2], grads[1::2]):
        expected = (gw * layer.weight).abs().reshape(gw.shape[0], -1).sum(1) + (gb * layer.bias).abs()
        np.testing.assert_allclose(got[stage.name], expected.detach().double().numpy(), rtol=1e-5, atol=1e-9)
        assert got[stage.name].max() > 0


def test_s3_is_zero_for_a_dead_neuron_and_positive_otherwise():
    model = _seeded(ConvHead)
    with torch.no_grad():
        model.conv.weight[1].zero_()
        model.conv.bias[1] = 0.0
    x = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    staged = trace_stages(model)
    s3 = s3_scores(staged, x)[staged.stages[0].name]
    # Not bit-exact 0: the ablation batch runs the head at another batch size, and BLAS may
    # round the (identical) logits differently; 1e-16 bits is far below any other neuron.
    assert abs(s3[1]) < 1e-12
    assert s3[0] > 1e-6 and s3[2] > 1e-6
    assert (s3 <= 1.0).all()


def _constant_neuron_model():
    """ConvHead whose conv neuron 1 outputs 0.7 everywhere: zeroing it changes the output,
    putting its mean back changes nothing."""
    model = _seeded(ConvHead)
    with torch.no_grad():
        model.conv.weight[1].zero_()
        model.conv.bias[1] = 0.7
    return model, torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("estimate", ["exact", "quadratic"])
def test_s3_ablates_to_the_fill_value_it_is_given(estimate):
    from robustdice.partitioner.core.fill import mean_outputs
    from robustdice.partitioner.core.scores import s3_quadratic_scores
    model, x = _constant_neuron_model()
    staged = trace_stages(model)
    score = s3_scores if estimate == "exact" else s3_quadratic_scores
    name = staged.stages[0].name
    zeroed = score(staged, x)[name]
    means = mean_outputs(staged, x)
    assert means[0][1].item() == pytest.approx(0.7)
    filled = score(staged, x, fill_values=means)[name]
    assert zeroed[1] > 1e-4                     # zero is far from what the next layer expects
    assert abs(filled[1]) < 1e-12               # its mean is exactly what it always outputs
    assert filled[0] > 1e-6 and filled[2] > 1e-6  # neurons that vary still cost something


def test_s3_with_fill_values_equals_brute_force_replacement():
    from robustdice.partitioner.core.fill import mean_outputs
    model = _seeded(Residual)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    staged = trace_stages(model)
    means = mean_outputs(staged, x)
    got = s3_scores(staged, x, fill_values=means)
    with torch.no_grad():
        base = model(x)
        for i, stage in enumerate(staged.stages):
            expected = []
            for neuron in range(stage.n_neurons):
                def fill(_m, _inp, out, n=neuron, dim=stage.channel_dim, value=float(means[i][neuron])):
                    out = out.clone()
                    out.select(dim, n).fill_(value)
                    return out
                handle = _last_module(model, stage).register_forward_hook(fill)
                try:
                    expected.append(_jsd_bits_reference(base, model(x)).mean())
                finally:
                    handle.remove()
            np.testing.assert_allclose(got[stage.name], expected, rtol=1e-6, atol=1e-10)


def _last_module(model, stage):
    """The module whose output is the stage's output: its last follower, else the layer."""
    name = stage.followers[-1].name if stage.followers else stage.name
    return model.get_submodule(name)


@pytest.mark.parametrize("budget", [scores_mod.ABLATION_BUDGET_ELEMENTS, 1500])
def test_s3_equals_brute_force_ablation_with_a_residual_connection(monkeypatch, budget):
    # the small budget forces several ablation chunks per stage
    monkeypatch.setattr(scores_mod, "ABLATION_BUDGET_ELEMENTS", budget)
    model = _seeded(Residual)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    staged = trace_stages(model)
    assert [s.name for s in staged.stages] == ["conv1", "conv2", "fc"]
    assert staged.stages[0].follower_names == ["bn1", "relu1"]
    got = s3_scores(staged, x)

    with torch.no_grad():
        base = model(x)
        for stage in staged.stages:
            expected = []
            for neuron in range(stage.n_neurons):
                def zero(_m, _inp, out, n=neuron, dim=stage.channel_dim):
                    out = out.clone()
                    out.select(dim, n).zero_()
                    return out
                handle = _last_module(model, stage).register_forward_hook(zero)
                try:
                    ablated = model(x)
                finally:
                    handle.remove()
                expected.append(_jsd_bits_reference(base, ablated).mean())
            np.testing.assert_allclose(got[stage.name], expected, rtol=1e-6, atol=1e-10)
            assert max(expected) > 1e-4, stage.name  # the ablations really change the output


def test_compute_scores_stacks_columns_in_requested_order():
    model = _seeded(ConvHead)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    staged = trace_stages(model)
    both = compute_scores(staged, x, ["s1", "s3"], show_progress=False)
    for stage in staged.stages:
        assert both[stage.name].shape == (stage.n_neurons, 2)
        np.testing.assert_allclose(both[stage.name][:, 0], s1_scores(stage))
    with pytest.raises(PartitionerError, match="calibration"):
        compute_scores(staged, None, ["s2"], show_progress=False)


# --- s3's second-order estimate (--s3 quadratic / auto) -------------------------------------------

def _digits_staged_and_batch():
    from robustdice.partitioner.zoo.data import calibration_batch
    from robustdice.partitioner.zoo.models import build_model
    return trace_stages(build_model("digits_cnn", "DEFAULT")), calibration_batch("digits_cnn", n=128)


def test_quadratic_s3_ranks_neurons_like_the_exact_ablations_where_each_matters_little():
    from scipy.stats import spearmanr

    from robustdice.partitioner.core.scores import s3_quadratic_scores
    staged, calib = _digits_staged_and_batch()
    exact = s3_scores(staged, calib)
    estimate = s3_quadratic_scores(staged, calib)
    for name in ("features.7", "classifier.2"):  # 128 and 64 neurons: each ablation is a small change
        assert spearmanr(exact[name], estimate[name]).correlation > 0.95, name
        ratio = np.median(estimate[name] / np.maximum(exact[name], 1e-12))
        assert 0.3 < ratio < 1.5, (name, ratio)


def test_auto_runs_exact_ablations_on_the_cheapest_stages_within_the_budget(monkeypatch):
    from robustdice.partitioner.core import scores
    staged, calib = _digits_staged_and_batch()
    costs = scores.exact_s3_macs(staged, calib)
    assert costs[-1] == 0 and costs[0] == max(costs)  # the last stage has nothing after it
    assert scores.exact_s3_stages(staged, calib, "auto") == list(range(len(costs)))  # digits: all cheap
    monkeypatch.setattr(scores, "EXACT_S3_MAX_MACS", sorted(costs)[2] + sorted(costs)[1] + 1)
    chosen = scores.exact_s3_stages(staged, calib, "auto")
    assert sorted(costs[i] for i in chosen) == sorted(costs)[:3]
    mixed = scores.compute_scores(staged, calib, ["s3"], show_progress=False, s3_mode="auto")
    exact = s3_scores(staged, calib, only=chosen)
    for i in chosen:
        name = staged.stages[i].name
        np.testing.assert_allclose(mixed[name][:, 0], exact[name])
    assert scores.exact_s3_stages(staged, calib, "quadratic") == []
    with pytest.raises(PartitionerError, match="--s3"):
        scores.exact_s3_stages(staged, calib, "fast")
