"""The pure core: complete-linkage clustering, normalisation, replication and the baselines."""
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from robustdice.partitioner.core.cluster import (cdc_layout, cluster_neurons, covered, lop_assignment, nmr_assignment,
                                                 normalise_scores, replicate_and_deal, replication_factor)


def _features(n=40, k=3, seed=0):
    return np.random.default_rng(seed).random((n, k))


def _is_partition(groups, n):
    flat = [m for g in groups for m in g]
    return sorted(flat) == list(range(n))


def test_zero_threshold_gives_singletons():
    f = _features()
    groups = cluster_neurons(f, 0.0)
    assert _is_partition(groups, len(f))
    assert all(len(g) == 1 for g in groups)


def test_threshold_above_the_diameter_gives_one_group():
    f = _features()
    groups = cluster_neurons(f, float(pdist(f).max()) * 1.01)
    assert len(groups) == 1 and sorted(groups[0]) == list(range(len(f)))


def test_duplicate_points_merge_at_any_positive_threshold_but_not_at_zero():
    f = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    assert sorted(map(sorted, cluster_neurons(f, 1e-9))) == [[0, 1], [2]]
    assert len(cluster_neurons(f, 0.0)) == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_complete_linkage_every_pair_in_a_group_is_closer_than_t(seed):
    f = _features(seed=seed)
    d = pdist(f)
    for t in np.linspace(d.min(), d.max(), 7)[1:-1]:
        groups = cluster_neurons(f, t)
        assert _is_partition(groups, len(f))
        # not trivially satisfied: a real clustering, neither all singletons nor one group
        assert len(groups) > 1
        assert any(len(g) > 1 for g in groups)
        for g in groups:
            for a, b in combinations(g, 2):
                assert np.linalg.norm(f[a] - f[b]) < t, (t, a, b)


def test_exact_threshold_distance_does_not_merge():
    f = np.array([[0.0], [1.0]])  # distance exactly 1: the paper merges only while d_max < t
    assert len(cluster_neurons(f, 1.0)) == 2
    assert len(cluster_neurons(f, np.nextafter(1.0, 2.0))) == 1


def test_groups_ordered_by_decreasing_importance():
    f = np.array([[0.0], [0.01], [1.0], [0.99]])
    groups = cluster_neurons(f, 0.1)
    assert groups == [[2, 3], [1, 0]]


def test_normalise_scores_maps_columns_to_unit_interval_and_constants_to_zero():
    raw = np.array([[1.0, 5.0, -2.0], [3.0, 5.0, 0.0], [2.0, 5.0, 6.0]])
    out = normalise_scores(raw)
    np.testing.assert_allclose(out[:, 0], [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(out[:, 1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(out[:, 2], [0.0, 0.25, 1.0])
    assert normalise_scores(np.array([4.0, 2.0])).shape == (2, 1)


@pytest.mark.parametrize("n_devices", [1, 2, 3, 4, 5])
def test_replicate_and_deal_pads_groups_and_deals_evenly(n_devices):
    f = _features(n=23, seed=3)
    groups = cluster_neurons(f, 0.4)
    assert any(len(g) % n_devices for g in groups) or n_devices == 1  # padding is exercised
    devices = replicate_and_deal(groups, n_devices)
    assert len(devices) == n_devices
    for d in devices:
        assert len(d) == len(set(d)), "a device holds the same neuron twice"
    assert set().union(*map(set, devices)) == set(range(23))
    for g in groups:
        padded = -(-len(g) // n_devices) * n_devices
        members = set(g)
        per_device = [sum(1 for m in d if m in members) for d in devices]
        assert per_device == [padded // n_devices] * n_devices
    assert replication_factor(devices, 23) >= 1.0


def test_replication_repeats_the_most_important_neurons_first():
    devices = replicate_and_deal([[7, 3, 9, 1, 5]], 4)  # 5 → 8: copies of 7, 3, 9
    counts = Counter(m for d in devices for m in d)
    assert counts == {7: 2, 3: 2, 9: 2, 1: 1, 5: 1}


@pytest.mark.parametrize("n_devices", [1, 3, 4])
def test_zero_threshold_is_full_replication(n_devices):
    f = _features(n=10)
    devices = replicate_and_deal(cluster_neurons(f, 0.0), n_devices)
    assert all(sorted(d) == list(range(10)) for d in devices)
    assert replication_factor(devices, 10) == n_devices
    assert covered(devices, [n_devices - 1]).all()


@pytest.mark.parametrize("n_neurons,n_devices", [(10, 3), (64, 4), (5, 5), (3, 4), (1, 2)])
def test_lop_is_contiguous_and_equal(n_neurons, n_devices):
    devices = lop_assignment(n_neurons, n_devices)
    assert [m for d in devices for m in d] == list(range(n_neurons))
    sizes = [len(d) for d in devices]
    assert max(sizes) - min(sizes) <= 1
    assert replication_factor(devices, n_neurons) == 1.0
    if n_devices > 1 and n_neurons >= n_devices:
        assert not covered(devices, range(1, n_devices))[devices[0]].any()


def test_nmr_is_everything_everywhere():
    devices = nmr_assignment(7, 3)
    assert devices == [list(range(7))] * 3
    assert replication_factor(devices, 7) == 3.0


@pytest.mark.parametrize("n_neurons,n_devices", [(10, 4), (9, 4), (64, 2), (5, 5), (2, 4)])
def test_cdc_layout_data_is_contiguous_and_parity_sums_rows(n_neurons, n_devices):
    layout = cdc_layout(n_neurons, n_devices)
    data = layout.data[: n_devices - 1]
    assert layout.parity_device == n_devices - 1
    assert layout.data[layout.parity_device] == []
    assert [m for d in data for m in d] == list(range(n_neurons))
    for d in data:
        assert d == list(range(d[0], d[-1] + 1)) if d else True
    # parity row j = neuron j of every data device that has a j-th neuron
    assert layout.rows == max(len(d) for d in data)
    for j, members in enumerate(layout.members):
        assert list(members) == [d[j] for d in data if len(d) > j]
    assert Counter(m for row in layout.members for m in row) == Counter(range(n_neurons))


@pytest.mark.parametrize("call", [
    lambda: cluster_neurons(_features(), -0.1),
    lambda: replicate_and_deal([[0, 1]], 0),
    lambda: cdc_layout(8, 1),
])
def test_invalid_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


# --- robust+cdc's rotated parity and random's shuffled groups ----------------------------------

from robustdice.partitioner.core.cluster import rotated_parity, shuffled_groups  # noqa: E402


@pytest.mark.parametrize("n_devices,t", [(2, 0.3), (3, 0.2), (4, 0.1), (4, 10.0), (5, 0.15)])
def test_rotated_parity_covers_every_single_copy_once_and_recovers_any_one_device(n_devices, t):
    f = _features(n=61, seed=n_devices)
    assignment = replicate_and_deal(cluster_neurons(f, t), n_devices)
    copies = Counter(n for ids in assignment for n in ids)
    rp = rotated_parity(assignment, len(f))
    singles = sorted(n for n, c in copies.items() if c == 1)
    assert sorted(m for row in rp.members for m in row) == singles
    owner = {n: d for d, ids in enumerate(assignment) for n in ids if copies[n] == 1}
    for row, device in zip(rp.members, rp.devices):
        devices = [owner[m] for m in row]
        assert len(set(devices)) == len(devices) and device not in devices
    for failed in range(n_devices):  # every lost single copy sits in a row whose parity survives
        for row, device in zip(rp.members, rp.devices):
            if any(owner[m] == failed for m in row):
                assert device != failed
    if len(singles) >= n_devices * (n_devices - 1):  # parity rows spread like RAID 5's
        per_device = Counter(rp.devices)
        assert max(per_device.values()) - min(per_device.values()) <= 1


def test_rotated_parity_of_full_replication_is_empty():
    rp = rotated_parity(nmr_assignment(7, 3), 7)
    assert rp.members == () and rp.devices == ()


def test_shuffled_groups_keep_sizes_and_order_and_change_members():
    groups = cluster_neurons(_features(n=50), 0.3)
    shuffled = shuffled_groups(groups, seed=3)
    assert [len(g) for g in shuffled] == [len(g) for g in groups]
    assert _is_partition(shuffled, 50)
    assert shuffled != groups
    assert shuffled_groups(groups, seed=3) == shuffled


def test_uniform_groups_spread_copies_evenly_over_random_neurons():
    from robustdice.partitioner.core.cluster import replicate_and_deal, uniform_groups
    n, devices = 30, 4
    for n_groups in (8, 11, 15, 22, 30):
        groups = uniform_groups(n, n_groups, devices, seed=5)
        assert sorted(m for g in groups for m in g) == list(range(n))
        assert len(groups) == n_groups and max(map(len, groups)) - min(map(len, groups)) <= 1
        assignment = replicate_and_deal(groups, devices)
        assert [len(a) for a in assignment] == [n_groups] * devices   # one row per group on every device
        copies = np.bincount([m for a in assignment for m in a], minlength=n)
        assert copies.sum() == devices * n_groups      # replication N * groups / neurons, exactly
        for g in groups:   # a group's N slots shared out evenly: N // size copies, or one more
            assert all(devices // len(g) <= copies[m] <= devices // len(g) + 1 for m in g)
        assert all(len(set(a)) == len(a) for a in assignment)        # never two copies on one device
    # 15 groups of 2: every neuron on exactly 2 devices, whichever neurons the seed pairs
    pairs = replicate_and_deal(uniform_groups(n, 15, devices, seed=1), devices)
    assert set(np.bincount([m for a in pairs for m in a]).tolist()) == {2}
    assert uniform_groups(n, 15, devices, seed=1) != uniform_groups(n, 15, devices, seed=2)
    assert uniform_groups(n, 15, devices, seed=1) == uniform_groups(n, 15, devices, seed=1)
    assert uniform_groups(n, 15, devices, seed=1) != [[2 * i, 2 * i + 1] for i in range(15)]
    for bad in (7, 31):   # fewer groups than ceil(30 / 4) would need groups above N; more than neurons
        with pytest.raises(ValueError, match="8..30 groups"):
            uniform_groups(n, bad, devices, seed=0)


def test_uniform_counts_round_each_layer_to_the_nearest_within_its_bounds():
    """A small layer must not lose a whole row of copies to rounding: at rho 0.45 a classifier's 10
    outputs get 5 groups (pairs: every output on 2 devices), where rounding down gave 4 and left
    some outputs on one device only."""
    from robustdice.partitioner.core.budget import uniform_counts
    from robustdice.partitioner.core.cluster import replicate_and_deal, uniform_groups
    assert uniform_counts([10, 64, 128], 0.45, 4) == [5, 29, 58]     # 4.5, 28.8, 57.6 to the nearest
    assert uniform_counts([10, 64], 0.44, 4) == [4, 28]
    assert uniform_counts([10, 64, 7], 0.0, 4) == [3, 16, 2]         # never below ceil(size / N)
    assert uniform_counts([10, 64], 1.7, 4) == [10, 64]              # never above one group per neuron
    groups = uniform_groups(10, uniform_counts([10], 0.45, 4)[0], 4, seed=0)
    copies = np.bincount([m for a in replicate_and_deal(groups, 4) for m in a], minlength=10)
    assert copies.min() == 2
