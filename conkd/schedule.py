"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.05,
    min_lr_ratio: float = 0.01,
    flat_fraction: float = 0.0,
) -> LRScheduler:
    """Linear warmup from ~0 to the base lr over ``warmup_fraction`` of training, the base lr
    until ``flat_fraction`` of training, then cosine decay to ``min_lr_ratio * lr``.

    Warmup matters for Lion, whose sign updates are full-size from the first step (Chen et al.
    2023). ``flat_fraction`` > 0 is the flat-then-cosine shape of fastai's ``fit_flat_cos``
    (0.72 in the Imagenette leaderboard's script): a long stretch at the peak lr, decay only at
    the end. Built from torch's own schedulers.
    """
    if not 0 <= warmup_fraction <= 1 or not 0 <= flat_fraction <= 1:
        raise ValueError(
            f"warmup_fraction and flat_fraction must be in [0, 1], got {warmup_fraction}, "
            f"{flat_fraction}"
        )
    warmup = int(round(warmup_fraction * total_steps))
    decay_from = max(int(round(flat_fraction * total_steps)), warmup)
    base_lr = optimizer.param_groups[0]["lr"]
    phases: list[LRScheduler] = []
    milestones: list[int] = []
    if warmup:
        phases.append(LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0,
                               total_iters=warmup))  # fmt: skip
    if decay_from > warmup:
        if phases:
            milestones.append(warmup)
        phases.append(ConstantLR(optimizer, factor=1.0, total_iters=decay_from - warmup))
    if phases:
        milestones.append(decay_from)
    phases.append(CosineAnnealingLR(optimizer, T_max=max(total_steps - decay_from, 1),
                                    eta_min=base_lr * min_lr_ratio))  # fmt: skip
    if len(phases) == 1:
        return phases[0]
    return SequentialLR(optimizer, phases, milestones=milestones)
