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
