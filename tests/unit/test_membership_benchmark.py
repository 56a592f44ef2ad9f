"""benchmarks/membership.py: plans with robust's groups' sizes whose members are chosen by s3
rank. The plans must differ from robust only in which neurons get the copies."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def membership(load_benchmark):
    return load_benchmark("membership")


def test_ranked_members_put_the_highest_scores_in_the_smallest_groups(membership):
    groups = [[0, 1, 2, 3, 4], [5], [6, 7]]
    importance = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.0, 0.2, 0.8])
    best = membership.ranked_members(groups, importance, worst=False)
    assert [len(g) for g in best] == [5, 1, 2]                 # the sizes, in their order
    assert best[1] == [0] and sorted(best[2]) == [4, 7]          # the top one alone, the next two paired
    assert sorted(best[0]) == [1, 2, 3, 5, 6]
    worst = membership.ranked_members(groups, importance, worst=True)
    assert worst[1] == [5] and sorted(worst[2]) == [1, 6]        # the least important get the copies
    assert sorted(worst[0]) == [0, 2, 3, 4, 7]


def test_refilled_plans_keep_robusts_memory_and_order_copies_by_s3(membership, tmp_path):
    from robustdice.partitioner.core.partition import DEFAULT_SCORES, PartitionRequest, partition
    from robustdice.partitioner.core.plan import load_plan
    from robustdice.partitioner.core.scores import compute_scores
    from robustdice.partitioner.core.stages import trace_stages
    from robustdice.partitioner.zoo.data import calibration_batch
    from robustdice.partitioner.zoo.models import build_model

    staged = trace_stages(build_model("digits_cnn", "DEFAULT"))
    scores = compute_scores(staged, calibration_batch("digits_cnn", n=64, seed=0), list(DEFAULT_SCORES),
                            show_progress=False)
    robust = partition(PartitionRequest(model="digits_cnn", devices=4, method="robust", out=tmp_path / "robust",
                                        replication=2.0, show_progress=False), scores=scores)
    plans = {"robust": load_plan(tmp_path / "robust")}
    for name in ("best", "worst"):
        summary = membership.refilled_plan("digits_cnn", staged, scores, tmp_path / "robust", tmp_path / name,
                                           "zero", worst=name == "worst")
        assert summary["per_device_param_bytes"] == robust["per_device_param_bytes"]
        plans[name] = load_plan(tmp_path / name)
    changed = 0
    for r, b, w in zip(*(plans[n].stages for n in ("robust", "best", "worst"))):
        copies = {n: np.bincount([m for a in p.assignment for m in a], minlength=r.neurons)
                  for n, p in (("robust", r), ("best", b), ("worst", w))}
        for n, p in (("best", b), ("worst", w)):   # the same copies per layer, the same rows per device
            assert sorted(copies[n]) == sorted(copies["robust"])
            assert [len(a) for a in p.assignment] == [len(a) for a in r.assignment]
        s3 = scores[r.name][:, list(DEFAULT_SCORES).index("s3")]
        order = np.argsort(-s3, kind="stable")
        assert np.all(np.diff(copies["best"][order]) <= 0)     # more s3, never fewer copies
        assert np.all(np.diff(copies["worst"][order]) >= 0)
        changed += int(not np.array_equal(copies["best"], copies["robust"]))
    assert changed > 0      # robust's clusters are not already the s3 ranking
