"""Copies between host and device that do not make the host wait for the device.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory copies and then synchronises
the stream (torch's ``memcpy_and_sync``): the host waits for every kernel already queued, so one
such copy per training step drains the GPU's queue each step, and a small network at 128 px
spends its time waiting for the host. Copies from pinned memory with ``non_blocking=True`` are
queued like kernels instead, and torch's pinned-memory allocator keeps the source alive until the
copy has run (it records an event on the stream for the pinned block). Every per-batch transfer
(crop windows, flips, labels, dataset positions, cached teacher outputs) goes through
:func:`upload`, so there is one place that knows this. The other way, :func:`download` takes
the host copy a checkpoint is written from while training goes on: queued into pinned memory,
read once :func:`copies_done` says the copies have run.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def download(t: Tensor, into: Tensor | None = None) -> Tensor:
    """A host copy of ``t``'s values that stays put while ``t`` changes: into ``into`` where it
    matches ``t`` (a buffer kept from the previous copy), else into a new tensor with ``t``'s
    strides (contiguous where ``t`` is not dense). From a CUDA device the copy goes into pinned
    memory and is queued (``non_blocking``), so the caller does not wait for the device; whoever
    reads the copy first waits for :func:`copies_done`. Elsewhere it is a plain copy."""
    cuda = t.device.type == "cuda"
    reusable = (
        into is not None
        and (into.shape, into.stride(), into.dtype) == (t.shape, t.stride(), t.dtype)
        and (into.is_pinned() if cuda else into.device.type == "cpu")
    )
    if not reusable:
        into = torch.empty_like(t, device="cpu", pin_memory=cuda)
    return into.copy_(t.detach(), non_blocking=cuda)


def copies_done(devices: Iterable[torch.device]) -> list[torch.cuda.Event]:
    """Events, one per CUDA device in ``devices``, that complete once the :func:`download` copies
    queued so far on its current stream have run: a thread that reads the copies waits on them.
    """
    events = []
    for device in {d for d in devices if d.type == "cuda"}:
        event = torch.cuda.Event(blocking=True)  # its waiter sleeps instead of spinning
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    return events
