"""One run on many processes: ``torchrun --nproc_per_node=N train.py ...``.

torchrun sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`setup` joins the process group
(NCCL on GPUs, gloo on the CPU). What the rest of ConKD does with it:

* ``dataset.batch_size`` stays the *global* batch: every rank takes its contiguous ``B / N``
  slice of each batch of the (seed, epoch) order, so the samples, their views (seeded per
  sample) and their cached teacher outputs are exactly those of a one-process run.
* the student is wrapped in DistributedDataParallel; BatchNorm statistics are synchronised over
  the global batch (torch's SyncBatchNorm on GPUs; :class:`AllReduceBatchNorm` on the CPU,
  where torch's SyncBatchNorm does not run);
* SupCon contrasts the global batch: :func:`gather_with_grad` collects every rank's
  projections, gradients flow back to each rank's own part;
* evaluation shards the split and sums its counts over ranks; training metrics are summed too;
* logging, checkpoints and MLflow happen on rank 0 only; the pruner's decision is broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank, number of processes, local GPU index."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Context:
    """The context torchrun describes in the environment (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    return Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(ctx: Context, device: torch.device) -> torch.device:
    """Join the process group; returns the device this rank trains on (its own GPU)."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (no-op on one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Element-wise sum over ranks (a copy; no-op on one process)."""
    if not active():
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def rank_slice(positions: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of one global batch (``len(positions)`` divisible by
    ``world`` for training batches; evaluation batches may give the last ranks one less)."""
    n = len(positions)
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return list(positions[start : start + per + (1 if rank < extra else 0)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and hands
    each rank the slice of its own rows (all_reduce + slice, which gloo supports)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's ``x`` concatenated in rank order; gradients flow to each rank's own rows.

    Every rank then computes the same global loss, so after DDP averages the parameter
    gradients they equal the one-process gradient of that loss. Needs equal row counts.
    """
    return _GatherWithGrad.apply(x) if active() else x


def gather(x: Tensor) -> Tensor:
    """Every rank's ``x`` (no gradient), in rank order."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class AllReduceBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, from one
    all_reduce of per-channel sums; for the CPU (gloo), where ``nn.SyncBatchNorm`` refuses to
    run. Outside training or a process group it is a plain BatchNorm2d."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # autograd-aware sum

        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:c] / n
        # two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels badly in fp32
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        shape = (1, c, 1, 1)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch: torch's SyncBatchNorm on GPUs, ours on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, AllReduceBatchNorm):
            bn = AllReduceBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn.to(device))
        else:
            sync_batchnorm(child, device)
    return model


def wrap(model: nn.Module, ctx: Context, device: torch.device, all_used: bool = True) -> nn.Module:
    """The student as DDP with global-batch BatchNorm (unchanged on one process).
    ``all_used=False``: some parameters get no gradient (a projection head the loss does not
    read), which DDP must be told."""
    if not ctx.enabled:
        return model
    model = sync_batchnorm(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=not all_used
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP (what checkpoints store)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
