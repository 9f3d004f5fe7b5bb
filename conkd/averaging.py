"""An exponential moving average of the weights (a recipe part for teachers; timm trains its
reference models with one): torch's :class:`~torch.optim.swa_utils.AveragedModel` with an EMA
update whose decay warms up.

The average is of parameters *and* buffers (``use_buffers=True``), so its BatchNorm statistics
are those of the averaged weights' predecessors and no extra pass over the data is needed. The
decay warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``:
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average follows the fast-moving
early weights instead of remembering the random init for ``1 / (1 - decay)`` steps. The warm-up
is computed on the device from the model's own update counter: no host synchronisation per step.

The loop updates it after each optimizer step and validates it; the checkpoint keeps it
(``last.pt`` for an exact resume; ``best.pt`` holds the averaged weights themselves, so students,
the teacher cache and ``eval.py`` use them without knowing an average was kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, updates: Tensor | float) -> Tensor:
    """The warmed-up decay after ``updates`` updates: ``min(decay, (1 + n) / (10 + n))``."""
    n = torch.as_tensor(updates, dtype=torch.float32)
    return torch.clamp((1 + n) / (10 + n), max=decay)


def ema_update(decay: float) -> Callable[[Sequence[Tensor], Sequence[Tensor], Tensor], None]:
    """An ``AveragedModel`` ``multi_avg_fn``: ``avg += (1 - decay_n) * (model - avg)``; integer
    buffers (BatchNorm's batch counter) are copied, as they cannot be averaged."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

    @torch.no_grad()
    def update(averaged: Sequence[Tensor], current: Sequence[Tensor], n: Tensor) -> None:
        if torch.is_floating_point(averaged[0]):
            weight = 1 - ema_decay(decay, n).to(averaged[0].device)
            torch._foreach_lerp_(list(averaged), list(current), weight)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def weight_average(model: nn.Module, decay: float) -> AveragedModel:
    """The EMA of ``model``'s weights and buffers, on its device (a copy made now)."""
    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)
