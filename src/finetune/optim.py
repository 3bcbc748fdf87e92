"""Optimizer parameter groups and the default warmup + cosine schedule, built from torch's own schedulers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR


def weight_decay_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Biases and norm weights (1-D tensors) get no weight decay, as in timm's `param_groups_weight_decay`."""
    decay, no_decay = [], []
    for _, param in named_params:
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05,
                  min_lr_ratio: float = 0.01) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup from 1% of the learning rate, then cosine decay to `min_lr_ratio` of it, stepped per batch."""
    total_steps = max(int(total_steps), 1)
    warmup = min(max(int(total_steps * warmup_fraction), 1), total_steps - 1) if total_steps > 1 else 0
    min_lrs = [group["lr"] * min_lr_ratio for group in optimizer.param_groups]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1), eta_min=min(min_lrs))
    if warmup == 0:
        return cosine
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=0.01, total_iters=warmup), cosine],
                        milestones=[warmup])
