"""The default plan's choice (choose.py): scores per k, weights, the pick and its line, pure."""
import pytest

from robustdice.partitioner.core.choose import CANDIDATES, by_k, check_weights, choice_line, pick, weighted_score
from robustdice.partitioner.errors import PartitionerError

# Two candidates that differ as robust and robust+cdc do on fashion_vgg: the hybrid exact at one
# failure, robust better beyond.
ROBUST = {1: 0.997, 2: 0.964, 3: 0.730}
HYBRID = {1: 1.000, 2: 0.945, 3: 0.490}


def test_by_k_averages_the_sets_of_each_size():
    got = by_k({(0,): 1.0, (1,): 0.5, (0, 1): 0.25, (0, 2): 0.75, (1, 2): 0.5})
    assert got == {1: 0.75, 2: 0.5}


def test_weighted_score_averages_over_k_with_the_weights():
    assert weighted_score(ROBUST, [1, 1, 1]) == pytest.approx((0.997 + 0.964 + 0.730) / 3)
    assert weighted_score(ROBUST, [2, 0, 1]) == pytest.approx((2 * 0.997 + 0.730) / 3)


def test_the_pick_follows_the_scores_and_the_weights():
    alike = [weighted_score(ROBUST, [1, 1, 1]), weighted_score(HYBRID, [1, 1, 1])]
    assert pick(alike) == 0
    only_one_failure = [weighted_score(ROBUST, [1, 0, 0]), weighted_score(HYBRID, [1, 0, 0])]
    assert pick(only_one_failure) == 1
    assert pick([0.5, 0.9, 0.7]) == 1
    assert pick([0.8, 0.8]) == 0          # a tie: the earlier candidate
    assert pick([None, 0.1]) == 1         # one did not fit the memory
    with pytest.raises(PartitionerError):
        pick([None, None])


def test_weights_one_per_k_never_negative_nor_all_zero():
    assert check_weights(None, 3) == [1.0, 1.0, 1.0]
    assert check_weights([0, 2], 2) == [0.0, 2.0]
    for bad, words in (([1, 1], "give one per k = 1..3"), ([1, -1, 1], ">= 0"), ([0, 0, 0], "not all zero"),
                       ([float("nan"), 1, 1], ">= 0")):
        with pytest.raises(PartitionerError, match="--weigh-k") as err:
            check_weights(bad, 3)
        assert words in str(err.value)


def test_candidates_include_robust_and_robust_plus_cdc_with_mean_bn():
    assert {(c.method, c.fill) for c in CANDIDATES} >= {("robust", "mean+bn"), ("robust+cdc", "mean+bn")}


def _choice(chosen, weights=(1.0, 1.0, 1.0), skipped=False):
    cands = []
    for name, per_k in (("robust mean+bn", ROBUST), ("robust+cdc mean+bn", HYBRID)):
        c = {"name": name, "agreement_by_k": {str(k): v for k, v in per_k.items()},
             "score": weighted_score(per_k, weights)}
        if skipped and name != chosen:
            c = {"name": name, "skipped": "below the cheapest"}
        cands.append(c)
    return {"chosen": chosen, "memory": 0.5, "budget_mb": 1.234, "calibration_images": 256,
            "weigh_k": list(weights), "candidates": cands}


def test_the_line_names_the_winner_its_figures_and_the_runner_up():
    line = choice_line(_choice("robust mean+bn"))
    assert "\n" not in line
    assert line.startswith("default plan: robust mean+bn within 0.5 x NMR's memory (1.23 MB per device)")
    assert "1/2/3 failed 0.997/0.964/0.730 (mean 0.897)" in line
    assert "against robust+cdc mean+bn 1.000/0.945/0.490 (0.812)" in line
    weighted = choice_line(_choice("robust+cdc mean+bn", (1.0, 0.0, 0.0)))
    assert "weighted 1,0,0" in weighted and "against robust mean+bn 0.997/0.964/0.730 (0.997)" in weighted
    assert "against robust+cdc mean+bn, which does not fit" in choice_line(_choice("robust mean+bn", skipped=True))
