"""The training loop: plain PyTorch, readable in one screen.

Takes plain objects (modules, loaders, optimizer), never a config. The teacher, when given, is
frozen: ``eval()``, no gradients, not in the optimizer, and it sees exactly the augmented batch the
student sees ("a good teacher is patient and consistent", Beyer et al. 2022).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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


def train_one_epoch(
    model: nn.Module,
    teacher: nn.Module | None,
    objective: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    epoch: int,
    precision: str = "32",
    channels_last: bool = False,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader``; returns sample-averaged loss terms, lr and throughput."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    total = len(loader) if max_steps is None else min(len(loader), max_steps)  # type: ignore[arg-type]
    start = time.perf_counter()
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, (x, y, _) in enumerate(bar):
        if step >= total:
            break
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            t_out = None
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
            terms = objective(model(x), t_out, y)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise DivergedError(
                f"non-finite loss at epoch {epoch} step {step} ({detail}); "
                "lower optimizer.lr or enable trainer.grad_clip"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = y.shape[0]
        seen += n
        for k, v in terms.items():
            sums[k] += v.item() * n
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", img_s=f"{seen / elapsed:.0f}")
    bar.close()
    elapsed = time.perf_counter() - start
    out = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
    out["train/lr"] = optimizer.param_groups[0]["lr"]
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
    teacher: nn.Module | None = None,
    precision: str = "32",
    channels_last: bool = False,
    prefix: str = "val",
    progress: bool = False,
) -> tuple[dict[str, float], np.ndarray]:
    """Top-1 / top-5 accuracy, loss terms (if ``objective``) and the confusion matrix.

    The confusion matrix has true classes in rows and predictions in columns.
    """
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    sums: dict[str, float] = defaultdict(float)
    correct5 = seen = 0
    k = min(5, num_classes)
    for x, y, _ in tqdm(loader, desc=prefix, leave=False, disable=not progress):
        x, y = to_device(x, device, channels_last), y.to(device)
        with autocast(device, precision):
            out = model(x)
            if objective is not None:
                t_out = teacher(x) if teacher is not None else None
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


def fit(
    model: nn.Module,
    teacher: nn.Module | None,
    objective: nn.Module,
    train_loader: Callable[[int], Iterable],
    val_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    epochs: int,
    num_classes: int,
    monitor: str = "val/top1",
    mode: str = "max",
    on_epoch_end: Callable[[int, Mapping[str, float], bool], bool | None] | None = None,
    precision: str = "32",
    channels_last: bool = False,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train for ``epochs``; after each, validate and call
    ``on_epoch_end(epoch, metrics, is_best)``, which may return True to stop early (a pruned
    sweep trial).

    ``train_loader(epoch)`` returns that epoch's loader (its augmentation depends on the epoch).
    Returns the metrics of the best epoch by ``monitor`` (``mode`` max or min).
    """
    best: dict[str, float] = {}
    for epoch in range(epochs):
        metrics = train_one_epoch(
            model,
            teacher,
            objective,
            train_loader(epoch),
            optimizer,
            scheduler,
            device,
            epoch,
            precision=precision,
            channels_last=channels_last,
            max_steps=max_steps,
            grad_clip=grad_clip,
            progress=progress,
        )
        val, _ = evaluate(
            model,
            val_loader,
            device,
            num_classes,
            objective,
            teacher,
            precision=precision,
            channels_last=channels_last,
        )
        metrics.update(val)
        if monitor not in metrics:
            raise KeyError(f"objective {monitor!r} is not among the metrics {sorted(metrics)}")
        sign = 1.0 if mode == "max" else -1.0
        is_best = not best or sign * metrics[monitor] > sign * best[monitor]
        if is_best:
            best = {**metrics, "epoch": epoch}
        log(
            f"epoch {epoch + 1}/{epochs}  loss {metrics['train/loss']:.4f}  "
            f"val top1 {metrics['val/top1']:.2f}  top5 {metrics['val/top5']:.2f}  "
            f"lr {metrics['train/lr']:.3g}  {metrics['train/throughput_img_s']:.0f} img/s"
            + ("  *best*" if is_best else "")
        )
        if on_epoch_end is not None and on_epoch_end(epoch, metrics, is_best):
            log(f"stopped early after epoch {epoch + 1}")
            break
    return best
