"""`robustdice finetune`: teach a network the failures its plan will see.

A plan fixes, for every set F of failed devices, which neurons of which stage are lost (after
parity recovery). Fine-tuning draws such an F for every batch (none with probability
NO_FAILURE_SHARE, otherwise k = 1..N-1 uniformly, then a set of k devices uniformly), fills
the lost neurons of every stage as the plan's fill rule does (zero, or the batch's own mean of
that neuron, which is the expected value a mean fill stands in for), and trains on labels.
BatchNorm normalises each batch with its own statistics, so the network learns under the
statistics a mean+bn plan recalibrates per failed set. At the end the BatchNorm running
statistics are measured anew with no failure over the training images (they were averaged over
failed sets during training), so the plain network stays what it was, and the plan is written
again with the same stages: same neurons on the same devices, the fine-tuned weights, and its
fill tables recomputed.

digits_cnn and fashion_vgg train on their labelled training splits. A model without labelled
data here (the 224x224 ones) is fine-tuned by distillation instead: the no-failure network,
frozen, is the teacher; the same network under a drawn failed set is the student, trained to
give the teacher's output distribution (soft targets, no labels) on random crops of unlabelled
photos that are not the evaluation set (zoo/photos.py). BatchNorm keeps its running statistics
(the batches are small and the photos are not ImageNet's), so the network with no failure
stays the teacher apart from what the new weights change; the summary says how often its top-1
still agrees with the teacher's on the evaluation images. With the mean+bn fill the plan
recalibrates BatchNorm for each failed set, which distillation does not imitate: it trains
under the no-failure statistics.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from robustdice.partitioner.errors import PartitionerError

NO_FAILURE_SHARE = 0.25
DEFAULT_EPOCHS = {"digits_cnn": 40, "fashion_vgg": 4}
DEFAULT_LR = {"digits_cnn": 1e-3, "fashion_vgg": 5e-4}
BATCH_SIZE = 128
# Distillation (models without labelled data): steps of DISTILL_BATCH random photo crops.
DISTILL_STEPS = 300
DISTILL_BATCH = 16
DISTILL_LR = 1e-4
# Softened distributions carry more of the teacher's ranking than its top-1 alone.
DISTILL_TEMPERATURE = 2.0
# Seeds of the crops: step i of a run with --seed S draws with DISTILL_SEED_BASE + S * steps + i
# (the evaluation set is other photos).
DISTILL_SEED_BASE = 50_000
# Images for the final no-failure BatchNorm statistics: enough for stable averages.
RESTAT_IMAGES = 20_000
WEIGHTS_FILE = "weights.pt"


def draw_failed(devices: int, rng: random.Random):
    """A failed set: none with probability NO_FAILURE_SHARE, else k uniform in 1..N-1, then a set."""
    if devices < 2 or rng.random() < NO_FAILURE_SHARE:
        return ()
    k = rng.randint(1, devices - 1)
    return tuple(sorted(rng.sample(range(devices), k)))


def _masked_train_forward(staged, losses, fill_rule: str, x):
    """The model in train mode with each stage's lost neurons filled (see the module docstring)."""
    from robustdice.partitioner.core.stages import full_stage_output

    def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
        stage = staged.stages[i]
        y = full_stage_output(stage, t)
        lost = losses[i]
        if not bool(lost.any()):
            return y
        cd = stage.channel_dim % y.dim()
        shape = [1] * y.dim()
        shape[cd] = -1
        lost_f = lost.to(y.dtype).reshape(shape)
        if fill_rule == "zero":
            return y * (1 - lost_f)
        dims = [d for d in range(y.dim()) if d != cd]
        mean = y.detach().mean(dim=dims).reshape(shape)
        return y * (1 - lost_f) + mean * lost_f

    return staged.run(x, stage_fn)


@torch.no_grad()
def _restat_batchnorm(model: nn.Module, images: torch.Tensor, batch: int = 500) -> None:
    """Running statistics measured anew, with no failure, as cumulative averages over `images`."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for start in range(0, len(images), batch):
        model(images[start:start + batch])
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def finetune(plan_dir, out, epochs: Optional[int] = None, lr: Optional[float] = None, seed: int = 0,
             fill: Optional[str] = None, progress: bool = True, steps: Optional[int] = None) -> Dict[str, object]:
    """Fine-tune the plan's model under its failure masks; write the new plan to `out`.

    On labels (`epochs`) where the model's training data is here, else by distillation on
    unlabelled photos (`steps`)."""
    from robustdice.partitioner.core.capacity import plan_capacities
    from robustdice.partitioner.core.fill import lost_masks
    from robustdice.partitioner.core.partition import PartitionRequest, write_plan
    from robustdice.partitioner.core.plan import FILLS, load_plan
    from robustdice.partitioner.core.runtime import weights_digest
    from robustdice.partitioner.core.stages import trace_stages
    from robustdice.partitioner.experiments.evaluate import plan_weights
    from robustdice.partitioner.zoo.data import LABELLED_MODELS, training_data
    from robustdice.partitioner.zoo.models import build_model

    plan = load_plan(plan_dir)
    fill = fill or plan.fill.rule
    if fill not in FILLS:
        raise PartitionerError(f"--fill {fill!r} is not one of {', '.join(FILLS)}")
    # A labelled model whose data is missing says so (make fashion-data): it is not distilled.
    labelled = training_data(plan.model) if plan.model in LABELLED_MODELS else None
    if labelled is not None and steps is not None:
        raise PartitionerError(f"--steps is for distillation; {plan.model} trains on its labels (--epochs)")
    if labelled is None and epochs is not None:
        raise PartitionerError(f"{plan.model} has no labelled training data here: it is distilled "
                               "(--steps, not --epochs)")
    if lr is not None and not lr > 0:
        raise PartitionerError(f"--lr must be > 0, got {lr}")
    model = build_model(plan.model, weights=plan_weights(plan, plan_dir), seed=plan.seed)
    if weights_digest(model) != plan.weights_digest:
        raise PartitionerError(f"the weights {plan.weights!r} differ from those plan {plan_dir} was made from")
    staged = trace_stages(model)   # shares its modules with `model`: training one trains the other
    sets = [()] + [f for k in range(1, plan.devices) for f in itertools.combinations(range(plan.devices), k)]
    losses = {f: lost_masks(plan.stages, f) for f in sets}
    torch.manual_seed(seed)
    if labelled is not None:
        trained = _train_on_labels(plan, model, staged, losses, fill, labelled, epochs, lr, seed, progress)
    else:
        trained = _distill(plan, model, staged, losses, fill, steps, lr, seed, progress)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights_file = out / WEIGHTS_FILE
    torch.save(model.state_dict(), weights_file)
    # The plan names its weights relative to its own folder, so that the folder can move.
    request = PartitionRequest(model=plan.model, devices=plan.devices, method=plan.method, out=out,
                               scores=plan.scores, weights=WEIGHTS_FILE, seed=plan.seed,
                               show_progress=progress, fill=fill, capacities=plan_capacities(plan), input=plan.input)
    staged = trace_stages(model.eval())
    summary = write_plan(model, staged, list(plan.stages), request)
    summary.update({"finetuned_from": str(plan_dir), **trained})
    return summary


def _train_on_labels(plan, model, staged, losses, fill, data, epochs, lr, seed, progress) -> Dict[str, object]:
    from tqdm import tqdm

    from robustdice.partitioner.zoo.digits import accuracy

    train_x, train_y, test_x, test_y = data
    epochs = DEFAULT_EPOCHS.get(plan.model, 4) if epochs is None else epochs
    lr = DEFAULT_LR.get(plan.model, 5e-4) if lr is None else lr
    if epochs < 1:
        raise PartitionerError(f"--epochs must be >= 1, got {epochs}")
    before = accuracy(model, test_x, test_y)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train_y) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    augment = None
    if plan.model == "fashion_vgg":
        from robustdice.partitioner.zoo.fashion import augment
    with tqdm(total=epochs * steps_per_epoch, desc=f"finetune {plan.model} under {plan.method} failures",
              unit="batch", disable=not progress) as bar:
        for _ in range(epochs):
            model.train()
            staged.skeleton.train()
            order = torch.randperm(len(train_y), generator=generator)
            for start in range(0, len(order), BATCH_SIZE):
                batch = order[start:start + BATCH_SIZE]
                x = train_x[batch]
                if augment is not None:
                    x = augment(x, generator)
                failed = draw_failed(plan.devices, rng)
                optimizer.zero_grad()
                logits = _masked_train_forward(staged, losses[failed], fill, x)
                loss = F.cross_entropy(logits, train_y[batch])
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
    pick = torch.randperm(len(train_y), generator=generator)[:RESTAT_IMAGES]
    _restat_batchnorm(model, train_x[pick])
    return {"training": "labels", "epochs": epochs, "lr": lr,
            "test_accuracy_before": before, "test_accuracy_after": accuracy(model, test_x, test_y)}


def _distill(plan, model, staged, losses, fill, steps, lr, seed, progress) -> Dict[str, object]:
    """Soft targets from the frozen no-failure network on random photo crops (module docstring)."""
    import copy
    import time

    from tqdm import tqdm

    from robustdice.partitioner.zoo.data import evaluation_set, photo_crops
    from robustdice.partitioner.zoo.photos import describe

    steps = DISTILL_STEPS if steps is None else steps
    lr = DISTILL_LR if lr is None else lr
    if steps < 1:
        raise PartitionerError(f"--steps must be >= 1, got {steps}")
    spec = plan.input   # a loaded plan always has one (plan.json's input is required)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.eval()   # BatchNorm keeps its running statistics; dropout off
    staged.skeleton.eval()
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    t = DISTILL_TEMPERATURE
    started = time.perf_counter()
    with tqdm(total=steps, desc=f"distil {plan.model} under {plan.method} failures", unit="step",
              disable=not progress) as bar:
        for step in range(steps):
            x = photo_crops(spec, DISTILL_BATCH, DISTILL_SEED_BASE + seed * steps + step)
            with torch.no_grad():
                target = F.log_softmax(teacher(x) / t, dim=1)
            failed = draw_failed(plan.devices, rng)
            optimizer.zero_grad()
            logits = _masked_train_forward(staged, losses[failed], fill, x)
            loss = F.kl_div(F.log_softmax(logits / t, dim=1), target, log_target=True,
                            reduction="batchmean") * t * t
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    training_s = time.perf_counter() - started
    images, _, _, described = evaluation_set(plan.model, spec=spec)
    with torch.no_grad():
        agree = float((model.eval()(images).argmax(1) == teacher(images).argmax(1)).float().mean())
    return {"training": "distillation", "steps": steps, "batch": DISTILL_BATCH, "lr": lr,
            "temperature": t, "training_data": describe(), "training_s": round(training_s, 1),
            "no_failure_agreement_with_teacher": agree, "agreement_data": described}
