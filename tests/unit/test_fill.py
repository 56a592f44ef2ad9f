"""Fill rules (zero, mean, mean+bn) and robust+cdc: the simulation, FrameRun and the masked
whole-model path agree, one failure is exact, and what is exact stays exact.

digits_cnn plans over 4 devices with s1 scores (no scoring batch): cheap, real weights.
"""
import itertools
import math

import pytest
import torch

from robustdice.partitioner.core.fill import (failed_sets, lost_masks, mean_outputs, recalibrated_stats,
                                              reference_stats, run_masked)
from robustdice.partitioner.core.partition import PartitionRequest, default_fill_calib_size, partition
from robustdice.partitioner.core.plan import FillSpec, load_plan
from robustdice.partitioner.core.runtime import Cluster, assemble, shard_path
from robustdice.partitioner.core.stages import trace_stages
from robustdice.partitioner.zoo.data import calibration_batch, evaluation_split
from robustdice.partitioner.zoo.models import build_model

N = 4
ALL_SETS = [f for k in range(N) for f in itertools.combinations(range(N), k)]


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    made = {}

    def get(method, fill, **extra):
        key = (method, fill, tuple(sorted(extra.items())))
        if key not in made:
            out = root / f"{method}-{fill}-{len(made)}"
            partition(PartitionRequest(model="digits_cnn", devices=N, method=method, out=out, fill=fill,
                                       scores=("s1",), show_progress=False, **extra))
            made[key] = out
        return made[key]
    return get


@pytest.fixture(scope="module")
def images():
    return evaluation_split("digits_cnn")[0][:40]


def _frame_runs(cluster, x, failed):
    alive = [d for d in cluster.devices if d.device not in failed]
    runs = [d.start(x) for d in alive]
    done = False
    while not done:
        stage = runs[0].stage
        pieces = [(r.ids, r.slice) for r in runs]
        flags = [r.advance(*assemble(cluster.plan.stages[stage].total_ids, pieces), failed=frozenset(failed))
                 for r in runs]
        assert len(set(flags)) == 1
        done = flags[0]
    return [r.logits for r in runs]


@pytest.mark.parametrize("method,fill", [("robust+cdc", "mean+bn"), ("robust", "mean"), ("cdc", "mean+bn")])
def test_frame_run_with_failed_sets_equals_the_simulation(plans, images, method, fill):
    cluster = Cluster(plans(method, fill))
    with torch.inference_mode():
        for failed in [(1,), (0, 2), (1, 2, 3)]:
            expected = cluster.simulate(images, failed)
            for logits in _frame_runs(cluster, images, failed):
                torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_masked_model_with_recalibrated_statistics_equals_the_simulation(plans, images):
    """The whole-model path (used to measure the statistics and to fine-tune) computes what the
    cluster computes, with the statistics the shards carry."""
    folder = plans("robust", "mean+bn")
    cluster = Cluster(folder)
    plan = cluster.plan
    staged = trace_stages(build_model("digits_cnn", "DEFAULT"))
    calib = calibration_batch("digits_cnn", n=default_fill_calib_size("digits_cnn"), seed=1)
    fills = mean_outputs(staged, calib)
    reference = reference_stats(staged, calib)
    for i, stage in enumerate(cluster.devices[0].entries):
        torch.testing.assert_close(stage["fill"], fills[i])
    with torch.inference_mode():
        for failed in [(), (2,), (0, 3), (0, 1, 2)]:
            stats = recalibrated_stats(staged, plan.stages, calib, fills, failed, reference) if failed else None
            masked = run_masked(staged, plan.stages, images, lost_masks(plan.stages, failed), fills, stats=stats)
            torch.testing.assert_close(masked, cluster.simulate(images, failed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fill", ["zero", "mean", "mean+bn"])
def test_robust_plus_cdc_is_exact_under_any_one_failure(plans, images, fill):
    cluster = Cluster(plans("robust+cdc", fill))
    plan = cluster.plan
    assert any(s.parity is not None and s.parity.row_devices is not None for s in plan.stages)
    with torch.inference_mode():
        reference = cluster.simulate(images)
        for d in range(N):
            assert all(not s.lost((d,)) for s in plan.stages)
            torch.testing.assert_close(cluster.simulate(images, (d,)), reference, rtol=1e-4, atol=1e-4)
        # two failures lose neurons: the fill is what differs between the rules
        assert any(s.lost((0, 1)) for s in plan.stages)


def test_robust_plus_cdc_holds_data_and_parity_rows_on_one_device(plans):
    plan = load_plan(plans("robust+cdc", "zero"))
    both = [(s.name, d) for s in plan.stages if s.parity is not None for d in range(N)
            if s.assignment[d] and s.parity.rows_on(d)]
    assert both, "rotated parity puts parity rows beside data rows"
    for s in plan.stages:
        if s.parity is None:
            continue
        for j, members in enumerate(s.parity.members):
            owners = [next(d for d in range(N) if m in s.assignment[d]) for m in members]
            assert len(set(owners)) == len(owners), "members of a row come from distinct devices"
            assert s.parity.row_device(j) not in owners


def test_zero_mask_of_the_simulation_is_the_plans_lost_set(plans, images):
    for method in ("robust+cdc", "cdc", "robust"):
        cluster = Cluster(plans(method, "zero"))
        for failed in ALL_SETS[1:]:
            masks = {}
            cluster.simulate(images[:2], failed, zero_masks=masks)
            for i, s in enumerate(cluster.plan.stages):
                assert torch.nonzero(masks[i]).flatten().tolist() == s.lost(failed), (method, failed, s.name)


def test_mean_fill_writes_each_lost_neurons_expected_value(plans, images):
    """lop loses device 1's quarter of every stage: the stage output there is the fill value."""
    cluster = Cluster(plans("lop", "mean"))
    staged = cluster.staged
    seen = {}
    original = staged.run

    def capture(x, stage_fn):
        def spy(i, t):
            seen[i] = stage_fn(i, t)
            return seen[i]
        return original(x, spy)
    staged.run = capture
    try:
        cluster.simulate(images, (1,))
    finally:
        staged.run = original
    for i, s in enumerate(cluster.plan.stages):
        lost = s.lost((1,))
        fill = cluster.devices[0].entries[i]["fill"]
        out = seen[i].movedim(s.channel_dim, 0)
        expected = fill[lost].reshape((-1,) + (1,) * (out.dim() - 1)).expand_as(out[lost])
        torch.testing.assert_close(out[lost], expected)
        assert (fill != 0).any()


def test_recalibration_keeps_statistics_before_the_first_loss_and_changes_them_after(plans):
    folder = plans("robust", "mean+bn")
    plan = load_plan(folder)
    assert plan.fill.rule == "mean+bn" and list(plan.fill.sets) == failed_sets(N)
    staged = trace_stages(build_model("digits_cnn", "DEFAULT"))
    calib = calibration_batch("digits_cnn", n=256, seed=1)
    fills = mean_outputs(staged, calib)
    failed = (0, 1)
    first = next(i for i, s in enumerate(plan.stages) if s.lost(failed))
    stats = recalibrated_stats(staged, plan.stages, calib, fills, failed)
    for (i, j), (mean, var) in stats.items():
        bn = staged.stages[i].followers[j].fn
        if i <= first:
            assert torch.equal(mean, bn.running_mean) and torch.equal(var, bn.running_var)
        else:
            assert not torch.allclose(mean, bn.running_mean)


def test_shards_keep_only_the_failed_sets_their_device_survives(plans):
    folder = plans("robust", "mean+bn")
    plan = load_plan(folder)
    shard = torch.load(shard_path(folder, 2), weights_only=True)
    # stage 0's input is the image: no loss reaches it, no recalibrated row
    assert shard["stages"][plan.stages[0].name]["f0.recal_mean"].shape[0] == 0
    entry = shard["stages"][plan.stages[1].name]
    sets = [plan.fill.sets[g] for g in entry["recal_sets"].tolist()]
    assert sets == [f for f in plan.fill.sets if 2 not in f and plan.stages[0].lost(f)]
    assert entry["f0.recal_mean"].shape == (len(sets), len(plan.stages[1].assignment[2]))
    zero = torch.load(shard_path(plans("robust", "zero"), 2), weights_only=True)
    assert "fill" not in zero["stages"][plan.stages[0].name]


def test_fill_spec_selects_recalibrated_rows_by_the_failed_set():
    spec = FillSpec("mean+bn", ((0,), (1,), (0, 1)))
    assert spec.set_index(frozenset({1, 0})) == 2
    assert spec.set_index(()) is None
    assert FillSpec("mean", ((0,),)).set_index({0}) is None


def test_budget_replication_is_met_and_random_matches_robusts_memory(plans):
    robust = load_plan(plans("robust", "zero", replication=2.0))
    random = load_plan(plans("random", "zero", replication=2.0))
    from robustdice.partitioner.core.plan import assignment_summary
    r = assignment_summary(robust.stages, N)["replication_factor"]
    assert 1.5 < r <= 2.0
    assert [s.threshold for s in robust.stages] == [s.threshold for s in random.stages]
    for a, b in zip(robust.stages, random.stages):
        assert [len(x) for x in a.assignment] == [len(x) for x in b.assignment]
    assert any(a.assignment != b.assignment for a, b in zip(robust.stages, random.stages))


def test_plan_json_round_trip_keeps_fill_and_row_devices_and_hashes_them(plans, tmp_path):
    import json

    from robustdice.partitioner.core.plan import plan_from_json
    from robustdice.partitioner.errors import PlanError

    plan = load_plan(plans("robust+cdc", "mean+bn"))
    data = plan.to_json()
    assert data["version"] == 3 and data["fill"]["rule"] == "mean+bn"
    assert plan_from_json(json.loads(json.dumps(data))) == plan
    for edit in (lambda d: d["fill"].update(rule="mean"),
                 lambda d: d["fill"]["sets"].pop(),
                 lambda d: next(s for s in d["stages"] if "parity" in s)["parity"]["row_devices"].reverse()):
        copy = json.loads(json.dumps(data))
        edit(copy)
        with pytest.raises(PlanError, match="plan_hash"):
            plan_from_json(copy)
    bad = json.loads(json.dumps(data))
    next(s for s in bad["stages"] if "parity" in s)["parity"]["row_devices"].append(0)
    with pytest.raises(PlanError, match="row_devices"):
        plan_from_json(bad)
    bad = json.loads(json.dumps(data))
    bad["fill"]["rule"] = "median"
    with pytest.raises(PlanError, match="fill.rule"):
        plan_from_json(bad)


def test_a_version_2_plan_still_loads_as_zero_fill(plans, tmp_path):
    """Plans written before fill rules: version 2, no fill field; their hash covered version 2."""
    import hashlib
    import json

    data = load_plan(plans("lop", "zero")).to_json()
    assert "fill" not in data
    data["version"] = 2
    body = {k: v for k, v in data.items() if k not in ("shards", "plan_hash")}
    data["plan_hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (tmp_path / "plan.json").write_text(json.dumps(data))
    plan = load_plan(tmp_path)
    assert plan.fill == FillSpec() and plan.version == 2 and plan.compute_hash() == data["plan_hash"]


def test_partition_scores_s3_against_the_value_its_fill_puts_in_place(monkeypatch, tmp_path):
    """Under --fill mean a lost neuron becomes its mean, so s3 ablates to that mean (the values
    the shards carry), and under --fill zero to zero, as the paper does."""
    from robustdice.partitioner.core import scores as scores_mod
    seen = {}
    real = scores_mod.compute_scores

    def spy(*args, **kwargs):
        seen[current] = kwargs.get("fill_values")
        return real(*args, **kwargs)
    monkeypatch.setattr(scores_mod, "compute_scores", spy)
    for current in ("zero", "mean"):
        partition(PartitionRequest(model="digits_cnn", devices=N, method="robust", out=tmp_path / current,
                                   fill=current, scores=("s1", "s3"), calib_size=32, fill_calib_size=64,
                                   show_progress=False))
    assert seen["zero"] is None
    staged = trace_stages(build_model("digits_cnn", "DEFAULT"))
    expected = mean_outputs(staged, calibration_batch("digits_cnn", n=64, seed=1))
    assert len(seen["mean"]) == len(expected)
    for got, want in zip(seen["mean"], expected):
        torch.testing.assert_close(got, want)
    shard = torch.load(shard_path(tmp_path / "mean", 0), weights_only=True)
    name = staged.stages[0].name
    torch.testing.assert_close(shard["stages"][name]["fill"], expected[0])


def test_failed_sets_are_bounded_by_max_failed():
    from math import comb

    from robustdice.partitioner.core.fill import MAX_FILL_SETS, default_max_failed
    from robustdice.partitioner.errors import PartitionerError

    assert failed_sets(4) == [f for f in ALL_SETS if f]          # N <= 6: every set up to N - 1
    assert len(failed_sets(6)) == 62 and default_max_failed(6) == 5
    assert failed_sets(4, 2) == [f for f in ALL_SETS if 1 <= len(f) <= 2]
    for n in (7, 8, 12):   # beyond 62 sets: up to 2 failed
        sets = failed_sets(n)
        assert default_max_failed(n) == 2 and max(map(len, sets)) == 2
        assert len(sets) == n + comb(n, 2)
    assert len(failed_sets(8, 7)) == MAX_FILL_SETS
    assert failed_sets(1) == []
    for n, k in ((4, 0), (4, 4), (8, 8)):
        with pytest.raises(PartitionerError, match="--max-failed"):
            failed_sets(n, k)
    with pytest.raises(PartitionerError, match="lower --max-failed"):
        failed_sets(9, 8)


def test_max_failed_bounds_the_plans_statistics_and_larger_sets_run_on_the_models_own(plans, images):
    bounded, full = Cluster(plans("robust", "mean+bn", max_failed=1)), Cluster(plans("robust", "mean+bn"))
    assert list(bounded.plan.fill.sets) == [(d,) for d in range(N)]
    assert bounded.plan.stages == full.plan.stages   # the same assignment: only the statistics differ
    staged = trace_stages(build_model("digits_cnn", "DEFAULT"))
    fills = [e["fill"] for e in bounded.devices[0].entries]
    with torch.inference_mode():
        for failed in [(2,), (1, 3), (0, 1, 2)]:
            got = bounded.simulate(images, failed)
            if len(failed) == 1:   # within the bound: the same statistics as the unbounded plan's
                expected = full.simulate(images, failed)
            else:                  # beyond it: the fill, with the model's own statistics
                expected = run_masked(staged, bounded.plan.stages, images, lost_masks(bounded.plan.stages, failed), fills)
                assert not torch.allclose(got, full.simulate(images, failed), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,fill,extra", [("robust+cdc", "mean+bn", {}), ("robust", "mean+bn", {"max_failed": 1}),
                                               ("robust", "zero", {})])
def test_the_default_plans_scoring_is_the_simulation(plans, images, method, fill, extra):
    """choose.agreement_by_set (each neuron once, fill.run_masked) agrees with Cluster.simulate."""
    from robustdice.partitioner.core.choose import agreement_by_set
    from robustdice.partitioner.core.partition import plan_fill
    from robustdice.partitioner.experiments.evaluate import _predict

    folder = plans(method, fill, **extra)
    cluster = Cluster(folder)
    model = build_model("digits_cnn", "DEFAULT")
    staged = trace_stages(model)
    request = PartitionRequest(model="digits_cnn", devices=N, method=method, out=folder, fill=fill,
                               show_progress=False, **extra)
    tables = plan_fill(staged, cluster.plan.stages, request)
    assert tables[0] == cluster.plan.fill
    with torch.inference_mode():
        reference = model(images).argmax(1)
    sets = [f for f in ALL_SETS if f]
    got = agreement_by_set(staged, cluster.plan.stages, tables, sets, images, reference)
    expected = {f: float((_predict(cluster, images, f) == reference).float().mean()) for f in sets}
    assert got == expected
    assert min(expected.values()) < 1.0   # the plans lose answers somewhere: not vacuous


def test_evaluation_batches_keep_each_stage_output_under_the_mmap_ceiling(plans, images, monkeypatch):
    """evaluate.eval_batch: as many images as keep the largest stage output within
    EVAL_BATCH_BYTES (and at most MAX_EVAL_BATCH); batching never changes a prediction."""
    from robustdice.partitioner.errors import PartitionerError
    from robustdice.partitioner.experiments import evaluate

    cluster = Cluster(plans("robust", "mean+bn"))
    shapes = {}
    cluster.simulate(images[:1], (), stage_shapes=shapes)
    largest = max(math.prod(s) for s in shapes.values()) * 4
    assert len(shapes) == len(cluster.plan.stages) and largest > 0
    monkeypatch.setattr(evaluate, "EVAL_BATCH_BYTES", 5 * largest + largest // 2)
    assert evaluate.eval_batch(cluster, images) == 5
    monkeypatch.setattr(evaluate, "EVAL_BATCH_BYTES", largest // 2)
    assert evaluate.eval_batch(cluster, images) == 1
    monkeypatch.setattr(evaluate, "EVAL_BATCH_BYTES", 10 ** 12)
    assert evaluate.eval_batch(cluster, images) == evaluate.MAX_EVAL_BATCH
    whole = evaluate._predict(cluster, images, (1, 2), batch=len(images))
    assert torch.equal(evaluate._predict(cluster, images, (1, 2), batch=7), whole)
    # a float16 cluster's outputs take half the bytes: twice the images
    half = Cluster(plans("robust", "mean+bn"), dtype=torch.float16)
    monkeypatch.setattr(evaluate, "EVAL_BATCH_BYTES", 5 * largest + largest // 2)
    assert evaluate.eval_batch(half, images) == 11
    with pytest.raises(PartitionerError, match="no images"):
        evaluate.eval_batch(cluster, images[:0])
