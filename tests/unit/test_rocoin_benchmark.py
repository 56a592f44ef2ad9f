"""benchmarks/robustness.py's rocoin rows: where they appear in the table, and how rocoin is
judged against robust (no training here: rows are values)."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def robustness(load_benchmark):
    return load_benchmark("robustness")


def row(name, method, fill, means, **extra):
    by_failed = {str(k): {"mean": m, "min": m, "max": m, "sets": 1} for k, m in enumerate(means)}
    return {"name": name, "method": method, "fill": fill, "by_failed": by_failed, **extra}


def test_rocoin_has_a_row_per_fill_outside_the_budget(robustness):
    rows = robustness.configurations("fashion_vgg", True, methods=robustness.DEFAULT_METHODS, rocoin_here=True)
    rocoin = [r for r in rows if r[1] == "rocoin"]
    assert [(r[0], r[2], r[3], r[4]) for r in rocoin] == [("rocoin/zero", "zero", None, False),
                                                          ("rocoin/mean", "mean", None, False)]
    assert not any(r[0].startswith("rocoin@") for r in rows)   # it is not sized by the budget
    assert "rocoin" in robustness.DEFAULT_METHODS
    # without training data (efficientnet_lite0) there are no students to distil
    assert not any(r[1] == "rocoin" for r in robustness.configurations("efficientnet_lite0", False,
                                                                       methods=robustness.DEFAULT_METHODS))


def test_rocoin_is_judged_against_robust_and_robust_fine_tuned(robustness):
    result = {"samples": 2000, "budget_ratio": 0.5, "rows": [
        row("robust@0.5/mean+bn", "robust", "mean+bn", [0.945, 0.94, 0.91, 0.74], budget_ratio=0.5),
        row("robust@0.5/mean+bn/finetuned", "robust", "mean+bn", [0.946, 0.944, 0.941, 0.934], budget_ratio=0.5,
            finetuned=True),
        row("rocoin/mean", "rocoin", "mean", [0.92, 0.92, 0.88, 0.60], budget_ratio=None),
    ]}
    v = robustness.versus_rocoin(result)
    assert list(v) == ["mean"] and set(v["mean"]) == {"robust mean+bn", "robust mean+bn fine-tuned"}
    assert v["mean"]["robust mean+bn"]["1"]["difference"] == pytest.approx(-0.02)
    assert v["mean"]["robust mean+bn"]["3"]["verdict"] == "loses"
    assert v["mean"]["robust mean+bn fine-tuned"]["3"]["difference"] == pytest.approx(-0.334)
    # paired when both rows' per-image shares are known: the same images, their differences' error
    ones = {k: np.ones(2000) for k in "123"}
    paired = robustness.versus_rocoin(result, {("rocoin", "mean"): ones, ("robust", "mean+bn"): ones})
    assert paired["mean"]["robust mean+bn"]["2"]["error"] == "paired"
    assert paired["mean"]["robust mean+bn fine-tuned"]["2"]["error"] == "binomial"
    lines = robustness.verdict_lines({"versus_random": {}, "versus_rocoin": v})
    assert any(line.startswith("  rocoin - robust mean+bn (mean): 1: -2.0") for line in lines)


def test_a_row_says_how_many_gathers_a_frame_costs(robustness):
    text = robustness.format_row(row("rocoin/mean", "rocoin", "mean", [0.9] * 4, memory_ratio=0.3,
                                     per_device_mb=0.37, replication=2.0, gathers_per_frame=1))
    assert "rep 2.00, 1 gather |" in text


def test_a_rocoin_row_reports_every_failed_set_and_the_sets_that_leave_each_group_a_member(robustness):
    from robustdice.partitioner.core.plan import RocoinGroup, RocoinSpec
    spec = RocoinSpec("features.9", (8, 1, 1), (RocoinGroup((0, 2), (0, 1, 2, 3), "a", "x"),
                                                 RocoinGroup((1, 3), (4, 5, 6, 7), "b", "y")), {}, {})
    by_set = {"-": 0.93, "0": 0.93, "1": 0.93, "2": 0.93, "3": 0.93, "0,1": 0.93, "0,2": 0.70, "0,3": 0.92,
              "1,2": 0.93, "1,3": 0.60, "2,3": 0.93, "0,1,2": 0.65, "0,1,3": 0.55, "0,2,3": 0.66, "1,2,3": 0.58}
    got = robustness.rocoin_sets(spec, by_set)
    assert got["groups"] == [[0, 2], [1, 3]] and got["by_set"] == by_set
    # no failure, each single failure and the four pairs with one device of each group
    assert got["every_group_served"]["sets"] == 9
    assert got["every_group_served"]["mean"] == pytest.approx((0.93 * 8 + 0.92) / 9)
    assert got["every_group_served"]["min"] == 0.92
