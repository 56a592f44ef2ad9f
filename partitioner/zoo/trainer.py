"""The one training loop of the shipped classifiers (digits_cnn, fashion_vgg): AdamW with a
one-cycle schedule over shuffled mini-batches, deterministic for a seed and a thread count."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def train_classifier(factory: Callable[[], nn.Module], images: torch.Tensor, labels: torch.Tensor, *, seed: int,
                     epochs: int, batch_size: int, lr: float, weight_decay: float, label_smoothing: float = 0.0,
                     augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
                     progress: bool = False, desc: str = "train",
                     epoch_end: Optional[Callable[[int, float, nn.Module], None]] = None) -> nn.Module:
    """`factory()` trained on (images, labels); returns it in eval mode.

    The model is built after `torch.manual_seed(seed)` and batches are drawn (and augmented, by
    `augment(batch, generator)`) from a generator seeded alike, so the same seed, data and
    thread count give the same weights. `epoch_end(epoch, last loss, model)` after each epoch.
    """
    from tqdm import tqdm

    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model = factory()
        generator = torch.Generator().manual_seed(seed)
        steps_per_epoch = -(-len(labels) // batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", disable=not progress) as bar:
            for epoch in range(epochs):
                model.train()
                order = torch.randperm(len(labels), generator=generator)
                for start in range(0, len(order), batch_size):
                    batch = order[start:start + batch_size]
                    x = images[batch] if augment is None else augment(images[batch], generator)
                    optimizer.zero_grad()
                    loss = loss_fn(model(x), labels[batch])
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    bar.update()
                if epoch_end is not None:
                    epoch_end(epoch, loss.item(), model)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
    return model.eval()
