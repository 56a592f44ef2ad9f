"""A user's own CNN, defined only in this file, from `robustdice partition` to a live 2-node cluster.

The partition runs as the user would: the real CLI in a subprocess, with this folder on
PYTHONPATH so that `--model test_own_model:build_own_cnn` imports. The nodes then run without
it (no PYTHONPATH, another working folder): what they execute comes from the plan alone, and
their answers must equal the in-process simulation of the same plan.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
MODULE = Path(__file__).stem  # the name it imports by with HERE on PYTHONPATH
INPUT_SHAPE = (3, 16, 16)


class ChannelGate(nn.Module):
    """A user's own layer: a learnt per-channel gate (inlined by tracing; its parameter is shared)."""

    def __init__(self, channels):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.logit)


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.gate = ChannelGate(channels)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return x + self.gate(self.depthwise(h))


class OwnCNN(nn.Module):
    def __init__(self, classes=7):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.body = nn.Sequential(Block(12), Block(12))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))))


def build_own_cnn():
    return OwnCNN()


def trained(seed=11):
    """OwnCNN with weights unlike its initialisation (as after training), in eval mode."""
    torch.manual_seed(seed)
    model = OwnCNN()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("leak_check")
@pytest.mark.needs_photos
def test_own_model_from_partition_to_a_live_cluster(tmp_path, monkeypatch):
    sys.path.insert(0, str(HERE))
    import node_helpers as nh

    from robustdice.node.client import NodeClient
    from robustdice.node.lab.localcluster import LocalCluster
    from robustdice.partitioner.core.plan import load_plan
    from robustdice.partitioner.core.runtime import Cluster, weights_digest
    from robustdice.partitioner.zoo.inputs import InputSpec

    model = trained()
    weights = tmp_path / "own_cnn.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    plan_dir = tmp_path / "plan"
    env = dict(os.environ, PYTHONPATH=str(HERE))
    proc = subprocess.run(
        nh.robustdice_cli() + ["partition", "--model", f"{MODULE}:build_own_cnn", "--input-shape", "3,16,16",
                               "--preprocess", "imagenet", "--weights", str(weights), "--devices", "2",
                               "--method", "robust", "--calib-size", "8", "--out", str(plan_dir), "--json"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    plan = load_plan(plan_dir)
    assert summary["plan_hash"] == plan.plan_hash and summary["model"] == f"{MODULE}:build_own_cnn"
    assert plan.weights == str(weights) and plan.weights_digest == weights_digest(model)
    assert plan.input == InputSpec(INPUT_SHAPE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "crop")
    # 7 layers; each depthwise conv runs in the stage of the conv before it (stages.py): 5 stages
    assert plan.architecture is not None and len(plan.stages) == 5

    x = torch.randn((3,) + INPUT_SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        simulated = Cluster(plan_dir).simulate(x).numpy()
        plain = model(x).numpy()
    scale = float(np.abs(plain).max())
    np.testing.assert_allclose(simulated, plain, rtol=1e-5, atol=1e-5 * scale)

    # No labels for this model: `finetune` distils it under the plan's failures (a few steps
    # here; what distillation buys is the next test's), and the nodes serve the tuned plan.
    tuned_dir = tmp_path / "tuned"
    proc = subprocess.run(nh.robustdice_cli() + ["finetune", "--plan", str(plan_dir), "--out", str(tuned_dir),
                                                 "--steps", "3", "--json"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuned["training"] == "distillation" and tuned["steps"] == 3 and "photos" in tuned["training_data"]
    tuned_plan = load_plan(tuned_dir)
    assert tuned_plan.weights_digest != plan.weights_digest
    assert [st.assignment for st in tuned_plan.stages] == [st.assignment for st in plan.stages]
    plan_dir, plan = tuned_dir, tuned_plan
    with torch.inference_mode():
        simulated = Cluster(plan_dir).simulate(x).numpy()

    # The boards: neither this folder nor PYTHONPATH; the model comes from the plan.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    probe = subprocess.run([sys.executable, "-c", f"import {MODULE}"], capture_output=True, timeout=60)
    assert probe.returncode != 0, f"the nodes could import {MODULE}: the test would prove nothing"
    with LocalCluster(plan_dir) as cluster:
        for d in range(plan.devices):
            cluster.start_node(d)
        cluster.wait_until(cluster.all_alive(), nh.START_TIMEOUT_S, "both nodes to count on each other")
        for node in cluster.ids:
            with NodeClient(cluster.config, node, cluster.key_path) as client:
                reply = client.submit(x.numpy(), timeout_s=60.0)
            assert "error" not in reply.meta, reply.meta
            assert reply.meta["zero_filled_fraction"] == 0.0, reply.meta
            np.testing.assert_allclose(reply.arrays[0], simulated, rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"node {node}: the live answer differs from the simulation")


@pytest.mark.needs_photos
def test_distillation_teaches_the_failed_network_its_own_no_failure_output(tmp_path, monkeypatch):
    """A model with no labels here, fine-tuned by distillation under a lop plan's failures (one
    failed device of two loses half of every layer): on photo crops it never trained on, the
    network with a device failed comes closer to the no-failure output, and without failure it
    stays close to it."""
    from robustdice.partitioner.core.fill import lost_masks
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    from robustdice.partitioner.core.plan import load_plan
    from robustdice.partitioner.core.stages import trace_stages
    from robustdice.partitioner.errors import PartitionerError
    from robustdice.partitioner.experiments.finetune import _masked_train_forward, finetune
    from robustdice.partitioner.zoo.data import photo_crops
    from robustdice.partitioner.zoo.inputs import InputSpec

    monkeypatch.syspath_prepend(str(HERE))
    weights = tmp_path / "own_cnn.pt"
    torch.save({"state_dict": trained().state_dict()}, weights)
    spec = InputSpec(INPUT_SHAPE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "crop")
    plan_dir = tmp_path / "plan"
    partition(PartitionRequest(model=f"{MODULE}:build_own_cnn", devices=2, method="lop", out=plan_dir,
                               weights=str(weights), input_shape=INPUT_SHAPE, preprocess="imagenet",
                               show_progress=False))
    with pytest.raises(PartitionerError, match="--steps"):   # no labels: epochs mean nothing
        finetune(plan_dir, tmp_path / "x", epochs=2, progress=False)
    summary = finetune(plan_dir, tmp_path / "tuned", steps=150, lr=3e-3, progress=False)
    assert summary["training"] == "distillation"
    held_out = photo_crops(spec, 256, seed=999_999)   # training draws seeds 50_000..50_149

    def distance(directory):
        from robustdice.partitioner.experiments.evaluate import plan_weights
        from robustdice.partitioner.zoo.models import build_model
        plan = load_plan(directory)
        model = build_model(plan.model, weights=plan_weights(plan, directory)).eval()
        staged = trace_stages(model)
        with torch.no_grad():
            reference = F.log_softmax(trained()(held_out), 1)
            failed = _masked_train_forward(staged, lost_masks(plan.stages, (1,)), plan.fill.rule, held_out)
            whole = model(held_out)
        kl = lambda y: float(F.kl_div(F.log_softmax(y, 1), reference, log_target=True, reduction="batchmean"))
        return kl(failed), kl(whole)

    failed_before, whole_before = distance(plan_dir)
    failed_after, whole_after = distance(tmp_path / "tuned")
    assert whole_before < 1e-6
    assert failed_after < 0.75 * failed_before, (failed_before, failed_after)
    assert whole_after < 0.5 * failed_before, (whole_after, failed_before)
