"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
) -> LRScheduler:
    """Linear warmup from ~0 to the base lr over ``warmup_fraction`` of training, then cosine
    decay to ``min_lr_ratio * lr``. Warmup matters for Lion, whose sign updates are full-size
    from the first step (Chen et al. 2023). Built from torch's own schedulers."""
    warmup = int(round(warmup_fraction * total_steps))
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(
        optimizer, T_max=max(total_steps - warmup, 1), eta_min=base_lr * min_lr_ratio
    )
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
