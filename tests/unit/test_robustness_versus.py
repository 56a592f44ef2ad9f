"""benchmarks/robustness.py's verdict on robust against random: a difference counts only beyond
two standard errors (the images' binomial error and the spread of random's draws)."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def robustness():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("robustness_bench", BENCH / "robustness.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def row(method, fill, means, seed_means=None):
    by_failed = {str(k): {"mean": m, "min": m, "max": m, "sets": 1} for k, m in enumerate(means)}
    if seed_means:
        for k, s in seed_means.items():
            by_failed[k]["seed_means"] = s
    return {"method": method, "fill": fill, "budget_ratio": 0.5, "finetuned": False, "by_failed": by_failed}


def test_wins_loses_and_noise_are_told_apart(robustness):
    result = {"samples": 2000, "rows": [
        row("robust", "zero", [0.95, 0.93, 0.88, 0.50]),
        row("random", "zero", [0.95, 0.929, 0.83, 0.56]),
        row("robust", "mean", [0.95, 0.90, 0.90, 0.40]),   # no random row at this fill: no verdict
        row("nmr", "zero", [0.95] * 4) | {"budget_ratio": None},
    ]}
    v = robustness.versus_random(result)
    assert list(v) == ["zero"] and list(v["zero"]) == ["1", "2", "3"]
    assert v["zero"]["1"]["verdict"] == "within noise"      # 0.1 points, SE ~0.8
    assert v["zero"]["2"]["verdict"] == "wins"              # 5 points, SE ~1.1
    assert v["zero"]["3"]["verdict"] == "loses"             # -6 points, SE ~1.6
    assert v["zero"]["2"]["difference"] == pytest.approx(0.05)
    se = (0.88 * 0.12 / 2000 + 0.83 * 0.17 / 2000) ** 0.5
    assert v["zero"]["2"]["standard_error"] == pytest.approx(se)


def test_a_spread_of_random_draws_widens_the_error(robustness):
    steady = {"samples": 2000, "rows": [row("robust", "zero", [0.9, 0.9, 0.85, 0.5]),
                                        row("random", "zero", [0.9, 0.9, 0.82, 0.5],
                                            {"2": [0.82, 0.82, 0.82]})]}
    spread = {"samples": 2000, "rows": [row("robust", "zero", [0.9, 0.9, 0.85, 0.5]),
                                        row("random", "zero", [0.9, 0.9, 0.82, 0.5],
                                            {"2": [0.72, 0.82, 0.92]})]}
    a, b = robustness.versus_random(steady)["zero"]["2"], robustness.versus_random(spread)["zero"]["2"]
    assert a["verdict"] == "wins" and b["verdict"] == "within noise"
    assert b["standard_error"] > 4 * a["standard_error"]


def test_paired_images_judge_a_small_steady_gain(robustness):
    """On the same 2000 images, robust right on 40 more of them and never worse: 2 points, which
    the unpaired error (about 1.3) cannot call and the paired one (about 0.3) can."""
    import numpy as np
    n = 2000
    random_hits = np.zeros(n)
    random_hits[: n // 2] = 1.0
    robust_hits = random_hits.copy()
    robust_hits[n // 2: n // 2 + 40] = 1.0
    per_image = {("robust", "zero"): {k: robust_hits for k in "123"},
                 ("random", "zero"): {k: random_hits for k in "123"}}
    p_robust, p_random = robust_hits.mean(), random_hits.mean()
    result = {"samples": n, "rows": [row("robust", "zero", [1.0] + [p_robust] * 3),
                                     row("random", "zero", [1.0] + [p_random] * 3)]}
    unpaired = robustness.versus_random(result)["zero"]["1"]
    paired = robustness.versus_random(result, per_image)["zero"]["1"]
    assert unpaired["verdict"] == "within noise" and unpaired["error"] == "binomial"
    assert paired["verdict"] == "wins" and paired["error"] == "paired"
    assert paired["difference"] == pytest.approx(0.02)
    assert paired["standard_error"] == pytest.approx(np.std(robust_hits - random_hits, ddof=1) / np.sqrt(n))


def test_per_image_shares_average_sets_and_draws(robustness):
    import numpy as np
    a = {(0,): np.array([True, False]), (1,): np.array([True, True]), (0, 1): np.array([False, False]),
         (): np.array([True, True])}
    b = {(0,): np.array([False, False]), (1,): np.array([True, False]), (0, 1): np.array([True, False]),
         (): np.array([True, True])}
    shares = robustness.by_k_per_image([{"correct_by_set": a}, {"correct_by_set": b}])
    assert shares["1"].tolist() == [0.75, 0.25] and shares["2"].tolist() == [0.5, 0.0]
