"""Per-layer thresholds under a budget (budget.py): the candidate plans, their expected loss, and
the choice, checked against brute force and against cluster.py's own clustering."""
import itertools

import numpy as np
import pytest

from robustdice.partitioner.core.budget import (CANDIDATE_THRESHOLDS, Option, _groups_for_thresholds, choose,
                                                expected_loss, layer_options)
from robustdice.partitioner.core.cluster import cluster_neurons, lop_assignment, nmr_assignment
from robustdice.partitioner.core.plan import ParityPlan, StagePlan
from robustdice.partitioner.errors import PartitionerError


def test_groups_for_thresholds_are_cluster_neurons():
    f = np.random.default_rng(0).random((45, 3))
    ts = [0.0, 0.05, 0.2, 0.7, 4.0]
    for t, groups in zip(ts, _groups_for_thresholds(f, ts)):
        assert groups == cluster_neurons(f, t)


def test_expected_loss_is_the_mean_lost_importance_per_k():
    imp = np.arange(1.0, 9.0)  # 8 neurons
    assert expected_loss(nmr_assignment(8, 4), 8, imp) == 0.0
    lop = lop_assignment(8, 4)   # each device 2 neurons: k failed lose k/4 of the importance
    assert expected_loss(lop, 8, imp) == pytest.approx(imp.sum() * (1 + 2 + 3) / 4)


def test_expected_loss_follows_stage_plan_lost_with_parity():
    assignment = [[0, 1], [2, 3], [4], [5]]
    members, devices = ((0, 2, 4), (1, 3, 5)), (3, 2)
    imp = np.array([1.0, 2, 4, 8, 16, 32])
    sp = StagePlan("x", "conv", 6, 1, (), tuple(map(tuple, assignment)), ParityPlan(3, members, devices))
    expected = 0.0
    for k in range(1, 4):
        sets = list(itertools.combinations(range(4), k))
        expected += sum(imp[sp.lost(f)].sum() for f in sets) / len(sets)
    assert expected_loss(assignment, 6, imp, members, devices) == pytest.approx(expected)


def test_layer_options_span_lop_to_full_replication_and_trade_cost_for_loss():
    f = np.random.default_rng(1).random((32, 2))
    opts = layer_options(f, np.linalg.norm(f, axis=1), 4, "robust", row_cost=1.0, parity_row_cost=1.0)
    costs = [o.cost for o in opts]
    assert costs == sorted(costs) and costs[-1] == 4 * 32 and costs[0] < 2 * 32
    assert opts[-1].loss == 0.0 and opts[0].loss > 0
    hybrid = layer_options(f, np.linalg.norm(f, axis=1), 4, "robust+cdc", 1.0, 1.0)
    # parity makes every single failure exact: no option loses anything at k = 1
    for o in hybrid:
        for d in range(4):
            assert expected_loss(o.assignment, 32, np.ones(32), o.parity_members, o.parity_devices) >= 0
            alive = [i for i in range(4) if i != d]
            held = {n for i in alive for n in o.assignment[i]}
            lost = set(range(32)) - held
            for row, dev in zip(o.parity_members, o.parity_devices):
                gone = [m for m in row if m in lost]
                if dev != d and len(gone) == 1:
                    lost.discard(gone[0])
            assert not lost


def _opt(cost, loss):
    return Option(0.0, [], (), (), float(cost), float(loss))


def test_choose_matches_brute_force():
    rng = np.random.default_rng(2)
    layers = []
    for _ in range(4):
        costs = np.sort(rng.integers(1, 20, 5))
        losses = np.sort(rng.random(5))[::-1]
        layers.append([_opt(c, l) for c, l in zip(costs, losses)])
    cheapest = sum(layer[0].cost for layer in layers)
    dearest = sum(layer[-1].cost for layer in layers)
    for budget in np.linspace(cheapest, dearest, 7):
        best = min((sum(layers[i][j].loss for i, j in enumerate(sel)), sel)
                   for sel in itertools.product(range(5), repeat=4)
                   if sum(layers[i][j].cost for i, j in enumerate(sel)) <= budget)
        got = choose(layers, budget)
        assert sum(layers[i][j].cost for i, j in enumerate(got)) <= budget
        # the relaxation plus greedy may miss the optimum slightly; never by much here
        assert sum(layers[i][j].loss for i, j in enumerate(got)) <= best[0] + 0.15


def test_choose_refuses_a_budget_below_the_cheapest_plan():
    with pytest.raises(PartitionerError, match="below the cheapest"):
        choose([[_opt(5, 1)], [_opt(5, 1)]], 9)


def test_candidate_thresholds_start_at_zero_and_end_above_any_diameter():
    assert CANDIDATE_THRESHOLDS[0] == 0.0
    assert CANDIDATE_THRESHOLDS[-1] > np.sqrt(3)  # three scores in [0, 1]: diameter <= √3


def test_budget_costs_count_the_statistics_of_only_the_failed_sets_max_failed_keeps():
    from robustdice.partitioner.core.budget import budget_costs
    from robustdice.partitioner.core.partition import PartitionRequest
    from robustdice.partitioner.core.stages import trace_stages
    from robustdice.partitioner.zoo.models import build_model

    staged = trace_stages(build_model("digits_cnn", "DEFAULT"))

    def rows(**extra):
        return budget_costs(staged, PartitionRequest("digits_cnn", 4, "robust", "unused", fill="mean+bn",
                                                     budget_mb=1.0, **extra)).rows

    every, bounded = rows(), rows(max_failed=1)
    # a BatchNorm row keeps a mean and a variance (float32) per failed set its device survives:
    # of 14 sets, 7 without device 0; of the 4 single ones, 3
    bn = [sum(1 for f in s.followers if f.behaviour == "batchnorm") for s in staged.stages]
    assert any(bn)
    assert [a - b for a, b in zip(every, bounded)] == [2 * 4 * (7 - 3) * k for k in bn]
