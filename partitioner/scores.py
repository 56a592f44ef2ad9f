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
    "Removed" means its output is zeroed exactly where a failed device's neuron is zero-filled:
    after the stage's channel-local followers. So s3 measures what losing that neuron costs,
    and a neuron whose filter and bias are zero (with ReLU-like followers) scores 0.
    Cost: the graph runs once and records every intermediate value; each ablation then runs
    only the part of the graph after the stage, from the cached values, with many ablations
    batched together along the batch dimension.

Calibration data comes from `--calib` (an image folder) or the model's own data (see data.py).
Scores are raw here; `cluster.normalise_scores` normalises them per layer.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import PartitionerError
from .stages import Stage, StagedModel, StageCall, full_stage_output

SCORE_NAMES = ("s1", "s2", "s3")

# Elements of the largest tiled tensor per ablation chunk: bounds s3's memory (≈ 4 bytes each).
ABLATION_BUDGET_ELEMENTS = 24_000_000


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
              progress: Optional[Callable[[int], None]] = None) -> Dict[str, np.ndarray]:
    """JSD of the output when each neuron's stage output is zeroed; see the module docstring."""
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
                    view[k].select(cd, neuron).zero_()
                initial[node] = ablated
                logits = _WholeStages(model, keep_values=False).run(initial_env=initial)
                q = F.softmax(logits.reshape(m, batch, -1).double(), dim=2)
                scores[start: start + m] = jsd_bits(p[None], q).mean(1).numpy()
                if progress is not None:
                    progress(m)
            out[stage.name] = scores
    return out


def compute_scores(model: StagedModel, calib: Optional[torch.Tensor], names: Sequence[str],
                   show_progress: bool = True) -> Dict[str, np.ndarray]:
    """Raw scores per stage name, shape (neurons, len(names)), columns in `names` order."""
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
        total = sum(s.n_neurons for s in model.stages)
        with tqdm(total=total, desc="s3 ablations", unit="neuron", disable=not show_progress,
                  leave=False) as bar:
            columns["s3"] = s3_scores(model, calib, progress=bar.update)
    return {s.name: np.stack([columns[c][s.name] for c in names], axis=1) for s in model.stages}
