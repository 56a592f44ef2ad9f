"""RoCoIn's knowledge assignment (papers/rocoin-paper.txt, Section IV-B and Algorithm 1), as pure
functions of values: no torch, no files.

1. Device grouping: a modified follow-the-leader over the devices' capacity vectors (compute
   speed, memory). A group takes the unassigned device nearest its centroid, while that device
   lies within the similarity threshold and the group's cumulative failure probability (every
   copy lost: the product of its devices' outage probabilities) still exceeds the reliability
   threshold; a device that joins no group leads a new one.
2. Knowledge partition: the final convolution's filters as a graph weighted by their activation
   patterns, cut into one partition per group by normalized cut (spectral clustering on the
   normalized Laplacian: scikit-learn's SpectralClustering with a precomputed affinity).
3. Student assignment: per (group, partition), the best student of a family that fits every
   device of the group, weighed by accuracy over delay; then Kuhn-Munkres
   (scipy's linear_sum_assignment) pairs groups with partitions for the largest total weight.

Without capacities (a capacity file is not read yet) every device has the same speed, memory
and outage probability, and `groups_for_count` chooses the reliability threshold that makes
groups of N // K devices: the default is N // 2 groups of two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from robustdice.partitioner.errors import PartitionerError

# The outage probability of a device whose link was never measured: nominal, and the same for
# every device, so that it only fixes how many copies a group needs (see groups_for_count).
DEFAULT_OUTAGE = 0.1


@dataclass(frozen=True)
class DeviceProfile:
    """What the paper's resource profile says of one device (equal for every device until a
    capacity file is read)."""

    flops_per_s: float = 1.0                  # relative compute speed
    memory_bytes: float = math.inf            # what its student and the head may take
    outage: float = DEFAULT_OUTAGE            # probability that its output does not arrive
    rate_bytes_per_s: float = math.inf        # its link to the device that runs the head


@dataclass(frozen=True)
class StudentOption:
    """One student architecture for one partition: its cost per image."""

    name: str
    flops: int          # multiply-accumulates per image
    param_bytes: int    # parameters and buffers, float32


@dataclass(frozen=True)
class Match:
    """One group's share of the assignment."""

    group: int
    partition: int
    student: str
    meets_requirement: bool   # its parameters reach the partition's required share (constraint 1h)
    weight: float             # accuracy over delay, what Kuhn-Munkres maximised the sum of


# --- 1. device grouping -------------------------------------------------------------------------

def _capacity_vectors(profiles: Sequence[DeviceProfile]) -> np.ndarray:
    """(speed, memory) per device, each divided by its largest finite value, so that the
    Euclidean distance of Eq. (2) weighs both alike; unbounded memory counts as 1."""
    speed = np.array([p.flops_per_s for p in profiles], dtype=float)
    memory = np.array([p.memory_bytes for p in profiles], dtype=float)
    finite = memory[np.isfinite(memory)]
    memory = np.where(np.isfinite(memory), memory / (finite.max() if finite.size else 1.0), 1.0)
    return np.stack([speed / max(speed.max(), 1e-300), memory], axis=1)


def failure_probability(profiles: Sequence[DeviceProfile], group: Sequence[int]) -> float:
    """The chance that every device of `group` fails to deliver (independent outages)."""
    return float(np.prod([profiles[d].outage for d in group]))


def group_devices(profiles: Sequence[DeviceProfile], similarity_threshold: float,
                  failure_threshold: float) -> List[Tuple[int, ...]]:
    """Follow-the-leader grouping (the paper's step 1).

    Leaders are taken in order of decreasing capacity (the paper draws them at random; an order
    keeps plans reproducible). A group takes, one by one, the unassigned device nearest its
    centroid while that device is within `similarity_threshold` of it and the group's failure
    probability is above `failure_threshold`; the centroid is recomputed after each.
    """
    vectors = _capacity_vectors(profiles)
    unassigned = sorted(range(len(profiles)), key=lambda d: (-vectors[d].sum(), d))
    groups: List[Tuple[int, ...]] = []
    while unassigned:
        group = [unassigned.pop(0)]
        centroid = vectors[group].mean(axis=0)
        while failure_probability(profiles, group) > failure_threshold:
            near = [(float(np.linalg.norm(vectors[d] - centroid)), d) for d in unassigned]
            near = [(dist, d) for dist, d in near if dist <= similarity_threshold]
            if not near:
                break
            _, d = min(near)
            group.append(d)
            unassigned.remove(d)
            centroid = vectors[group].mean(axis=0)
        groups.append(tuple(sorted(group)))
    return groups


def groups_for_count(profiles: Sequence[DeviceProfile], count: int,
                     similarity_threshold: float = math.inf) -> List[Tuple[int, ...]]:
    """Exactly `count` groups by the paper's grouping (`--groups K`).

    The reliability threshold is the failure probability of N // K copies of the least
    reliable device, so that with equal devices follow-the-leader makes groups of that size;
    groups beyond `count` (the remainder of N / K, or devices too unlike any group) are merged,
    the least reliable first, into the most similar group (the smallest on a tie); a count not
    reached splits the largest group.
    """
    n = len(profiles)
    if not 1 <= count <= n:
        raise PartitionerError(f"--groups must lie in 1..{n} (the devices), got {count}")
    worst = max(p.outage for p in profiles)
    threshold = worst ** (n // count) * (1 + 1e-9)
    groups = [list(g) for g in group_devices(profiles, similarity_threshold, threshold)]
    vectors = _capacity_vectors(profiles)
    while len(groups) > count:
        weakest = max(range(len(groups)), key=lambda i: (failure_probability(profiles, groups[i]), i))
        lost = groups.pop(weakest)
        centroid = vectors[lost].mean(axis=0)
        into = min(range(len(groups)), key=lambda i: (
            round(float(np.linalg.norm(vectors[groups[i]].mean(axis=0) - centroid)), 12), len(groups[i]), i))
        groups[into] += lost
    while len(groups) < count:
        largest = max(range(len(groups)), key=lambda i: (len(groups[i]), -i))
        groups.append([groups[largest].pop()])
    return sorted(tuple(sorted(g)) for g in groups)


# --- 2. knowledge partition ---------------------------------------------------------------------

def activation_affinity(activity: np.ndarray) -> np.ndarray:
    """The filter graph's weights from `activity` (images x filters, each filter's average
    activity per image): w_ij = sum over images of a_i a_j |a_i - a_j|, NoNN's activation-hub
    rule, which the paper follows ("encourages connections between very important and less
    important filters"). Symmetric, zero diagonal, scaled to a largest weight of 1."""
    a = np.asarray(activity, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise PartitionerError(f"activity must be images x filters, got shape {a.shape}")
    c = a.shape[1]
    w = np.zeros((c, c))
    for start in range(0, a.shape[0], 256):   # images in chunks: (chunk, C, C) stays small
        x = a[start:start + 256]
        w += np.einsum("ni,nj,nij->ij", x, x, np.abs(x[:, :, None] - x[:, None, :]))
    np.fill_diagonal(w, 0.0)
    top = w.max()
    return w / top if top > 0 else w


def partition_filters(affinity: np.ndarray, parts: int, seed: int = 0) -> List[Tuple[int, ...]]:
    """`parts` disjoint sets of filters that cover them all, by normalized cut (spectral
    clustering on the normalized Laplacian, labels discretised as Yu and Shi do), each sorted;
    the partitions ordered by their first filter.

    A filter that is never active has no edge; a faint uniform edge (1e-6 of the largest) keeps
    the graph connected, so that such filters join a partition instead of breaking the cut.
    """
    c = affinity.shape[0]
    if not 1 <= parts <= c:
        raise PartitionerError(f"cannot cut {c} filters into {parts} partitions")
    if parts == 1:
        return [tuple(range(c))]
    from sklearn.cluster import SpectralClustering

    w = np.array(affinity, dtype=np.float64)
    w = w + 1e-6 * max(float(w.max()), 1.0) * (1 - np.eye(c))
    labels = SpectralClustering(n_clusters=parts, affinity="precomputed", assign_labels="discretize",
                                random_state=seed).fit_predict(w)
    out = [tuple(int(i) for i in np.flatnonzero(labels == lab)) for lab in np.unique(labels)]
    while len(out) < parts:   # a label left empty: split the largest partition in two
        out.sort(key=len)
        big = out.pop()
        out += [big[: len(big) // 2], big[len(big) // 2:]]
    return sorted(out)


# --- 3. student assignment ----------------------------------------------------------------------

def choose_student(group: Sequence[int], profiles: Sequence[DeviceProfile], options: Sequence[StudentOption],
                   head_bytes: int, required_bytes: float,
                   output_bytes: int) -> Optional[Tuple[StudentOption, bool, float]]:
    """The student a group runs for one partition, whether it meets the partition's requirement,
    and its weight (accuracy over delay, Eq. 5); None when no student fits the group's memory.

    Accuracy is the paper's ratio of student size to partition size, saturating at 1 when the
    student holds `required_bytes` (constraint 1h). Students that meet it come first and the
    fastest of them wins; if none does, the largest that fits (the most accurate available).
    Delay: its FLOPs at the group's slowest device plus its output over the slowest link.
    """
    memory = min(profiles[d].memory_bytes for d in group)
    speed = min(profiles[d].flops_per_s for d in group)
    rate = min(profiles[d].rate_bytes_per_s for d in group)
    fits = [s for s in options if s.param_bytes + head_bytes <= memory]
    if not fits:
        return None

    def accuracy(s: StudentOption) -> float:
        return min(1.0, s.param_bytes / required_bytes) if required_bytes > 0 else 1.0

    def delay(s: StudentOption) -> float:
        return s.flops / speed + (output_bytes / rate if math.isfinite(rate) else 0.0)

    best = max(accuracy(s) for s in fits)
    chosen = min((s for s in fits if accuracy(s) >= best), key=lambda s: (delay(s), s.param_bytes, s.name))
    return chosen, best >= 1.0, accuracy(chosen) / max(delay(chosen), 1e-300)


def match_groups(groups: Sequence[Sequence[int]], partitions: Sequence[Sequence[int]],
                 profiles: Sequence[DeviceProfile], options: Sequence[Sequence[StudentOption]],
                 head_bytes: int, required_bytes: Sequence[float], output_bytes: Sequence[int]) -> List[Match]:
    """Kuhn-Munkres between groups and partitions (as many of each) on Eq. (5)'s weights;
    `options[p]`, `required_bytes[p]` and `output_bytes[p]` are partition p's. One Match per
    group, in group order. Raises PartitionerError naming a group no student fits."""
    from scipy.optimize import linear_sum_assignment

    k = len(groups)
    if len(partitions) != k:
        raise PartitionerError(f"{k} device groups need {k} partitions, got {len(partitions)}")
    choice = [[choose_student(g, profiles, options[p], head_bytes, required_bytes[p], output_bytes[p])
               for p in range(k)] for g in groups]
    weights = np.array([[c[2] if c is not None else -np.inf for c in row] for row in choice])
    finite = weights[np.isfinite(weights)]
    # Forbidden pairs cost more than every allowed pairing together.
    forbid = -(1.0 + k * (np.abs(finite).max() if finite.size else 1.0)) * 10
    rows, cols = linear_sum_assignment(np.where(np.isfinite(weights), weights, forbid), maximize=True)
    out = []
    for g, p in zip(rows, cols):
        if choice[g][p] is None:
            memory = min(profiles[d].memory_bytes for d in groups[g])
            smallest = min(s.param_bytes for s in options[p]) + head_bytes
            raise PartitionerError(f"no student fits device group {g} (devices {', '.join(map(str, groups[g]))}): "
                                   f"its memory is {memory / 1e6:.4g} MB, the smallest student for partition {p} "
                                   f"({len(partitions[p])} channels) with the head needs {smallest / 1e6:.4g} MB")
        student, meets, weight = choice[g][p]
        out.append(Match(int(g), int(p), student.name, meets, float(weight)))
    return sorted(out, key=lambda m: m.group)
