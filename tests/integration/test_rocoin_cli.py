"""`robustdice partition --method rocoin` through its real CLI, on digits_cnn (one distillation
pass: seconds), then verify, evaluate, sign and dse on the plan it writes; and what a board
says of it."""
import json

import pytest
import torch

from cli_runner import run as robustdice
from robustdice.partitioner.core.plan import load_plan, save_plan
from robustdice.partitioner.core.runtime import Cluster, sha256_file, shard_path
from robustdice.partitioner.errors import PlanError

DEVICES = 4



def ok_json(*args):
    """The last line of a command's stdout as JSON, the command having succeeded."""
    proc = robustdice(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("rocoin") / "digits"
    summary = ok_json("partition", "--model", "digits_cnn", "--devices", DEVICES, "--method", "rocoin",
                      "--epochs", 1, "--fill", "mean", "--out", out, "--json")
    return out, summary


def test_the_plan_says_which_student_each_device_runs_and_which_partition_it_feeds(plan):
    out, summary = plan
    p = load_plan(out)
    assert p.method == "rocoin" and p.stages == () and p.fill.rule == "mean"
    spec = p.rocoin
    assert [g.devices for g in spec.groups] == [(0, 1), (2, 3)]          # N // 2 groups of two
    assert spec.device_groups == (0, 0, 1, 1)
    assert sorted(c for g in spec.groups for c in g.channels) == list(range(128))   # features.7's filters
    assert spec.feature_layer == "features.7" and spec.feature_shape == (128, 1, 1)
    for g in spec.groups:
        assert g.student in spec.students and g.student.endswith(f"-k{len(g.channels)}")
        assert spec.students[g.student]["flops"] > 0
    assert summary["rocoin"]["gathers_per_frame"] == 1 and summary["replication_factor"] == 2.0
    teacher = summary["rocoin"]["teacher_flops"]
    assert all(s["flops"] < teacher for s in summary["rocoin"]["students"])
    # a device holds its student, the head and the fill: far less than the whole model
    assert max(summary["per_device_param_bytes"]) < summary["full_param_bytes"] / 2


def test_verify_checks_the_head_and_that_copies_agree(plan):
    out, _ = plan
    r = ok_json("verify", "--plan", out, "--json")
    assert r["allclose"] and r["method"] == "rocoin"
    assert r["replica_sets_checked"] == 8   # of 14 failed sets, 8 leave each group a device


def test_evaluate_reports_every_failed_set_and_copies_cost_nothing(plan):
    out, _ = plan
    r = ok_json("evaluate", "--plan", out, "--json")
    assert len(r["by_set"]) == 2 ** DEVICES - 1
    assert {k: b["sets"] for k, b in r["by_failed"].items()} == {"0": 1, "1": 4, "2": 6, "3": 4}
    assert r["replication_factor"] == 2.0
    none = r["by_set"]["-"]
    for failed in ("0", "1", "2", "3", "0,2", "0,3", "1,2", "1,3"):   # a copy of each student survives
        assert r["by_set"][failed] == none
    assert r["by_set"]["0,1"] != none or r["by_set"]["2,3"] != none   # a whole group lost costs something


def test_a_lost_group_is_filled_with_the_teachers_mean(plan):
    out, _ = plan
    cluster = Cluster(out)
    x = torch.rand(3, 1, 8, 8)
    full = cluster.rocoin.features(x)
    lost = cluster.rocoin.features(x, failed=(0, 1))
    channels = list(cluster.plan.rocoin.groups[0].channels)
    others = list(cluster.plan.rocoin.groups[1].channels)
    fill = torch.load(shard_path(out, 2), weights_only=True)["fill"]
    assert torch.equal(lost[:, channels], fill[channels].expand(3, -1, -1, -1))
    assert torch.equal(lost[:, others], full[:, others])
    assert torch.equal(cluster.simulate(x, (0, 1)), cluster.rocoin.heads[2](lost))


def test_the_same_seed_gives_the_same_plan(plan, tmp_path):
    out, summary = plan
    again = ok_json("partition", "--model", "digits_cnn", "--devices", DEVICES, "--method", "rocoin",
                    "--epochs", 1, "--fill", "mean", "--out", tmp_path / "again", "--json", "--no-progress")
    assert again["plan_hash"] == summary["plan_hash"]
    assert sha256_file(shard_path(tmp_path / "again", 0)) == sha256_file(shard_path(out, 0))


def test_a_shard_with_other_student_weights_is_refused(plan, tmp_path):
    import shutil
    out, _ = plan
    copy = tmp_path / "tampered"
    shutil.copytree(out, copy)
    shard = torch.load(shard_path(copy, 1), weights_only=True)
    key = next(k for k in shard["student"] if k.endswith("weight"))
    shard["student"][key] = shard["student"][key] + 1
    torch.save(shard, shard_path(copy, 1))
    p = load_plan(copy)   # the attacker also rewrites plan.json's shard digest, outside the hash
    records = {**p.shards, "1": {**p.shards["1"], "sha256": sha256_file(shard_path(copy, 1))}}
    save_plan(type(p)(**{**p.__dict__, "shards": records}), copy)
    with pytest.raises(PlanError, match="student's weights are not those plan.json names"):
        Cluster(copy)


def test_a_signed_rocoin_plan_loads_on_a_board_and_its_engine_runs_it(plan, tmp_path):
    out, _ = plan
    keys = tmp_path / "keys"
    proc = robustdice("sign", "--new-key", keys)
    assert proc.returncode == 0, proc.stderr
    public = proc.stdout.strip().splitlines()[-1].split(":", 1)[1].strip()
    proc = robustdice("sign", "--plan", out, "--key", keys / "operator.key_secret")
    assert proc.returncode == 0, proc.stderr
    assert load_plan(out, public).method == "rocoin"
    from robustdice.node.engine import Engine
    engine = Engine(str(out), 0, operator_public_key=public)
    assert [s.name for s in engine.stages] == ["features.7"]   # one gather per frame: the features
    assert engine.check_forward() == (2, 10) and engine.row_elements() == [1]
    # what has no stages to run still says so, naming what runs a rocoin device instead
    from robustdice.partitioner.core.runtime import build_skeleton
    with pytest.raises(PlanError, match="is a rocoin plan .*its devices run rocoin_device.RocoinDeviceRuntime"):
        build_skeleton(load_plan(out), {})


@pytest.mark.parametrize("args, message", [
    (["--method", "rocoin", "--fill", "mean+bn"], "zero or mean"),
    (["--method", "rocoin", "--groups", "5"], "--groups must lie in 1..4"),
    (["--method", "rocoin", "--threshold", "0.1"], "--threshold sizes robust's clusters"),
    (["--method", "robust", "--groups", "2"], "--groups is for --method rocoin"),
    (["--method", "rocoin", "--model", "alexnet", "--weights", "none"], "--train DIR"),
])
def test_bad_rocoin_options_are_refused_before_any_training(args, message, tmp_path):
    base = {"--model": "digits_cnn"}
    if "--model" in args:
        base = {}
    flat = [v for kv in base.items() for v in kv]
    proc = robustdice("partition", *flat, "--devices", DEVICES, *args, "--out", tmp_path / "p", timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "p" / "plan.json").exists()


def test_own_training_images_as_an_image_folder(tmp_path):
    from PIL import Image

    from robustdice.partitioner.zoo.digits import digits_split
    split = digits_split()
    folder = tmp_path / "train"
    for i in range(40):
        label = int(split.train_labels[i])
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = (split.train_images[i, 0].numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels, mode="L").save(folder / str(label) / f"{i}.png")
    summary = ok_json("partition", "--model", "digits_cnn", "--devices", 2, "--method", "rocoin", "--groups", 1,
                      "--epochs", 1, "--train", folder, "--out", tmp_path / "p", "--json")
    assert summary["rocoin"]["training_images"] == 40 and summary["rocoin"]["groups"] == [[0, 1]]
    assert summary["fill"] == "mean"   # rocoin's default: a lost group's mean beats its zeros
    assert ok_json("verify", "--plan", tmp_path / "p", "--json")["allclose"]


def test_dse_sweeps_rocoin_under_each_devices_memory(tmp_path):
    r = ok_json("dse", "--model", "digits_cnn", "--methods", "rocoin", "--memory-ratios", "0.15,0.4",
                "--epochs", 1, "--limit", 60, "--fill", "zero", "--out", tmp_path, "--json", "--no-progress")
    points = [p for p in r["points"] if p["method"] == "rocoin"]
    assert [p["budget_ratio"] for p in points] == [0.15, 0.4]
    assert all(p["memory_ratio"] <= p["budget_ratio"] for p in points)   # each device's memory holds
    assert points[0]["per_device_mb"] < points[1]["per_device_mb"]       # a larger budget buys a larger student
