"""`robustdice partition` with no method, fill or budget: the default plan (choose.py), through
the real CLI on digits_cnn, and explicit flags that keep the behaviour they had before it."""
import pytest

from robustdice.partitioner.core.choose import CANDIDATES, default_plan, pick
from robustdice.partitioner.core.fill import failed_sets
from robustdice.partitioner.core.partition import PartitionRequest, partition
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.errors import PartitionerError
from test_partition_cli import _assert_one_line_error as one_line_error, robustdice
from test_partition_cli import ok_json as _ok_json

DEVICES = 4


def ok_json(*args):
    return _ok_json(*args, "--json")


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "plan"
    return out, ok_json("partition", "--model", "digits_cnn", "--devices", DEVICES, "--out", out)


def test_the_default_keeps_the_candidate_with_the_highest_score(default):
    out, summary = default
    choice = summary["choice"]
    assert [c["name"] for c in choice["candidates"]] == [c.name for c in CANDIDATES]
    scores = [c["score"] for c in choice["candidates"]]
    won = choice["candidates"][pick(scores)]
    assert choice["chosen"] == won["name"]
    plan = load_plan(out)
    assert (plan.method, plan.fill.rule) == (won["method"], won["fill"]) == (summary["method"], summary["fill"])
    assert plan.plan_hash == summary["plan_hash"] and summary["plan"] == str(out)
    assert list(plan.fill.sets) == failed_sets(DEVICES)
    # scored over every failed set up to N - 1, alike, on calibration images
    assert choice["max_failed"] == DEVICES - 1 and choice["weigh_k"] == [1.0] * (DEVICES - 1)
    for c in choice["candidates"]:
        assert set(c["agreement_by_k"]) == {"1", "2", "3"} and all(0 <= v <= 1 for v in c["agreement_by_k"].values())
    # within half of NMR's per-device memory
    assert choice["memory"] == 0.5
    assert max(summary["per_device_param_bytes"]) <= choice["budget_mb"] * 1e6 == 0.5 * choice["nmr_per_device_bytes"]
    assert choice["line"].startswith(f"default plan: {won['name']} within 0.5 x NMR's memory")
    assert [p.name for p in out.parent.iterdir()] == [out.name]   # only the winner is written


def test_the_default_is_its_explicit_flags(default, tmp_path):
    out, summary = default
    choice = summary["choice"]
    assert choice["same_as"] == f"--method {summary['method']} --fill {summary['fill']} --budget-mb {choice['budget_mb']!r}"
    by_memory = tmp_path / "memory"
    ok_json("partition", "--model", "digits_cnn", "--devices", DEVICES, "--method", summary["method"],
            "--fill", summary["fill"], "--memory", "0.5", "--out", by_memory)
    assert (by_memory / "plan.json").read_bytes() == (out / "plan.json").read_bytes()


@pytest.mark.parametrize("flags,request_args", [
    (["--paper"], {}),                                   # what `partition` did with no flags
    (["--fill", "mean"], {"fill": "mean"}),
    (["--method", "lop"], {"method": "lop"}),
    (["--threshold", "0.3"], {"threshold": 0.3}),
], ids=["paper", "fill-only", "method-only", "threshold"])
def test_explicit_flags_give_the_plan_they_gave_before(tmp_path, flags, request_args):
    cli = tmp_path / "cli"
    summary = ok_json("partition", "--model", "digits_cnn", "--devices", DEVICES, "--scores", "s1", *flags,
                      "--out", cli)
    assert "choice" not in summary
    api = tmp_path / "api"
    partition(PartitionRequest(**{"model": "digits_cnn", "devices": DEVICES, "method": "robust", "out": api,
                                  "scores": ("s1",), "show_progress": False, **request_args}))
    assert (cli / "plan.json").read_bytes() == (api / "plan.json").read_bytes()


def _fake_agreement(per_method):
    """agreement_by_set that gives every set of k failed devices per_method[method][k - 1]."""
    seen = []

    def agreement_by_set(staged, stages, fill, sets, images, reference):
        seen.append([tuple(f) for f in sets])
        method = "robust+cdc" if any(s.parity is not None for s in stages) else "robust"
        return {tuple(f): per_method[method][len(f) - 1] for f in sets}
    return agreement_by_set, seen


@pytest.mark.parametrize("weigh_k,winner", [(None, "robust"), ((1, 0, 0), "robust+cdc"), ((0, 0, 1), "robust")])
def test_the_choice_follows_the_scores_under_the_weights(tmp_path, monkeypatch, weigh_k, winner):
    fake, seen = _fake_agreement({"robust": (0.9, 0.8, 0.7), "robust+cdc": (1.0, 0.3, 0.2)})
    monkeypatch.setattr("robustdice.partitioner.core.choose.agreement_by_set", fake)
    request = PartitionRequest("digits_cnn", DEVICES, "robust", tmp_path / "plan", scores=("s1",),
                               show_progress=False, fill_calib_size=64)
    summary = default_plan(request, weigh_k=weigh_k)
    assert load_plan(tmp_path / "plan").method == winner == summary["method"]
    assert seen == [failed_sets(DEVICES)] * 2
    scores = {c["method"]: c["score"] for c in summary["choice"]["candidates"]}
    assert scores[winner] == max(scores.values())


def test_max_failed_bounds_the_sets_scored_and_kept(tmp_path, monkeypatch):
    fake, seen = _fake_agreement({"robust": (0.9,), "robust+cdc": (1.0,)})
    monkeypatch.setattr("robustdice.partitioner.core.choose.agreement_by_set", fake)
    request = PartitionRequest("digits_cnn", DEVICES, "robust", tmp_path / "plan", scores=("s1",),
                               show_progress=False, fill_calib_size=64, max_failed=1)
    summary = default_plan(request)
    singles = [(d,) for d in range(DEVICES)]
    assert seen == [singles] * 2
    assert summary["method"] == "robust+cdc" and summary["choice"]["max_failed"] == 1
    assert list(load_plan(tmp_path / "plan").fill.sets) == singles


def test_one_device_takes_the_papers_plan_and_says_so(tmp_path):
    proc = robustdice("partition", "--model", "digits_cnn", "--devices", 1, "--scores", "s1", "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("default plan: one device: nothing can fail")
    assert load_plan(tmp_path / "o").fill.rule == "zero"


@pytest.mark.parametrize("extra,words", [
    (["--paper", "--method", "lop"], ["--paper", "without --method"]),
    (["--paper", "--memory", "0.5"], ["--paper", "without --memory"]),
    (["--method", "robust", "--weigh-k", "1,1,1"], ["--weigh-k", "nothing with --method"]),
    (["--weigh-k", "1,1"], ["--weigh-k gives 2 weights", "k = 1..3"]),
    (["--max-failed", "4"], ["--max-failed", "1..3"]),
    (["--memory", "1.5"], ["--memory", "(0, 1]"]),
    (["--method", "lop", "--memory", "0.5"], ["--memory", "need --method"]),
    (["--memory", "0.05", "--scores", "s1"], ["--memory 0.05", "below every default plan", "larger --memory"]),
], ids=["paper-and-method", "paper-and-memory", "weights-without-default", "weights-per-k", "max-failed-range",
        "memory-range", "memory-of-lop", "memory-too-small"])
def test_bad_default_flags(tmp_path, extra, words):
    proc = robustdice("partition", "--model", "digits_cnn", "--devices", DEVICES, "--out", tmp_path / "o", *extra)
    one_line_error(proc, *words)
    assert not (tmp_path / "o" / "plan.json").exists()


def test_two_devices_raise_the_default_memory_to_the_least_plan_and_say_so(tmp_path):
    # Over 2 devices half of NMR's memory is every neuron once, less than the shared layers need:
    # the default takes the least memory that buys a candidate instead of refusing.
    request = PartitionRequest("digits_cnn", 2, "robust", tmp_path / "plan", scores=("s1",), show_progress=False,
                               fill_calib_size=64)
    summary = default_plan(request, choice_size=32)
    choice = summary["choice"]
    assert choice["memory_raised"]["from"] == 0.5 and choice["memory_raised"]["to"] > 0.5
    assert choice["memory"] == choice["memory_raised"]["to"]
    assert max(summary["per_device_param_bytes"]) <= choice["budget_mb"] * 1e6 * (1 + 1e-9)
    assert "the default 0.5 buys no plan over this many devices" in choice["line"]
    # a memory the user gives is never raised
    with pytest.raises(PartitionerError, match=r"--memory 0.5 .* is below every default plan"):
        default_plan(PartitionRequest("digits_cnn", 2, "robust", tmp_path / "given", scores=("s1",),
                                      show_progress=False, fill_calib_size=64), 0.5, choice_size=32)
