"""The optimizer's fastest implementation for the device (``trainer.optimizer_kernel``).

A training step of a small network at GPU scale is bound by kernel launches, and the optimizer
launches the most: torch's plain AdamW / SGD run a few kernels per parameter tensor, ``fused``
ones a few per step; lion-pytorch's ``Lion`` loops over tensors in Python, its ``foreach``
module runs multi-tensor kernels (one launch per operation for all tensors). The math is the
same, so this is a choice of kernels, not of optimizer: the config names the optimizer
(``optimizer=adamw|sgd|lion``) and this module swaps in its fast kernel.

* ``plain``: the configured class as it is;
* ``fused``: ``fused=True`` for a torch optimizer that takes it, lion-pytorch's foreach ``Lion``
  for its ``Lion``; an optimizer with no fast kernel known here stays as it is;
* ``auto`` (the default): ``fused`` on CUDA, ``plain`` elsewhere (CPU kernels gain little and
  fused CPU kernels are newer).

A ``fused``/``foreach`` the optimizer config sets itself, or Lion's ``use_triton=true``, wins.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from conkd.checks import KERNELS


def _lion_classes() -> tuple[type, type]:
    from lion_pytorch import Lion
    from lion_pytorch.foreach import Lion as ForeachLion

    return Lion, ForeachLion


def fast_optimizer(
    make: Callable[..., torch.optim.Optimizer], device: torch.device, kernel: str = "auto"
) -> Callable[..., torch.optim.Optimizer]:
    """``make`` (a ``functools.partial`` of an optimizer class, as ``_partial_: true`` builds
    it) with the kernel ``kernel`` selects on ``device``."""
    if kernel not in KERNELS:
        raise ValueError(f"trainer.optimizer_kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "plain" or (kernel == "auto" and device.type != "cuda"):
        return make
    if not isinstance(make, functools.partial) or {"fused", "foreach"} & set(make.keywords):
        return make
    cls, kwargs = make.func, dict(make.keywords)
    lion, foreach_lion = _lion_classes()
    if cls is lion:
        if kwargs.pop("use_triton", False):
            return make
        return functools.partial(foreach_lion, *make.args, **kwargs)
    if "fused" in inspect.signature(cls).parameters:
        return functools.partial(cls, *make.args, fused=True, **kwargs)
    return make


def describe(optimizer: torch.optim.Optimizer) -> str:
    """The optimizer's class and kernel, for the run's log line: e.g.
    ``torch.optim.adamw.AdamW (fused)``, ``lion_pytorch.foreach.Lion``."""
    cls = type(optimizer)
    fused = optimizer.defaults.get("fused")
    return f"{cls.__module__}.{cls.__qualname__}" + (" (fused)" if fused else "")
