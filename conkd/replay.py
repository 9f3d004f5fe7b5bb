"""The teacher over exactly the batches the student will see: what a teacher cache stores.

A KD student sees, in epoch ``e``, the first ``max_steps`` batches ``(x, y, i)`` of
``train_loader(e)`` (all of them without ``max_steps``, as :func:`conkd.engine.train_one_epoch`
takes them), and the validation batches in order. :meth:`Replay.run` runs the frozen teacher on
those same batches, in eval mode, without gradients, with the run's autocast and memory format,
so its numbers are those the online teacher gives the student; each output is handed on as
float16 rows (checked finite: float16 is what :mod:`conkd.teacher_cache` stores) with the
batch's dataset positions. With the run's batch mixing (:class:`conkd.views.Mixer`) each
training batch is mixed first, exactly as the loop mixes it ("function matching", Beyer et al.
2022), so every row is the teacher's output on the mixed image the student sees. Kept apart
from the cache's file format so that the two can be read (and changed) on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from conkd.engine import autocast, to_device
from conkd.errors import ConKDError
from conkd.views import Mixer

#: The network, or any callable with its output dict (``{"logits": ..., "projection": ...}``).
Teacher = nn.Module | Callable[[Tensor], Mapping[str, Tensor | None]]
#: Receives ``(epoch, positions, rows)``; ``epoch`` is None for validation batches.
Sink = Callable[[int | None, np.ndarray, dict[str, np.ndarray]], None]


def positions(index: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """Dataset positions as a 1-D int64 numpy array (from a tensor on any device, or a list)."""
    if isinstance(index, Tensor):
        index = index.detach().cpu().numpy()
    idx = np.asarray(index)
    if idx.dtype.kind not in "iu":
        raise ConKDError(f"dataset positions must be integers, got dtype {idx.dtype}")
    return idx.astype(np.int64, copy=False).reshape(-1)


@contextmanager
def evaluating(teacher: Teacher) -> Iterator[None]:
    """``teacher`` in eval mode (BatchNorm running statistics, none updated), its own mode
    restored afterwards: the caller may hand over a network in train mode."""
    module = teacher if isinstance(teacher, nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


@dataclass(frozen=True)
class Replay:
    """What is replayed: the output names, epochs, split sizes and steps per epoch, and the
    run's numerics (device, precision, memory format)."""

    outputs: list[str]
    epochs: int
    n_train: int
    n_val: int
    max_steps: int | None = None
    device: torch.device = torch.device("cpu")
    precision: str = "32"
    channels_last: bool = False
    mix: Mixer | None = None  # the student's batch mixing, replayed on each training batch

    def check(self) -> None:
        """Refuse a replay whose shape or settings cannot give a usable cache."""
        outputs = self.outputs
        if not outputs or len(set(outputs)) != len(outputs):
            raise ConKDError(f"teacher cache outputs must be distinct names, got {outputs}")
        if self.epochs < 1 or self.n_train < 1 or self.n_val < 1:
            raise ConKDError(
                "teacher cache needs epochs, n_train and n_val >= 1, got "
                f"{self.epochs}, {self.n_train}, {self.n_val}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConKDError(f"teacher cache max_steps must be None or >= 1, got {self.max_steps}")
        if self.precision not in ("32", "bf16"):
            raise ConKDError(f"teacher cache precision must be 32 or bf16, got {self.precision!r}")

    def run(
        self,
        teacher: Teacher,
        train_loader: Callable[[int], Iterable],
        val_loader: Iterable,
        sink: Sink,
        progress: bool = True,
    ) -> None:
        """Hand ``sink`` the teacher's rows of every batch the student sees, epoch by epoch,
        then of the validation batches."""
        bar = tqdm(total=None, desc="teacher cache", unit="batch", disable=not progress)
        try:
            for epoch in range(self.epochs):
                loader = train_loader(epoch)
                if bar.total is None:
                    bar.total = self._total(loader, val_loader)
                    bar.refresh()
                for step, (x, _, index) in enumerate(loader):
                    if self.max_steps is not None and step >= self.max_steps:
                        break
                    if self.mix is not None:  # as the loop mixes batch `step` of `epoch`
                        x, _ = self.mix(to_device(x, self.device, self.channels_last), epoch, step)
                    idx = positions(index)
                    sink(epoch, idx, self.rows(teacher, x, idx, "train"))
                    bar.update()
            for x, _, index in val_loader:
                idx = positions(index)
                sink(None, idx, self.rows(teacher, x, idx, "val"))
                bar.update()
        finally:
            bar.close()

    def _total(self, loader: Iterable, val_loader: Iterable) -> int | None:
        """The replay's batch count (for the progress bar), where the loaders have lengths."""
        if not hasattr(loader, "__len__"):
            return None
        steps = len(loader)  # type: ignore[arg-type]
        steps = steps if self.max_steps is None else min(steps, self.max_steps)
        val = len(val_loader) if hasattr(val_loader, "__len__") else 0  # type: ignore[arg-type]
        return self.epochs * steps + val

    @torch.no_grad()
    def rows(
        self, teacher: Teacher, x: Tensor, idx: np.ndarray, split: str
    ) -> dict[str, np.ndarray]:
        """The teacher's float16 rows of the outputs for batch ``x`` at positions ``idx``,
        checked: positions in range, every output present, one row per position, finite in
        float16 (a NaN row would train the student towards nothing, silently)."""
        size = self.n_train if split == "train" else self.n_val
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ConKDError(
                f"teacher cache: {split} loader yields positions up to {idx.max()}, "
                f"but n_{split}={size}"
            )
        with autocast(self.device, self.precision):
            out = teacher(to_device(x, self.device, self.channels_last))
        rows: dict[str, np.ndarray] = {}
        for name in self.outputs:
            value: Any = out.get(name)
            if value is None:
                raise ConKDError(
                    f"the teacher has no {name!r} output to cache (it returns "
                    f"{sorted(k for k, v in out.items() if v is not None)})"
                )
            if value.shape[0] != idx.size:
                raise ConKDError(
                    f"teacher output {name!r} has {value.shape[0]} rows for a batch of "
                    f"{idx.size} positions"
                )
            row32 = value.detach().float().cpu().numpy()
            rows[name] = row32.astype(np.float16)
            if not np.isfinite(rows[name]).all():
                what = "is not finite" if not np.isfinite(row32).all() else "overflows float16"
                raise ConKDError(f"teacher output {name!r} {what}; it cannot be cached")
        return rows
