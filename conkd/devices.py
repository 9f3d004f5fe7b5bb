"""Host-to-device copies that do not make the host wait for the device.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory copies and then synchronises
the stream (torch's ``memcpy_and_sync``): the host waits for every kernel already queued, so one
such copy per training step drains the GPU's queue each step, and a small network at 128 px
spends its time waiting for the host. Copies from pinned memory with ``non_blocking=True`` are
queued like kernels instead, and torch's pinned-memory allocator keeps the source alive until the
copy has run (it records an event on the stream for the pinned block). Every per-batch transfer
(crop windows, flips, labels, dataset positions, cached teacher outputs) goes through
:func:`upload`, so there is one place that knows this.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pinned_for(t: Tensor, device: torch.device) -> Tensor:
    """``t`` in pinned host memory, dense, when it will be copied to a CUDA ``device`` (else
    ``t`` itself). A loader thread calls it ahead of the copy, off the training thread."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t
    t = t.contiguous()  # a view with gaps would be copied through a pageable temporary
    return t if t.is_pinned() else t.pin_memory()


def upload(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from host memory to a CUDA device as a queued copy out of pinned
    memory (``t`` itself where it is pinned and dense, else a pinned copy), elsewhere a plain
    ``.to``."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return pinned_for(t, device).to(device, non_blocking=True)
