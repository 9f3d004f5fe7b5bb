"""The training loop: plain PyTorch, readable in one screen.

Takes plain objects (a :class:`Job` of modules and options, loaders, callbacks), never a config.
The teacher reaches the loop as one function ``teacher(x, epoch, index) -> outputs``: an online
frozen network (:func:`online_teacher`) or a cache of its outputs per augmented view
(:mod:`conkd.teacher_cache`); the loop does not know which. Either way the outputs belong to
exactly the augmented batch the student sees ("a good teacher is patient and consistent",
Beyer et al. 2022). Progress lives in an explicit :class:`TrainState`, so checkpointing, tracking
and pruning are callbacks (:mod:`conkd.callbacks`) and a run can resume from a saved state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from conkd import distributed
from conkd.callbacks import Callback
from conkd.devices import upload
from conkd.errors import DivergedError
from conkd.state import TrainState
from conkd.views import Mixer


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, a no-op otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = upload(x, device)
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
    #: the loop reads its losses on the host at the multiples of these step counts: the sync
    #: interval (progress bar, NaN check) and the mid-epoch checkpoint interval (a checkpoint
    #: holds the sums); every rank reads at the same steps, as the read is a collective
    sync_at: tuple[int, ...] = (50,)


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
    mix: Mixer | None = None  # batch mixing (dataset.mix), applied before both networks
    average: nn.Module | None = None  # the weights' EMA (conkd.averaging), validated if kept

    @property
    def evaluated(self) -> nn.Module:
        """The network validation measures and ``best.pt`` keeps: the EMA when one is kept."""
        return self.model if self.average is None else self.average.module


class Tally:
    """An epoch's sample-weighted loss terms and its first non-finite loss, kept on the device.

    :meth:`add` launches a few small kernels and never waits for the device: reading a loss on
    the host (``.item()``, a tensor in an ``if``) after every step would stall a GPU's queue each
    step. :meth:`sync` reads everything at once (one host synchronisation) into the state and
    raises if a loss was non-finite, naming the first such batch and whether its input held
    NaN/Inf. Under torchrun it sums the ranks' shares, so every rank (and its checkpoint) holds
    the global sums; all ranks sync at the same steps.
    """

    def __init__(self, batch: int) -> None:
        self.start = batch  # the state's batch at the last sync
        self.pending = 0  # steps added since then
        self.names: list[str] = []
        self.sums: Tensor | None = None  # per term, then the sample count; float64

    def add(self, x: Tensor, terms: Mapping[str, Tensor], n: int) -> None:
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self.sums is None:
            self.names = list(terms)
            self.sums = values.new_zeros(len(values) + 1, dtype=torch.float64)
            self.steps = values.new_zeros((), dtype=torch.long)  # since the last sync
            self.first = torch.full_like(self.steps, -1)  # the first non-finite step, or -1
            self.bad_input = torch.zeros_like(self.steps)  # its input's NaN/Inf count
            self.bad_terms = torch.zeros_like(values)  # its loss terms
        self.sums[:-1] += values.double() * n
        self.sums[-1] += n
        new = ~torch.isfinite(values[0]) & (self.first < 0)
        self.first = torch.where(new, self.steps, self.first)
        self.bad_input = torch.where(new, (~torch.isfinite(x)).sum(), self.bad_input)
        self.bad_terms = torch.where(new, values, self.bad_terms)
        self.steps += 1
        self.pending += 1

    def sync(self, state: TrainState, epoch: int) -> None:
        """Move the sums into ``state`` (one host read) and start a new window."""
        if not self.pending:
            return
        local = torch.stack([self.first, self.bad_input]).double()  # this rank's, not summed
        packed = torch.cat([distributed.all_reduce_sum(self.sums), local])
        *values, first, bad_input = packed.tolist()
        first, bad_input = int(first), int(bad_input)
        if first >= 0 or not math.isfinite(values[0]):
            self._raise(epoch, first, bad_input)
        for k, v in zip(self.names, values[:-1]):
            state.sums[k] = state.sums.get(k, 0.0) + v
        state.seen += int(values[-1])
        self.start, self.pending = state.batch, 0
        self.sums.zero_()
        self.steps.zero_()

    def _raise(self, epoch: int, first: int, bad_input: int) -> None:
        if first < 0:  # only another rank's loss was non-finite
            raise DivergedError(f"non-finite loss on another rank in epoch {epoch}")
        where = f"at epoch {epoch} batch {self.start + first}"
        if bad_input:
            raise DivergedError(
                f"the input batch {where} holds {bad_input} NaN/Inf values; check the dataset "
                "and its transforms"
            )
        terms = self.bad_terms.tolist()
        detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, terms))
        raise DivergedError(
            f"non-finite loss {where} ({detail}); lower optimizer.lr or enable trainer.grad_clip"
        )


def train_one_epoch(
    job: Job,
    loader: Iterable,
    epoch: int,
    state: TrainState,
    callbacks: Sequence[Callback] = (),
) -> dict[str, float]:
    """Train on ``loader`` (the batches of ``epoch`` from ``state.batch`` on), calling every
    callback's ``on_step_end(state)`` after each step; returns the epoch's sample-averaged loss
    terms, lr and throughput (of this process's share when resumed mid-epoch).

    The host reads the losses at the multiples of ``options.sync_at`` (every 50 steps, and
    before each mid-epoch checkpoint) and at the end: a non-finite loss stops the run there,
    before anything is written.
    """
    model, opts, device = job.model, job.options, job.device
    model.train()
    total = state.batch + len(loader)  # type: ignore[arg-type]
    total = total if opts.max_steps is None else min(total, opts.max_steps)
    start, seen_at_start, tally = time.perf_counter(), state.seen, Tally(state.batch)
    bar = tqdm(total=total, initial=state.batch, desc=f"epoch {epoch}", leave=False,
               disable=not opts.progress)  # fmt: skip
    for x, y, index in loader:
        if state.batch >= total:
            break
        x, y = to_device(x, device, opts.channels_last), upload(y, device)
        mixed = None
        if job.mix is not None:  # the teacher sees the mixed images too (function matching)
            x, mixed = job.mix(x, epoch, state.batch)
            x = to_device(x, device, opts.channels_last)  # keep the memory format
        with autocast(device, opts.precision):
            t_out = job.teacher(x, epoch, index) if job.teacher is not None else None
            terms = job.objective(model(x), t_out, y, mixed)
        job.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if opts.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        job.optimizer.step()
        if job.average is not None:
            job.average.update_parameters(distributed.unwrap(model))
        if job.scheduler is not None:
            job.scheduler.step()
        tally.add(x, terms, y.shape[0])
        state.step, state.batch = state.step + 1, state.batch + 1
        bar.update()
        if any(state.step % every == 0 for every in opts.sync_at):
            tally.sync(state, epoch)
            rate = (state.seen - seen_at_start) / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{state.sums['loss'] / state.seen:.4f}", img_s=f"{rate:.0f}")
        for cb in callbacks:
            cb.on_step_end(state)
    tally.sync(state, epoch)
    bar.close()
    elapsed, seen_here = time.perf_counter() - start, state.seen - seen_at_start
    out = {f"train/{k}": v / max(state.seen, 1) for k, v in state.sums.items()}
    out["train/lr"], out["train/epoch_time_s"] = job.optimizer.param_groups[0]["lr"], elapsed
    out["train/throughput_img_s"] = seen_here / elapsed if elapsed > 0 else math.nan
    state.batch, state.sums, state.seen = 0, {}, 0
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
    # counts and sums stay on the device and are read once, after the last batch
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    sums: dict[str, Tensor] = {}
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    k = min(5, num_classes)
    for x, y, index in tqdm(loader, desc=prefix, leave=False, disable=not progress):
        x, y = to_device(x, device, channels_last), upload(y, device)
        with autocast(device, precision):
            out = model(x)
            if objective is not None:
                t_out = teacher(x, None, index) if teacher is not None else None
                for name, v in objective(out, t_out, y).items():
                    sums[name] = sums.get(name, 0.0) + v.detach().double() * y.shape[0]
        top = out["logits"].float().topk(k, dim=1).indices
        correct5 += (top == y[:, None]).any(dim=1).sum()
        # scatter_add_, not bincount: bincount reads its input's range on the host each batch
        confusion.scatter_add_(0, y * num_classes + top[:, 0], torch.ones_like(y))
        seen += y.shape[0]
    names = sorted(sums)
    count = upload(torch.tensor(seen, dtype=torch.float64), device)
    packed = torch.stack([correct5.double(), count, *(sums[k] for k in names)])
    correct5_, seen_, *values = distributed.all_reduce_sum(packed).tolist()
    correct5, seen, sums = int(correct5_), int(seen_), dict(zip(names, values))
    confusion = distributed.all_reduce_sum(confusion).view(num_classes, num_classes).cpu()
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
        job.evaluated,
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
    train_loader: Callable[[int, int], Iterable],
    val_loader: Iterable,
    state: TrainState | None = None,
    callbacks: Sequence[Callback] = (),
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train from ``state`` (epoch and batch) to ``job.options.epochs``; after each epoch
    validate and call every callback's ``on_epoch_end``; any of them may stop training (a pruned
    sweep trial). Every callback's ``on_step_end`` is called after every step, and its
    ``on_fit_end`` once training ends, by an error too (a checkpoint still being written).

    ``train_loader(epoch, start)`` returns that epoch's loader from batch ``start`` on (its
    augmentation depends on the epoch). ``state.best`` ends as the best epoch's metrics by
    ``options.monitor``.
    """
    state, error = state or TrainState(), None
    try:
        while state.epoch < job.options.epochs and not state.stopped_early:
            loader = train_loader(state.epoch, state.batch)
            fit_epoch(job, loader, val_loader, state, callbacks, log)
    except BaseException as err:
        error = err
        raise
    finally:
        for cb in callbacks:
            cb.on_fit_end(state, error)
    return state


def fit_epoch(
    job: Job,
    loader: Iterable,
    val_loader: Iterable,
    state: TrainState,
    callbacks: Sequence[Callback],
    log: Callable[[str], None],
) -> None:
    """One epoch of :func:`fit`: train, validate, keep the best and the history, call the
    callbacks' ``on_epoch_end`` (True from any of them stops training)."""
    opts, epoch = job.options, state.epoch
    sign = 1.0 if opts.mode == "max" else -1.0
    metrics = train_one_epoch(job, loader, epoch, state, callbacks)
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
    for cb in callbacks:  # in order: a later one (the checkpointer) sees an earlier stop
        if cb.on_epoch_end(state, metrics, is_best):
            state.stopped_early = True
    if state.stopped_early:
        log(f"stopped early after epoch {epoch + 1}")
