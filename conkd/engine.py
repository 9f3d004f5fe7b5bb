"""The training loop: plain PyTorch, readable in one screen.

Takes plain objects (a :class:`Job` of modules and options, loaders, callbacks), never a config.
The teacher reaches the loop as one function ``teacher(x, epoch, index) -> outputs``: an online
frozen network (:func:`online_teacher`) or a cache of its outputs per augmented view
(:mod:`conkd.teacher_cache`); the loop does not know which. Either way the outputs belong to
exactly the augmented batch the student sees ("a good teacher is patient and consistent",
Beyer et al. 2022). Progress lives in an explicit :class:`TrainState`, so checkpointing, tracking
and pruning are callbacks and a run can resume from a saved state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from conkd.errors import DivergedError


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def freeze(teacher: nn.Module) -> nn.Module:
    """Teacher handling as in DINO: eval mode and no gradients, permanently."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


#: ``teacher(x, epoch, index)``: the teacher's outputs for batch ``x``, the views of samples
#: ``index`` in ``epoch`` (``None``: the un-augmented validation split).
TeacherFn = Callable[[Tensor, "int | None", Tensor], Mapping[str, Tensor]]


def online_teacher(teacher: nn.Module) -> TeacherFn:
    """The frozen network itself as a :data:`TeacherFn` (it runs on every batch)."""
    freeze(teacher)

    def outputs(x: Tensor, epoch: int | None, index: Tensor) -> Mapping[str, Tensor]:
        with torch.no_grad():
            return teacher(x)

    return outputs


@dataclass
class Options:
    """How to train, as plain values (read from the config by :mod:`conkd.run`)."""

    epochs: int
    num_classes: int
    monitor: str = "val/top1"
    mode: str = "max"
    precision: str = "32"
    channels_last: bool = False
    max_steps: int | None = None
    grad_clip: float | None = None
    progress: bool = True


@dataclass
class Job:
    """Everything the loop trains with."""

    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    options: Options
    teacher: TeacherFn | None = None


@dataclass
class TrainState:
    """Where training stands: the next epoch, optimizer steps so far, the best epoch's metrics
    and every finished epoch's metrics. Saved in checkpoints; a fresh state starts at epoch 0."""

    epoch: int = 0
    step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


class Callback(Protocol):
    """Called after each epoch's validation; returning True stops training (a pruned trial)."""

    def on_epoch_end(
        self, state: TrainState, metrics: Mapping[str, float], is_best: bool
    ) -> bool | None: ...


def train_one_epoch(job: Job, loader: Iterable, epoch: int, state: TrainState) -> dict[str, float]:
    """One pass over ``loader``; returns sample-averaged loss terms, lr and throughput."""
    model, opts, device = job.model, job.options, job.device
    model.train()
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    total = len(loader) if opts.max_steps is None else min(len(loader), opts.max_steps)  # type: ignore[arg-type]
    start = time.perf_counter()
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", leave=False, disable=not opts.progress)
    for step, (x, y, index) in enumerate(bar):
        if step >= total:
            break
        x, y = to_device(x, device, opts.channels_last), y.to(device, non_blocking=True)
        with autocast(device, opts.precision):
            t_out = job.teacher(x, epoch, index) if job.teacher is not None else None
            terms = job.objective(model(x), t_out, y)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise DivergedError(
                f"non-finite loss at epoch {epoch} step {step} ({detail}); "
                "lower optimizer.lr or enable trainer.grad_clip"
            )
        job.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        job.optimizer.step()
        if job.scheduler is not None:
            job.scheduler.step()
        state.step += 1
        n = y.shape[0]
        seen += n
        for k, v in terms.items():
            sums[k] += v.item() * n
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", img_s=f"{seen / elapsed:.0f}")
    bar.close()
    elapsed = time.perf_counter() - start
    out = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
    out["train/lr"] = job.optimizer.param_groups[0]["lr"]
    out["train/epoch_time_s"] = elapsed
    out["train/throughput_img_s"] = seen / elapsed if elapsed > 0 else math.nan
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int,
    objective: nn.Module | None = None,
    teacher: TeacherFn | None = None,
    precision: str = "32",
    channels_last: bool = False,
    prefix: str = "val",
    progress: bool = False,
) -> tuple[dict[str, float], np.ndarray]:
    """Top-1 / top-5 accuracy, loss terms (if ``objective``) and the confusion matrix.

    The confusion matrix has true classes in rows and predictions in columns. ``teacher`` is
    asked for the un-augmented view (``epoch=None``) of each sample.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    sums: dict[str, float] = defaultdict(float)
    correct5 = seen = 0
    k = min(5, num_classes)
    for x, y, index in tqdm(loader, desc=prefix, leave=False, disable=not progress):
        x, y = to_device(x, device, channels_last), y.to(device)
        with autocast(device, precision):
            out = model(x)
            if objective is not None:
                t_out = teacher(x, None, index) if teacher is not None else None
                for name, v in objective(out, t_out, y).items():
                    sums[name] += v.item() * y.shape[0]
        logits = out["logits"].float()
        top = logits.topk(k, dim=1).indices
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        idx = (y * num_classes + top[:, 0]).cpu()
        confusion += torch.bincount(idx, minlength=num_classes**2).view(num_classes, num_classes)
        seen += y.shape[0]
    metrics = {
        f"{prefix}/top1": 100.0 * confusion.diag().sum().item() / max(seen, 1),
        f"{prefix}/top5": 100.0 * correct5 / max(seen, 1),
    }
    metrics.update({f"{prefix}/{k}": v / max(seen, 1) for k, v in sums.items()})
    return metrics, confusion.numpy()


def validate(job: Job, loader: Iterable) -> dict[str, float]:
    """The job's validation metrics, loss terms included (the teacher's val outputs too)."""
    opts = job.options
    metrics, _ = evaluate(
        job.model,
        loader,
        job.device,
        opts.num_classes,
        job.objective,
        job.teacher,
        precision=opts.precision,
        channels_last=opts.channels_last,
    )
    return metrics


def fit(
    job: Job,
    train_loader: Callable[[int], Iterable],
    val_loader: Iterable,
    state: TrainState | None = None,
    callbacks: Sequence[Callback] = (),
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train from ``state.epoch`` to ``job.options.epochs``; after each epoch validate and call
    every callback's ``on_epoch_end``; any of them may stop training (a pruned sweep trial).

    ``train_loader(epoch)`` returns that epoch's loader (its augmentation depends on the epoch).
    ``state.best`` ends as the metrics of the best epoch by ``options.monitor``.
    """
    opts = job.options
    state = state or TrainState()
    sign = 1.0 if opts.mode == "max" else -1.0
    while state.epoch < opts.epochs and not state.stopped_early:
        epoch = state.epoch
        metrics = train_one_epoch(job, train_loader(epoch), epoch, state)
        metrics.update(validate(job, val_loader))
        if opts.monitor not in metrics:
            raise KeyError(f"objective {opts.monitor!r} is not among the metrics {sorted(metrics)}")
        is_best = not state.best or sign * metrics[opts.monitor] > sign * state.best[opts.monitor]
        if is_best:
            state.best = {**metrics, "epoch": epoch}
        state.history.append(dict(metrics))
        state.epoch = epoch + 1
        log(
            f"epoch {epoch + 1}/{opts.epochs}  loss {metrics['train/loss']:.4f}  "
            f"val top1 {metrics['val/top1']:.2f}  top5 {metrics['val/top5']:.2f}  "
            f"lr {metrics['train/lr']:.3g}  {metrics['train/throughput_img_s']:.0f} img/s"
            + ("  *best*" if is_best else "")
        )
        stops = [bool(cb.on_epoch_end(state, metrics, is_best)) for cb in callbacks]
        if any(stops):
            state.stopped_early = True
            log(f"stopped early after epoch {epoch + 1}")
    return state
