"""Per-layer thresholds under a memory budget: the design-space exploration the paper leaves open.

One global threshold t does not carry over between models (0.1 replicates digits_cnn 2.2x and
efficientnet_lite0 1.04x), nor between the layers of one model. Given a budget, either
per-device bytes (`--budget-mb`) or neuron copies per neuron (`--replication`), this picks a t
per layer that minimises the expected importance lost under failures:

    loss_l(t) = sum over k = 1..N-1 of the mean, over every set F of k failed devices, of
                the importance of the neurons of layer l that F loses under t's plan
                (after parity recovery for robust+cdc).

The importance of a neuron is its s3 score when the plan has it (the Jensen-Shannon divergence
of the output when that neuron is zeroed: comparable across layers), otherwise its normalised
score norm scaled so that every layer weighs the same. Choosing one option per layer is a
multiple-choice knapsack; a Lagrangian relaxation (bisection on the price of a byte) finds the
frontier and a greedy pass spends what is left.

`layer_options` builds each layer's candidate plans and `choose` picks among them (pure: numpy
in, choices out). `budget_costs` prices a row of each stage; `uniform_group_counts` spends the
same prices evenly over the layers for `--method uniform`, so that every method is held to the
same memory.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from robustdice.partitioner.core.cluster import Assignment, replicate_and_deal, rotated_parity, shuffled_groups
from robustdice.partitioner.errors import PartitionerError

# Candidate thresholds: 0 (every neuron copied to every device), a geometric ladder, and one
# above any layer's diameter (one group: no replica beyond the padding to a multiple of N).
CANDIDATE_THRESHOLDS = (0.0,) + tuple(float(t) for t in np.geomspace(0.005, 1.8, 28)) + (4.0,)


@dataclass(frozen=True)
class Option:
    threshold: float
    assignment: Assignment
    parity_members: tuple      # robust+cdc: rows (tuples of neurons); () otherwise
    parity_devices: tuple
    cost: float                # bytes on the fullest device, or neuron copies
    loss: float                # expected importance lost (see the module docstring)


def _groups_for_thresholds(features: np.ndarray, thresholds: Sequence[float]) -> List[List[List[int]]]:
    """cluster_neurons for several thresholds from one linkage (the same groups and order)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 1:
        features = features[:, None]
    n = features.shape[0]
    importance = np.linalg.norm(features, axis=1)
    z = linkage(features, method="complete", metric="euclidean") if n > 1 else None
    out = []
    for t in thresholds:
        if n == 1:
            labels = np.array([1])
        elif t > 0:
            labels = fcluster(z, np.nextafter(t, -np.inf), criterion="distance")
        else:
            labels = np.arange(1, n + 1)
        groups = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            members = members[np.argsort(-importance[members], kind="stable")]
            groups.append([int(m) for m in members])
        groups.sort(key=lambda g: (-float(np.mean(importance[g])), g[0]))
        out.append(groups)
    return out


def expected_loss(assignment: Assignment, n_neurons: int, importance: np.ndarray,
                  parity_members=(), parity_devices=()) -> float:
    """Σ_k mean over |F| = k of the importance F loses (the same rule as StagePlan.lost)."""
    n_devices = len(assignment)
    holds = np.zeros((n_devices, n_neurons), dtype=bool)
    for d, ids in enumerate(assignment):
        holds[d, np.asarray(ids, dtype=np.int64)] = True
    rows = [np.asarray(m, dtype=np.int64) for m in parity_members]
    total = 0.0
    for k in range(1, n_devices):
        sets = list(itertools.combinations(range(n_devices), k))
        acc = 0.0
        for failed in sets:
            alive = np.ones(n_devices, dtype=bool)
            alive[list(failed)] = False
            lost = ~holds[alive].any(axis=0)
            if rows and lost.any():
                recovered = []
                for members, device in zip(rows, parity_devices):
                    if alive[device] and len(members):
                        gone = members[lost[members]]
                        if len(gone) == 1:
                            recovered.append(gone[0])
                lost[recovered] = False
            acc += float(importance[lost].sum())
        total += acc / len(sets)
    return total


def layer_options(features: np.ndarray, importance: np.ndarray, n_devices: int, method: str,
                  row_cost: float, parity_row_cost: float, seed: int = 0,
                  thresholds: Sequence[float] = CANDIDATE_THRESHOLDS) -> List[Option]:
    """Every candidate threshold's plan of one layer, with its cost and expected loss.

    row_cost: the cost of one data row on a device (its bytes, or 1 to count copies);
    parity_row_cost the same for a parity row. Options that cost the same keep the best.
    """
    n = len(importance)
    best: Dict[tuple, Option] = {}
    for t, groups in zip(thresholds, _groups_for_thresholds(features, thresholds)):
        if method == "random":
            groups = shuffled_groups(groups, seed)
        assignment = replicate_and_deal(groups, n_devices)
        members, devices = (), ()
        if method == "robust+cdc":
            rp = rotated_parity(assignment, n)
            members, devices = rp.members, rp.devices
        if row_cost == 1 and parity_row_cost == 1:  # counting copies: the whole layer's
            cost = float(sum(len(a) for a in assignment) + len(members))
        else:
            per_device = [len(a) * row_cost + sum(1 for dv in devices if dv == d) * parity_row_cost
                          for d, a in enumerate(assignment)]
            cost = float(max(per_device))
        loss = expected_loss(assignment, n, importance, members, devices)
        key = (round(cost, 6),)
        if key not in best or loss < best[key].loss:
            best[key] = Option(float(t), assignment, members, devices, cost, loss)
    return sorted(best.values(), key=lambda o: (o.cost, o.loss))


def choose(options: Sequence[Sequence[Option]], budget: float) -> List[int]:
    """One option index per layer minimising Σ loss with Σ cost <= budget.

    Raises PartitionerError when even the cheapest options exceed the budget.
    """
    cheapest = sum(min(o.cost for o in opts) for opts in options)
    if cheapest > budget * (1 + 1e-9):
        raise PartitionerError(f"the budget {budget:.6g} is below the cheapest plan ({cheapest:.6g})")

    def pick(price: float) -> List[int]:
        return [min(range(len(opts)), key=lambda j: (opts[j].loss + price * opts[j].cost, opts[j].cost))
                for opts in options]

    def cost_of(sel: List[int]) -> float:
        return sum(options[l][j].cost for l, j in enumerate(sel))

    lo, hi = 0.0, 1.0
    while cost_of(pick(hi)) > budget and hi < 1e30:
        hi *= 10
    if cost_of(pick(lo)) <= budget:
        selection = pick(lo)
    else:
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if cost_of(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        selection = pick(hi)
    # Greedy: spend the slack on the upgrades that buy the most importance per unit of cost.
    spent = cost_of(selection)
    while True:
        best = None
        for l, opts in enumerate(options):
            cur = opts[selection[l]]
            for j, o in enumerate(opts):
                extra = o.cost - cur.cost
                gain = cur.loss - o.loss
                if gain > 0 and spent + extra <= budget * (1 + 1e-9):
                    ratio = gain / max(extra, 1e-12)
                    if best is None or ratio > best[0]:
                        best = (ratio, l, j, extra)
        if best is None:
            return selection
        _, l, j, extra = best
        selection[l] = j
        spent += extra


def importance_for_budget(raw: np.ndarray, normalised: np.ndarray, score_names: Sequence[str]) -> np.ndarray:
    """What a neuron's loss costs, comparable across layers (see the module docstring)."""
    if "s3" in score_names:
        return np.asarray(raw[:, list(score_names).index("s3")], dtype=np.float64)
    norm = np.linalg.norm(normalised, axis=1)
    total = norm.sum()
    return norm / total if total > 0 else np.full(len(norm), 1.0 / max(len(norm), 1))


class BelowCheapestPlan(PartitionerError):
    """The budget buys less than the method's cheapest plan; `least_mb`: the smallest budget in MB
    per device that buys it (None where the budget counts copies, not bytes)."""

    def __init__(self, message: str, least_mb: Optional[float]) -> None:
        super().__init__(message)
        self.least_mb = least_mb


@dataclass(frozen=True)
class Costs:
    """What a request's budget buys, per stage: the cost of a data row and of a parity row."""

    rows: List[float]
    parity_rows: List[float]
    budget: float            # what the stages may spend, after what every device holds anyway
    fixed: float             # what every device holds whatever the plan (0 when counting copies)
    by_copies: bool
    total_neurons: int
    what: str                # the option that set the budget, for error messages

    def least(self, cheapest: float) -> str:
        """The smallest budget that buys `cheapest`, in the option's own unit."""
        return (f"{cheapest / self.total_neurons:.4g}" if self.by_copies
                else f"{(cheapest + self.fixed) / 1e6:.4g} MB")

    def below(self, request, cheapest: float) -> BelowCheapestPlan:
        return BelowCheapestPlan(f"{self.what} is below the cheapest {request.method} plan of {request.model} "
                                 f"({self.least(cheapest)})",
                                 None if self.by_copies else (cheapest + self.fixed) / 1e6)


def budget_costs(staged, request) -> Costs:
    """Costs per device: a data row's bytes (its weight row, bias and, where the followers run on
    the slice, their BatchNorm parameters and recalibrated statistics), a parity row's bytes,
    and what every device holds whatever the thresholds (the skeleton's parameters, full
    followers of robust+cdc, fill values). With --replication, every row costs one copy.
    """
    from robustdice.partitioner.core.fill import failed_sets
    from robustdice.partitioner.core.stages import param_bytes, parity_params, slice_params

    n = request.devices
    by_copies = request.replication is not None
    after = request.method == "robust+cdc"
    # Statistics are kept per failed set a device survives, where losses reach the stage: under
    # robust+cdc a single failure loses nothing, so only sets of two or more count.
    least = 2 if request.method == "robust+cdc" else 1
    recal_sets = (len([f for f in failed_sets(n, request.max_failed) if 0 not in f and len(f) >= least])
                  if request.fill == "mean+bn" else 0)
    rows, parity_rows = [], []
    fixed = 0.0 if by_copies else float(param_bytes(staged.shared_state()))
    total_neurons = 0
    for stage in staged.stages:
        c = stage.n_neurons
        total_neurons += c
        if by_copies:
            row, prow = 1.0, 1.0
        else:
            one = slice_params(stage, [0], with_followers=not after)
            row = float(param_bytes(one))
            bn = sum(1 for f in stage.followers if f.behaviour == "batchnorm")
            if not after:
                row += 2 * 4 * recal_sets * bn
            members = [list(range(min(c, n - 1)))]
            prow = float(param_bytes(parity_params(stage, members)))
            fill_bytes = 4 * c if request.fill != "zero" else 0
            fixed += fill_bytes
            if after:
                fixed += 4 * c * bn * (4 + 2 * recal_sets)
        rows.append(row)
        parity_rows.append(prow)
    if by_copies:
        budget, what = request.replication * total_neurons, f"--replication {request.replication:g}"
    else:
        budget, what = request.budget_mb * 1e6 - fixed, f"--budget-mb {request.budget_mb:g}"
        if request.memory is not None:
            what = f"--memory {request.memory:g} ({request.budget_mb:.4g} MB per device)"
    return Costs(rows, parity_rows, budget, fixed, by_copies, total_neurons, what)


def thresholds_for_budget(staged, request, scores):
    """The request with per-layer thresholds chosen for its --replication or --budget-mb
    (costs: budget_costs)."""
    import dataclasses

    from robustdice.partitioner.core.cluster import normalise_scores

    costs = budget_costs(staged, request)
    options = []
    for stage, row, prow in zip(staged.stages, costs.rows, costs.parity_rows):
        feats = normalise_scores(scores[stage.name])
        imp = importance_for_budget(scores[stage.name], feats, request.scores)
        # random takes robust's thresholds, so that it holds the same rows of every layer and
        # differs only in which neurons they are: blind to importance, even between layers.
        method = "robust" if request.method == "random" else request.method
        options.append(layer_options(feats, imp, request.devices, method, row, prow,
                                     seed=request.seed + stage.index))
    try:
        selection = choose(options, costs.budget)
    except PartitionerError:
        raise costs.below(request, sum(min(o.cost for o in opts) for opts in options)) from None
    thresholds = {s.name: options[l][j].threshold for l, (s, j) in enumerate(zip(staged.stages, selection))}
    return dataclasses.replace(request, thresholds=thresholds, threshold=None, replication=None, budget_mb=None,
                               memory=None)


def uniform_counts(sizes: Sequence[int], rho: float, n_devices: int) -> List[int]:
    """Groups per layer at a share rho of groups per neuron: rho * size rounded to the nearest,
    never below ceil(size / N) (each device must hold one row per N neurons at least) nor above
    size (one group per neuron: every neuron on every device)."""
    return [min(c, max(-(-c // n_devices), int(math.floor(rho * c + 0.5)))) for c in sizes]


def uniform_group_counts(staged, request) -> Dict[str, int]:
    """`--method uniform`: per layer, how many groups (rows per device) of cluster.uniform_groups.

    Every layer gets the same share of groups per neuron, rho in [1/N, 1] (uniform_counts: to the
    nearest, since rounding down would cost a small layer, a classifier's 10 outputs, up to a
    whole row's worth of copies), the largest rho whose plan fits the budget: the replication the
    memory allows, spread evenly over the layers. The same costs as the thresholds of robust and
    random, so that all three are compared at the same memory.
    """
    costs = budget_costs(staged, request)
    n = request.devices
    sizes = [stage.n_neurons for stage in staged.stages]

    # A group is one row on every device: per device, a row's bytes; counting copies, N copies.
    per_group = n if costs.by_copies else 1

    def cost(rho: float) -> float:
        return per_group * sum(g * row for g, row in zip(uniform_counts(sizes, rho, n), costs.rows))

    if cost(0.0) > costs.budget * (1 + 1e-9):
        raise costs.below(request, cost(0.0))
    lo, hi = 0.0, 1.0
    if cost(hi) <= costs.budget * (1 + 1e-9):
        lo = hi
    else:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if cost(mid) <= costs.budget * (1 + 1e-9):
                lo = mid
            else:
                hi = mid
    return {stage.name: g for stage, g in zip(staged.stages, uniform_counts(sizes, lo, n))}
