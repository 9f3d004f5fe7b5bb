"""An exponential moving average of the weights (a recipe part for teachers; timm trains its
reference models with one): torch's :class:`~torch.optim.swa_utils.AveragedModel` (its copy of
the network, its ``n_averaged`` counter and state dict) with an EMA update whose decay warms up.

The average is of parameters *and* buffers (``use_buffers=True``), so its BatchNorm statistics
are those of the averaged weights' predecessors and no extra pass over the data is needed. The
decay warms up as in TensorFlow's ``ExponentialMovingAverage(num_updates=...)``:
``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average follows the fast-moving
early weights instead of remembering the random init for ``1 / (1 - decay)`` steps.

:class:`WeightEMA` overrides ``update_parameters`` for one reason: torch's tests its device-side
counter in two Python ``if``s (``n_averaged == 0``, ``> 0``), a host synchronisation on every
step, which stalls a GPU's queue. Here the counter is mirrored on the host (read from the device
once, after a restore) and the warmed-up decay is a Python number: the update is one
``_foreach_lerp_`` launch with no synchronisation.

The loop updates it after each optimizer step and validates it; the checkpoint keeps it
(``last.pt`` for an exact resume; ``best.pt`` holds the averaged weights themselves, so students,
the teacher cache and ``eval.py`` use them without knowing an average was kept).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, updates: int) -> float:
    """The warmed-up decay after ``updates`` updates: ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA(AveragedModel):
    """The EMA of a network's weights and buffers (a copy made on construction, on its device);
    integer buffers (BatchNorm's batch counter) are copied, as they cannot be averaged."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self._updates: int | None = 0  # n_averaged on the host; None: read it once (restored)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._updates = None
        return super().load_state_dict(state_dict, *args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._updates is None:
            self._updates = int(self.n_averaged)  # once per restore, not per step
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        floats: tuple[list, list] = ([], [])
        ints: tuple[list, list] = ([], [])  # copied in one launch, not one per BatchNorm
        for a, c in zip(mine, theirs, strict=True):
            kind = floats if a.is_floating_point() else ints
            kind[0].append(a.detach())
            kind[1].append(c.detach())
        if ints[0]:
            torch._foreach_copy_(*ints)
        if self._updates == 0:  # the first update copies
            torch._foreach_copy_(*floats)
        else:
            torch._foreach_lerp_(*floats, 1.0 - ema_decay(self.decay, self._updates))
        self.n_averaged += 1
        self._updates += 1


def weight_average(model: nn.Module, decay: float) -> WeightEMA:
    """The EMA of ``model``'s weights and buffers, on its device (a copy made now)."""
    return WeightEMA(model, decay)
