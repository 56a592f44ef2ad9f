"""The pure core of partitioning: importance clustering, replication and distribution.

Values in, values out: no torch, no files. Neurons are integers 0..C-1 of one layer; an
*assignment* is a list, one entry per device, of the neuron ids that device computes.

RobustDiCE, paper Algorithm 1:
  Step 2 (lines 10–20) `cluster_neurons`: complete linkage — every pair of neurons inside a
    group is closer than the layer's threshold t (Euclidean distance between the neurons'
    normalised score vectors). scipy's hierarchical clustering with method="complete" merges
    exactly while the largest pairwise distance stays below t.
  Step 3 (lines 21–28) `replicate_and_deal`: pad each group with replicas up to a multiple of N,
    then deal it round-robin, so every device holds the same number of each group's neurons.
Baselines: `lop_assignment` (equal contiguous split), `nmr_assignment` (everything
everywhere), `cdc_layout` (contiguous split over N−1 data devices plus one parity device), and
two controls blind to importance: `shuffled_groups` (robust's group sizes, random members) and
`uniform_groups` (the same replication in every layer, random members).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

Assignment = List[List[int]]


def normalise_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise each score column to [0, 1] within a layer.

    The three scores live on unrelated scales (an L1 norm, a gradient product, a divergence);
    per-layer normalisation makes one threshold t meaningful across them. A constant column
    (e.g. s3 of a layer whose ablation never changes the output) becomes all zeros.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    lo = scores.min(axis=0, keepdims=True)
    span = scores.max(axis=0, keepdims=True) - lo
    return np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1.0), 0.0)


def cluster_neurons(features: np.ndarray, threshold: float) -> List[List[int]]:
    """Groups of neuron ids whose pairwise distances are all strictly below `threshold`.

    Groups are ordered by decreasing mean importance (the norm of the normalised scores), and
    neurons inside a group too, so that Step 3 replicates a group's most important neurons
    first. t = 0 gives singletons (hence full replication); a t above the layer's diameter
    gives one group.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 1:
        features = features[:, None]
    n = features.shape[0]
    if n == 0:
        return []
    importance = np.linalg.norm(features, axis=1)
    if n == 1:
        labels = np.array([1])
    else:
        z = linkage(features, method="complete", metric="euclidean")
        # fcluster keeps merges whose cophenetic distance is <= its argument; the paper merges
        # only while d_max < t, hence the largest float below t (and t = 0 merges nothing).
        labels = fcluster(z, np.nextafter(threshold, -np.inf), criterion="distance") \
            if threshold > 0 else np.arange(1, n + 1)
    groups: List[List[int]] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(-importance[members], kind="stable")]
        groups.append([int(m) for m in members])
    groups.sort(key=lambda g: (-float(np.mean(importance[g])), g[0]))
    return groups


def replicate_and_deal(groups: Sequence[Sequence[int]], n_devices: int) -> Assignment:
    """Algorithm 1 Step 3: pad each group to a multiple of N with replicas, deal round-robin.

    The j-th replica copies the group's j-th neuron (cycling when the group is smaller than the
    padding), and neuron j of the padded group goes to device j mod N. A replica never lands on
    a device that already holds that neuron (the padded length is below |G| + N).
    """
    if n_devices < 1:
        raise ValueError(f"devices must be >= 1, got {n_devices}")
    devices: Assignment = [[] for _ in range(n_devices)]
    for group in groups:
        padded = list(group)
        short = (-len(group)) % n_devices
        padded += [group[j % len(group)] for j in range(short)]
        for j, neuron in enumerate(padded):
            devices[j % n_devices].append(int(neuron))
    return devices


def lop_assignment(n_neurons: int, n_devices: int) -> Assignment:
    """Equal contiguous split, no copies (DeeperThings' layer output partitioning)."""
    bounds = [(d * n_neurons) // n_devices for d in range(n_devices + 1)]
    return [list(range(bounds[d], bounds[d + 1])) for d in range(n_devices)]


def nmr_assignment(n_neurons: int, n_devices: int) -> Assignment:
    """N-modular redundancy: every neuron on every device (DMR/TMR/QMR)."""
    return [list(range(n_neurons)) for _ in range(n_devices)]


@dataclass(frozen=True)
class CdcLayout:
    """Coded distributed computing over N devices: N−1 data devices and one parity device.

    Data device d computes neurons [d·k, min((d+1)·k, C)) with k = ceil(C / (N−1)). Parity row j
    is the sum of neuron j of every data device (`members[j]`), so one lost slice is
    recovered by subtraction (CDC paper Eq. 1–2). Parity rows get the neuron ids C..C+k−1 so
    that they travel and are gathered like any other neuron.
    """

    data: Assignment
    parity_device: int
    members: Tuple[Tuple[int, ...], ...]

    @property
    def rows(self) -> int:
        return len(self.members)


def cdc_layout(n_neurons: int, n_devices: int) -> CdcLayout:
    if n_devices < 2:
        raise ValueError(f"cdc needs at least 2 devices (N-1 data + 1 parity), got {n_devices}")
    n_data = n_devices - 1
    k = -(-n_neurons // n_data)
    data = [list(range(d * k, min((d + 1) * k, n_neurons))) for d in range(n_data)]
    members = tuple(tuple(d * k + j for d in range(n_data) if d * k + j < n_neurons) for j in range(k))
    return CdcLayout(data=data + [[]], parity_device=n_data, members=members)


def replication_factor(assignment: Assignment, n_neurons: int) -> float:
    """Neuron copies ÷ neurons (1.0 for lop, N for nmr)."""
    return sum(len(a) for a in assignment) / max(n_neurons, 1)


def covered(assignment: Assignment, alive: Sequence[int]) -> np.ndarray:
    """Boolean mask of the neurons that at least one alive device computes."""
    n = 1 + max((max(a) for a in assignment if a), default=-1)
    mask = np.zeros(n, dtype=bool)
    for d in alive:
        mask[assignment[d]] = True
    return mask


def shuffled_groups(groups: Sequence[Sequence[int]], seed: int) -> List[List[int]]:
    """Groups of the same sizes, in the same order, filled with neurons drawn at random.

    `--method random`: replicate_and_deal of these gives exactly robust's replication and
    per-device memory, with the choice of which neurons are copied blind to importance, so
    that comparing the two measures what the importance scores earn.
    """
    neurons = [n for g in groups for n in g]
    rng = np.random.default_rng(seed)
    order = [int(n) for n in rng.permutation(neurons)]
    out, start = [], 0
    for g in groups:
        out.append(order[start: start + len(g)])
        start += len(g)
    return out


def uniform_groups(n_neurons: int, n_groups: int, n_devices: int, seed: int) -> List[List[int]]:
    """`--method uniform`: n_groups groups of near-equal size over a random permutation.

    replicate_and_deal gives each group one row on every device, so a layer costs n_groups rows
    per device and holds N * n_groups copies: every neuron gets N // size copies or one more,
    whichever neurons the draw puts together. The replication a budget allows, spread evenly and
    blind to importance: what a plan without scores would do with the same memory.
    """
    least = -(-n_neurons // n_devices)
    if not least <= n_groups <= n_neurons:
        raise ValueError(f"{n_neurons} neurons on {n_devices} devices need {least}..{n_neurons} groups, "
                         f"got {n_groups}")
    order = [int(n) for n in np.random.default_rng(seed).permutation(n_neurons)]
    size, bigger = divmod(n_neurons, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        end = start + size + (1 if g < bigger else 0)
        out.append(order[start:end])
        start = end
    return out


@dataclass(frozen=True)
class RotatedParity:
    """Parity rows over the neurons that have a single copy (robust+cdc).

    Row j sums `members[j]`, neurons of distinct devices, and is computed by `devices[j]`, a
    device that holds none of them. So any one failed device loses at most one member of each
    row, and every row it does not hold recovers that member: one failure is exact.
    """

    members: Tuple[Tuple[int, ...], ...]
    devices: Tuple[int, ...]


def rotated_parity(assignment: Assignment, n_neurons: int,
                   weights: Optional[Sequence[float]] = None) -> RotatedParity:
    """Parity rows for the single-copy neurons of `assignment`, spread over the devices.

    Each row takes the next single-copy neuron of every device but one, the device that
    computes the row: the device with the fewest single-copy neurons left (then the fewest
    parity rows so far), so that rows span N−1 devices while they can and parity rows spread
    like RAID 5's. Neurons keep their order on each device (robust deals the important first).

    `weights` (devices' relative speeds, unequal): the row goes to the device that would finish
    its work (its rows, data and parity, over its weight) soonest, then the one with the fewest
    single copies left; equal weights are the rule above exactly.
    """
    n_devices = len(assignment)
    copies = np.zeros(n_neurons, dtype=np.int64)
    for ids in assignment:
        np.add.at(copies, np.asarray(ids, dtype=np.int64), 1)
    queues = [[n for n in ids if copies[n] == 1] for ids in assignment]
    heads = [0] * n_devices
    rows_per_device = [0] * n_devices
    members: List[Tuple[int, ...]] = []
    devices: List[int] = []
    if n_devices < 2:
        return RotatedParity((), ())
    by_speed = weights is not None and len(set(weights)) > 1

    def key(d: int, left: Sequence[int]):
        if by_speed:
            return (len(assignment[d]) + rows_per_device[d] + 1) / weights[d], left[d], d
        return left[d], rows_per_device[d], d

    while any(heads[d] < len(queues[d]) for d in range(n_devices)):
        left = [len(queues[d]) - heads[d] for d in range(n_devices)]
        # A row needs a member: when one device alone has singles left, another computes it
        # (by the fewest-left rule that is so anyway).
        holding = [d for d in range(n_devices) if left[d]]
        candidates = [d for d in range(n_devices) if d != holding[0]] if len(holding) == 1 else range(n_devices)
        parity = min(candidates, key=lambda d: key(d, left))
        row = []
        for d in range(n_devices):
            if d != parity and heads[d] < len(queues[d]):
                row.append(queues[d][heads[d]])
                heads[d] += 1
        members.append(tuple(row))
        devices.append(parity)
        rows_per_device[parity] += 1
    return RotatedParity(tuple(members), tuple(devices))
