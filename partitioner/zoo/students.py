"""RoCoIn's students: a small family of CNNs, and their training by distillation.

A student takes the model's input and gives the part of the teacher's final-convolution output
that one partition holds: (k channels, h, w) for a partition of k filters, (h, w) being the
teacher's own, after its pooling. The family varies width and depth:

    stem      one 3x3 conv of `width` channels at full resolution (BatchNorm, ReLU)
    blocks    b = 1 .. B-1: 2x2 max-pooling, then `depth` 3x3 convs of width * 2^b channels
    output    a 1x1 conv to k channels, BatchNorm, ReLU (when the teacher's features are never
              negative), adaptive average pooling to (h, w)

B follows the image: one block more for each halving that leaves at least 4 pixels, at most
MAX_BLOCKS (8x8 digits: 2 blocks; 28x28 Fashion-MNIST: 3). Every layer is one of torch.nn's
own, so a student is stored in the plan as a graph (architecture.encode) and a board builds it
with torch alone.

`distill` trains every group's student at once: each reproduces its partition's features
(mean squared error, per channel in units of the teacher's spread), and the teacher's head run
on all the students' features is pulled towards the teacher's soft labels (KL divergence at a
temperature) and the true labels. The head stays the teacher's, frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

WIDTHS = (8, 12, 16, 24, 32, 48)
DEPTHS = (1, 2)
MAX_BLOCKS = 5
MIN_POOLED_PX = 4
# Distillation: the soft-label term at this temperature (Hinton et al.), weighed like the
# feature term; the hard-label term lighter, as a guard where the teacher is wrong.
TEMPERATURE = 4.0
SOFT_WEIGHT = 1.0
HARD_WEIGHT = 0.1
BATCH_SIZE = 128
LR = 3e-3
WEIGHT_DECAY = 1e-4
# Teacher features are computed once and kept when they take at most this many bytes;
# larger ones are computed per batch.
CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class StudentShape:
    width: int
    depth: int

    @property
    def name(self) -> str:
        return f"w{self.width}d{self.depth}"


FAMILY = tuple(StudentShape(w, d) for w in WIDTHS for d in DEPTHS)


def blocks_for(height: int, width: int) -> int:
    blocks, size = 1, min(height, width)
    while size // 2 >= MIN_POOLED_PX and blocks < MAX_BLOCKS:
        size //= 2
        blocks += 1
    return blocks


class Student(nn.Module):
    """One member of the family (see the module docstring); `features` is its whole body."""

    def __init__(self, input_shape: Sequence[int], out_channels: int, out_hw: Tuple[int, int],
                 shape: StudentShape, nonnegative: bool = True) -> None:
        super().__init__()
        cin, h, w = input_shape
        layers: List[nn.Module] = [nn.Conv2d(cin, shape.width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(shape.width), nn.ReLU()]
        c = shape.width
        for b in range(1, blocks_for(h, w)):
            layers.append(nn.MaxPool2d(2))
            for _ in range(shape.depth):
                layers += [nn.Conv2d(c, shape.width * 2 ** b, 3, padding=1, bias=False),
                           nn.BatchNorm2d(shape.width * 2 ** b), nn.ReLU()]
                c = shape.width * 2 ** b
        layers += [nn.Conv2d(c, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        if nonnegative:
            layers.append(nn.ReLU())
        layers.append(nn.AdaptiveAvgPool2d(tuple(out_hw)))
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one image through the Conv2d and Linear layers of `model`."""
    total = [0]

    def hook(module, _inputs, output):
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            total[0] += output[0].numel() * per_out
        elif isinstance(module, nn.Linear):
            total[0] += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def option_name(shape: StudentShape, out_channels: int) -> str:
    return f"{shape.name}-k{out_channels}"


def shape_of(name: str) -> StudentShape:
    """The StudentShape of an option name made by option_name (`w16d2-k64`)."""
    head = name.split("-", 1)[0]
    for shape in FAMILY:
        if shape.name == head:
            return shape
    raise KeyError(name)


@dataclass(frozen=True)
class Distilled:
    students: Tuple[nn.Module, ...]
    epochs: int
    final_loss: float


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


def distill(students: Sequence[nn.Module], channels: Sequence[Sequence[int]], teacher_features: nn.Module,
            head: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], *, seed: int, epochs: int,
            feature_scale: torch.Tensor, progress: bool = False, desc: str = "distil students") -> Distilled:
    """Train `students` (one per partition, `channels[g]` the teacher channels of student g, in
    its output order) on `images` for `epochs` passes; returns them in eval mode.

    Deterministic for a seed and a thread count, as trainer.train_classifier is: the batches
    are drawn from a generator seeded with `seed`, and the students must have been built after
    torch.manual_seed(seed). `feature_scale` (C,): each teacher channel's spread, the unit of
    its feature error. `labels` None: no hard-label term.
    """
    from tqdm import tqdm

    teacher_features.eval()
    head.eval()
    for p in head.parameters():
        p.requires_grad_(False)
    index = [torch.as_tensor(list(c), dtype=torch.long) for c in channels]
    sample = _batched(teacher_features, images[:2])
    cache = sample[0].numel() * sample.element_size() * len(images) <= CACHE_BYTES
    feats = _batched(teacher_features, images) if cache else None
    scale = feature_scale.clamp_min(1e-6).reshape((1, -1) + (1,) * (sample.dim() - 2))
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        generator = torch.Generator().manual_seed(seed)
        params = [p for s in students for p in s.parameters()]
        steps_per_epoch = -(-len(images) // BATCH_SIZE)
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR,
                                                        total_steps=max(1, epochs * steps_per_epoch))
        loss = torch.zeros(())
        with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", disable=not progress) as bar:
            for _ in range(epochs):
                for s in students:
                    s.train()
                order = torch.randperm(len(images), generator=generator)
                for start in range(0, len(order), BATCH_SIZE):
                    batch = order[start:start + BATCH_SIZE]
                    x = images[batch]
                    if feats is not None:
                        target = feats[batch]
                    else:
                        with torch.no_grad():
                            target = teacher_features(x)
                    with torch.no_grad():
                        soft = F.log_softmax(head(target) / TEMPERATURE, dim=1)
                    mixed = torch.zeros_like(target)
                    feature_loss = torch.zeros(())
                    for s, idx in zip(students, index):
                        out = s(x)
                        mixed = mixed.index_copy(1, idx, out)
                        err = (out - target[:, idx]) / scale[:, idx]
                        feature_loss = feature_loss + err.pow(2).mean() / len(students)
                    logits = head(mixed)
                    kd = F.kl_div(F.log_softmax(logits / TEMPERATURE, dim=1), soft, log_target=True,
                                  reduction="batchmean") * TEMPERATURE ** 2
                    loss = feature_loss + SOFT_WEIGHT * kd
                    if labels is not None:
                        loss = loss + HARD_WEIGHT * F.cross_entropy(logits, labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    bar.update()
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
    return Distilled(tuple(s.eval() for s in students), epochs, float(loss.detach()))
