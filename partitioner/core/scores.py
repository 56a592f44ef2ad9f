"""Neuron importance scores, paper Algorithm 1 lines 7–9.

For every stage (Conv2d / Linear layer) and every output channel ("neuron") n:

s1  L1 norm of the filter plus |bias|: Σ|w| + |b|.
s2  Taylor connection sensitivity over a calibration batch: Σ_w |∂y/∂w · w| + |∂y/∂b · b|.
    y is label-free, so that any folder of images calibrates: the log-probability of the
    model's own top-1 class, summed over the calibration batch,
        y = Σ_b log softmax(f(x_b))[argmax f(x_b)].
    The gradient is taken once for the whole batch (one backward pass), then multiplied by the
    weight and made absolute per connection.
s3  Jensen–Shannon divergence (base 2, in [0, 1]) between the model's output distribution and
    the output distribution with neuron n removed, averaged over the calibration batch.
    "Removed" means its output is replaced exactly where a failed device's neuron is filled:
    after the stage's channel-local followers, by what the plan's fill puts there (zero, as in
    the paper, or under --fill mean and mean+bn its mean output; see partition.stand_ins). So s3
    measures what losing that neuron costs under the plan's own rule: a neuron whose filter and
    bias are zero (with ReLU-like followers) scores 0, and under mean fill so does one whose
    output never varies, however large.
    Cost: the graph runs once and records every intermediate value; each ablation then runs
    only the part of the graph after the stage, from the cached values, with many ablations
    batched together along the batch dimension.

Calibration data comes from `--calib` (an image folder) or the model's own data (see zoo/data.py).
Scores are raw here; `cluster.normalise_scores` normalises them per layer.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from robustdice.partitioner.errors import PartitionerError

log = logging.getLogger(__name__)
from robustdice.partitioner.core.stages import Stage, StagedModel, StageCall, full_stage_output

SCORE_NAMES = ("s1", "s2", "s3")

# Elements of the largest tiled tensor per ablation chunk (the stage output and the live inputs
# after it; tensors the later layers make can be several times larger): bounds s3's memory, 4
# bytes each. Lite0's robust partition spent 41 of its 56 s in the kernel, faulting pages in,
# with chunks of 24 M elements and glibc's defaults (allocator.py).
ABLATION_BUDGET_ELEMENTS = 8_000_000


S3_MODES = ("auto", "exact", "quadratic")


def exact_s3_stages(model: StagedModel, calib: torch.Tensor, mode: str) -> List[int]:
    """The stages whose s3 is computed by exact ablations; the others get the quadratic estimate.

    auto: the cheapest stages first (those near the output: little to rerun), while the
    ablations cost at most EXACT_S3_MAX_MACS in all. The estimate is least faithful exactly
    there (zeroing a logit is no small change), and exact is cheapest there.
    """
    if mode not in S3_MODES:
        raise PartitionerError(f"--s3 {mode!r} is not one of {', '.join(S3_MODES)}")
    everything = [s.index for s in model.stages]
    if mode == "exact":
        return everything
    if mode == "quadratic":
        return []
    costs = exact_s3_macs(model, calib)
    chosen, spent = [], 0.0
    for i in sorted(everything, key=lambda i: costs[i]):
        if spent + costs[i] > EXACT_S3_MAX_MACS:
            break
        chosen.append(i)
        spent += costs[i]
    return sorted(chosen)


def parse_scores(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SCORE_NAMES]
    if not names or bad:
        raise PartitionerError(f"--scores: {text!r} must be a comma list of {', '.join(SCORE_NAMES)}")
    return sorted(set(names), key=SCORE_NAMES.index)


def s1_scores(stage: Stage) -> np.ndarray:
    w = stage.module.weight.detach()
    s = w.abs().reshape(w.shape[0], -1).sum(1)
    if stage.module.bias is not None:
        s = s + stage.module.bias.detach().abs()
    return s.double().numpy()


def top1_log_prob(logits: torch.Tensor) -> torch.Tensor:
    """The label-free objective y of s2 (see the module docstring)."""
    logp = F.log_softmax(logits.reshape(logits.shape[0], -1), dim=1)
    return logp.gather(1, logp.argmax(1, keepdim=True)).sum()


def s2_scores(model: StagedModel, calib: torch.Tensor) -> Dict[str, np.ndarray]:
    params = [p for s in model.stages for p in (s.module.weight, s.module.bias) if p is not None]
    grads = torch.autograd.grad(top1_log_prob(model.run_full(calib)), params, allow_unused=True)
    by_param = {id(p): g for p, g in zip(params, grads)}
    out = {}
    for s in model.stages:
        w = s.module.weight.detach()
        gw = by_param[id(s.module.weight)]
        score = (gw * w).abs().reshape(w.shape[0], -1).sum(1) if gw is not None else torch.zeros(w.shape[0])
        if s.module.bias is not None and by_param[id(s.module.bias)] is not None:
            score = score + (by_param[id(s.module.bias)] * s.module.bias.detach()).abs()
        out[s.name] = score.double().numpy()
    return out


def jsd_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence in bits along the last dim (p, q are distributions)."""
    m = 0.5 * (p + q)
    kl_pm = torch.xlogy(p, p).sum(-1) - torch.xlogy(p, m).sum(-1)
    kl_qm = torch.xlogy(q, q).sum(-1) - torch.xlogy(q, m).sum(-1)
    return (0.5 * (kl_pm + kl_qm) / np.log(2.0)).clamp_min(0.0)


class _WholeStages(fx.Interpreter):
    """Runs the skeleton with every stage whole; `keep_values` keeps every node's value."""

    def __init__(self, model: StagedModel, keep_values: bool) -> None:
        super().__init__(model.skeleton, garbage_collect_values=not keep_values)
        self._model = model

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if isinstance(mod, StageCall):
            return full_stage_output(self._model.stages[mod.index], args[0])
        return super().call_module(target, args, kwargs)


def _batch_dependent(graph: fx.Graph) -> set:
    dependent = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def s3_scores(model: StagedModel, calib: torch.Tensor,
              progress: Optional[Callable[[int], None]] = None,
              only: Optional[Sequence[int]] = None,
              fill_values: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, np.ndarray]:
    """JSD of the output when each neuron's stage output is lost; see the module docstring.

    `only`: the indices of the stages to score (default all). `fill_values`: per stage, what
    stands in for a lost neuron (fill.mean_outputs); None zeroes it, as the paper does.
    """
    graph = model.skeleton.graph
    nodes = list(graph.nodes)
    batch = calib.shape[0]
    dependent = _batch_dependent(graph)
    with torch.inference_mode():
        recorder = _WholeStages(model, keep_values=True)
        base_logits = recorder.run(calib)
        env = recorder.env
        p = F.softmax(base_logits.reshape(batch, -1).double(), dim=1)
        call_nodes = {n.target: n for n in nodes if n.op == "call_module"
                      and isinstance(model.skeleton.get_submodule(n.target), StageCall)}
        out: Dict[str, np.ndarray] = {}
        for stage in model.stages:
            if only is not None and stage.index not in only:
                continue
            node = call_nodes[f"_stage_{stage.index}"]
            position = nodes.index(node)
            later = nodes[position + 1:]
            live = {a for n in later for a in n.all_input_nodes if nodes.index(a) < position}
            # Values derived from the batch that are not tensors (a size, say) cannot be tiled;
            # then each ablation runs on its own.
            untileable = any(not isinstance(env[a], torch.Tensor) for a in live if a in dependent)
            stage_out = env[node]
            per_image = stage_out[0].numel() + sum(env[a][0].numel() for a in live
                                                   if a in dependent and isinstance(env[a], torch.Tensor))
            n = stage.n_neurons
            chunk = 1 if untileable else int(max(1, min(n, ABLATION_BUDGET_ELEMENTS // max(1, per_image * batch))))
            cd = stage.channel_dim % stage_out.dim()
            stand_in = fill_values[stage.index] if fill_values is not None else None
            scores = np.zeros(n)
            for start in range(0, n, chunk):
                ids = list(range(start, min(n, start + chunk)))
                m = len(ids)
                initial = {}
                for a in nodes[: position + 1]:
                    value = env[a]
                    if a in live and a in dependent and isinstance(value, torch.Tensor):
                        value = value.repeat((m,) + (1,) * (value.dim() - 1))
                    initial[a] = value if (a in live or a is node) else None
                ablated = stage_out.repeat((m,) + (1,) * (stage_out.dim() - 1))
                view = ablated.reshape((m, batch) + tuple(stage_out.shape[1:]))
                for k, neuron in enumerate(ids):
                    view[k].select(cd, neuron).fill_(0.0 if stand_in is None else float(stand_in[neuron]))
                initial[node] = ablated
                logits = _WholeStages(model, keep_values=False).run(initial_env=initial)
                q = F.softmax(logits.reshape(m, batch, -1).double(), dim=2)
                scores[start: start + m] = jsd_bits(p[None], q).mean(1).numpy()
                if progress is not None:
                    progress(m)
            out[stage.name] = scores
    return out


# s3 by its second-order expansion (see s3_quadratic_scores): the classes of highest probability
# per image whose log-probability gradients are taken (the rest of the mass is left out).
QUADRATIC_TOP_CLASSES = 10
# --s3 auto: exact ablations while they cost at most this many multiply-accumulates in all.
EXACT_S3_MAX_MACS = 2e11


def s3_quadratic_scores(model: StagedModel, calib: torch.Tensor,
                        top_classes: int = QUADRATIC_TOP_CLASSES,
                        fill_values: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, np.ndarray]:
    """s3 to second order: no ablation runs, a few backward passes instead.

    Zeroing neuron c (output a_c) changes every log-probability by, to first order,
    Δ log p_y = -<∂ log p_y / ∂a_c, a_c> (-<∂ log p_y / ∂a_c, a_c - m_c> when `fill_values`
    puts its mean m_c in its place), and for small changes
    JSD(p, q) ≈ (1/8) Σ_y (q_y - p_y)² / p_y = (1/8) Σ_y p_y (Δ log p_y)² nats.
    One backward pass per rank r of the top classes gives, for every image and every neuron of
    every stage at once, Δ log p of that image's r-th class; the sum over the top classes,
    weighted by their probabilities, estimates the divergence, averaged over the batch as s3 is.
    Costs about 2 × top_classes forward passes of the batch, whatever the number of neurons.
    """
    outputs: List[torch.Tensor] = [None] * len(model.stages)

    def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
        y = full_stage_output(model.stages[i], t)
        outputs[i] = y
        return y

    with torch.enable_grad():
        logits = model.run(calib, stage_fn)
        logp = F.log_softmax(logits.reshape(logits.shape[0], -1).double(), dim=1)
        k = min(top_classes, logp.shape[1])
        top_p, top_y = logp.detach().exp().topk(k, dim=1)
        total = [torch.zeros(s.n_neurons, dtype=torch.float64) for s in model.stages]
        for r in range(k):
            objective = logp.gather(1, top_y[:, r:r + 1]).sum()
            grads = torch.autograd.grad(objective, outputs, retain_graph=r < k - 1, allow_unused=True)
            for i, (stage, g, a) in enumerate(zip(model.stages, grads, outputs)):
                if g is None:
                    continue
                cd = stage.channel_dim % a.dim()
                dims = [d for d in range(a.dim()) if d not in (0, cd)]
                lost = a.detach()
                if fill_values is not None:
                    shape = [1] * a.dim()
                    shape[cd] = -1
                    lost = lost - fill_values[i].to(a.dtype).reshape(shape)
                change = (g * lost).double()
                change = change.sum(dim=dims) if dims else change   # (batch, neurons)
                if cd != 1 and change.dim() == 2 and change.shape[1] != stage.n_neurons:
                    change = change.t()
                total[i] += (top_p[:, r:r + 1] * change ** 2).mean(0)
    return {s.name: (total[i] / (8 * np.log(2.0))).numpy() for i, s in enumerate(model.stages)}


def exact_s3_macs(model: StagedModel, calib: torch.Tensor) -> List[float]:
    """Per stage, the multiply-accumulates of exact s3: each neuron's ablation reruns what
    follows its stage (the Conv2d and Linear layers; the rest is cheap beside them)."""
    macs: List[float] = []

    def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
        y = full_stage_output(model.stages[i], t)
        mod = model.stages[i].module
        per = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1] \
            if model.stages[i].kind == "conv" else mod.in_features
        macs.append(float(y[:1].numel()) * per)
        return y

    with torch.inference_mode():
        model.run(calib[:1], stage_fn)
    after = [sum(macs[i + 1:]) for i in range(len(macs))]
    return [float(calib.shape[0]) * s.n_neurons * a for s, a in zip(model.stages, after)]


def compute_scores(model: StagedModel, calib: Optional[torch.Tensor], names: Sequence[str],
                   show_progress: bool = True, s3_mode: str = "exact",
                   fill_values: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, np.ndarray]:
    """Raw scores per stage name, shape (neurons, len(names)), columns in `names` order.

    s3_mode: "exact" ablations, "quadratic" (s3_quadratic_scores), or "auto": exact unless it
    would cost more than EXACT_S3_MAX_MACS. fill_values: see s3_scores.
    """
    from tqdm import tqdm

    needs_data = any(s in names for s in ("s2", "s3"))
    if needs_data and calib is None:
        raise PartitionerError("scores s2 and s3 need calibration data")
    columns: Dict[str, Dict[str, np.ndarray]] = {}
    if "s1" in names:
        columns["s1"] = {s.name: s1_scores(s) for s in model.stages}
    if "s2" in names:
        columns["s2"] = s2_scores(model, calib)
    if "s3" in names:
        exact = exact_s3_stages(model, calib, s3_mode)
        if len(exact) < len(model.stages):
            log.info("s3: exact ablations for %d of %d stages, the quadratic estimate for the others",
                     len(exact), len(model.stages))
        columns["s3"] = s3_quadratic_scores(model, calib, fill_values=fill_values) \
            if len(exact) < len(model.stages) else {}
        total = sum(model.stages[i].n_neurons for i in exact)
        with tqdm(total=total, desc="s3 ablations", unit="neuron", disable=not show_progress or not total,
                  leave=False) as bar:
            columns["s3"].update(s3_scores(model, calib, progress=bar.update, only=exact, fill_values=fill_values))
    return {s.name: np.stack([columns[c][s.name] for c in names], axis=1) for s in model.stages}
