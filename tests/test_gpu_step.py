"""The training step near the chip, checked on the CPU: no host synchronisation per step (the
loop reads its losses on the host every ``trainer.sync_every_steps``), and a non-finite loss still
names its batch."""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conkd.devices import copies_done, download, upload
from conkd.engine import TrainState, train_one_epoch
from conkd.errors import ConKDError, DivergedError
from conkd.optimizers import describe, fast_optimizer
from tests.conftest import ROOT, tiny_overrides

CONKD = str(ROOT / "conkd")
#: What waits for the device when a tensor lives on a GPU.
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class Reads(Counter):
    """Calls of :data:`SYNCS` on tensors made by ConKD's own code while ``on``, by method and
    by ``method file:line``."""

    on = False


@pytest.fixture
def host_reads(monkeypatch) -> Reads:
    counts = Reads()
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            f = sys._getframe(1)
            if counts.on and f.f_code.co_filename.startswith(CONKD):
                counts[_name] += 1
                counts[f"{_name} {Path(f.f_code.co_filename).name}:{f.f_code.co_name}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.fixture
def tiny(image_folder: Path, tmp_path: Path) -> list[str]:
    return tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns")


def student_parts(compose_cfg, tiny, teacher_run: Path, *extra: str):
    """The mission's student (LS-KD + SupCon, Lion) with an online teacher, mixing and an EMA:
    every part of a step that could read a tensor on the host."""
    from conkd.run import setup

    cfg = compose_cfg([
        *tiny, "loss=lsd+supcon", "optimizer=lion", "model@teacher=resnet18",
        f"teacher_ckpt={teacher_run}/checkpoints/best.pt",
        "teacher_cache.enabled=false", "trainer.ema_decay=0.9", "dataset.mix.mixup_alpha=0.2",
        "dataset.mix.cutmix_alpha=1.0", "mlflow.enabled=false", "trainer.grad_clip=1.0", *extra,
    ])  # fmt: skip
    return setup(cfg, None)


def batches(n: int, size: int = 4, classes: int = 3) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.rand(size, 3, 32, 32, generator=g), torch.arange(size) % classes, torch.arange(size))
        for _ in range(n)
    ]


def test_a_training_step_reads_nothing_on_the_host(compose_cfg, tiny, teacher_run, host_reads):
    parts = student_parts(compose_cfg, tiny, teacher_run)
    parts.job.options.max_steps = None
    state, host_reads.on = TrainState(), True
    metrics = train_one_epoch(parts.job, batches(100), 0, state)
    host_reads.on = False
    # one read every 50 steps (steps 50 and 100), none at the end: nothing was left unread
    assert host_reads == Counter({"tolist": 2, "tolist engine.py:sync": 2}), host_reads
    assert state.step == 100 and metrics["train/loss"] > 0


def test_the_sums_match_a_per_step_read(compose_cfg, tiny, teacher_run) -> None:
    """Read every step or every 7: the same epoch sums (the tally only moves the read)."""
    results = []
    for every in (1, 7):
        parts = student_parts(compose_cfg, tiny, teacher_run, f"trainer.sync_every_steps={every}")
        parts.job.options.max_steps = None
        torch.manual_seed(0)
        results.append(train_one_epoch(parts.job, batches(10), 0, TrainState()))
    for k in ("train/loss", "train/kd", "train/supcon", "train/ce"):
        assert results[0][k] == pytest.approx(results[1][k], rel=1e-12), k


def test_a_late_read_still_names_the_first_non_finite_batch(compose_cfg, tiny, teacher_run):
    # no mixing: it would spread the bad pixel to the image's partner (2 values)
    no_mix = ("dataset.mix.mixup_alpha=0.0", "dataset.mix.cutmix_alpha=0.0")
    parts = student_parts(compose_cfg, tiny, teacher_run, *no_mix)
    parts.job.options.max_steps = None
    data = batches(30)
    data[23][0][1, 2, 3, 4] = float("inf")
    state = TrainState()
    with pytest.raises(DivergedError, match=r"input batch at epoch 0 batch 23 holds 1 NaN/Inf"):
        train_one_epoch(parts.job, data, 0, state)
    assert state.seen == 0 and state.sums == {}  # nothing of the bad window reached the state


# --- the optimizer's kernel --------------------------------------------------------------------

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def one_step(make, seed: int = 0) -> list[torch.Tensor]:
    """The parameters of a small network after two steps of ``make`` on fixed gradients."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = make(net.parameters())
    for _ in range(2):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_the_fast_kernel_is_chosen_on_cuda_and_left_alone_elsewhere() -> None:
    from lion_pytorch import Lion
    from lion_pytorch.foreach import Lion as ForeachLion

    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    assert fast_optimizer(adamw, CUDA).keywords == {"lr": 1e-3, "weight_decay": 0.05, "fused": True}
    assert fast_optimizer(adamw, CPU) is adamw  # auto: plain off CUDA
    assert fast_optimizer(adamw, CUDA, "plain") is adamw
    assert fast_optimizer(functools.partial(torch.optim.SGD, lr=0.1), CUDA).keywords["fused"]
    lion = functools.partial(Lion, lr=3e-4, betas=(0.95, 0.98), weight_decay=0.5)
    assert fast_optimizer(lion, CUDA).func is ForeachLion
    # what the config says itself wins: an explicit foreach, Lion's triton kernel
    own = functools.partial(torch.optim.AdamW, lr=1e-3, foreach=False)
    assert fast_optimizer(own, CUDA) is own
    triton = functools.partial(Lion, lr=3e-4, use_triton=True)
    assert fast_optimizer(triton, CUDA) is triton
    with pytest.raises(ValueError, match="optimizer_kernel must be one of"):
        fast_optimizer(adamw, CUDA, "fast")


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.05),
        functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        functools.partial(__import__("lion_pytorch").Lion, lr=1e-2, weight_decay=0.5),
    ],
    ids=["adamw", "sgd", "lion"],
)
def test_the_fast_kernel_computes_the_same_update(make) -> None:
    """Forced on the CPU (torch's fused CPU kernels, lion-pytorch's foreach module): the same
    parameters as the plain kernel after two steps, to float32 rounding."""
    fast = fast_optimizer(make, CPU, "fused")
    assert fast is not make
    for plain, quick in zip(one_step(make), one_step(fast), strict=True):
        torch.testing.assert_close(quick, plain, rtol=1e-6, atol=1e-7)


def test_the_run_logs_the_kernel_it_chose(compose_cfg, tiny) -> None:
    from conkd.run import setup

    ce = [*tiny, "stage=teacher", "loss=ce", "teacher_ckpt=null", "mlflow.enabled=false"]
    parts = setup(compose_cfg([*ce, "optimizer=lion", "trainer.optimizer_kernel=fused",
                               ]), None)  # fmt: skip
    assert describe(parts.job.optimizer) == "lion_pytorch.foreach.Lion"
    with pytest.raises(ConKDError, match="trainer.optimizer_kernel must be one of auto, fused, pl"):
        setup(compose_cfg([*ce, "trainer.optimizer_kernel=fast"]), None)


def test_the_gpu_memory_cap_is_checked_and_applied_only_on_cuda(monkeypatch) -> None:
    from conkd.builders import limit_gpu_memory

    calls: list = []

    def cap(fraction, device=None) -> None:
        # torch takes an index or None (the current device), and refuses an index-less "cuda"
        assert device is None or isinstance(device, int), device
        assert isinstance(fraction, float), fraction  # torch refuses an int too
        calls.append((fraction, device))

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", cap)
    limit_gpu_memory(CPU, 0.25)
    limit_gpu_memory(CUDA, None)
    assert calls == []
    limit_gpu_memory(CUDA, 0.25)
    limit_gpu_memory(torch.device("cuda:1"), 1)
    assert calls == [(0.25, None), (1.0, 1)]
    with pytest.raises(ConKDError, match=r"gpu_memory_fraction must be in \(0, 1\]"):
        limit_gpu_memory(CUDA, 1.5)


# --- host-to-device copies -----------------------------------------------------------------------

DEVICES = str(ROOT / "conkd" / "devices.py")


def test_upload_queues_a_copy_out_of_pinned_memory_on_cuda(monkeypatch) -> None:
    """A plain ``.to("cuda")`` from pageable memory waits for the device; ``upload`` pins (unless
    pinned already) and copies with ``non_blocking=True``; off CUDA it is a plain ``.to``."""
    seen: list = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: getattr(self, "_pinned", False))

    def pin(self):
        seen.append("pin")
        out = self.clone()
        out._pinned = True
        return out

    def to(self, *args, **kwargs):
        seen.append(("to", getattr(self, "_pinned", False), args, kwargs))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    upload(torch.zeros(2), CUDA)
    assert seen == ["pin", ("to", True, (CUDA,), {"non_blocking": True})]
    seen.clear()
    pinned = torch.zeros(2)
    pinned._pinned = True
    upload(pinned, CUDA)
    upload(torch.zeros(2), CPU)
    assert seen == [("to", True, (CUDA,), {"non_blocking": True}), ("to", False, (CPU,), {})]
    seen.clear()
    # an expanded view is made dense before pinning (pinning it as it is would fail)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: seen.append(self.stride()))
    upload(torch.zeros(1, 3).expand(4, 3), CUDA)
    assert seen == ["pin", (3, 1)]


def test_download_queues_a_copy_into_kept_pinned_memory_on_cuda(monkeypatch) -> None:
    """From a CUDA tensor, ``download`` copies into pinned memory with ``non_blocking=True``
    (the caller does not wait for the device) and reuses a matching pinned buffer; elsewhere it
    is a plain copy. ``copies_done`` records one event per CUDA device on its current stream."""
    real_device = torch._C.TensorBase.device.__get__
    monkeypatch.setattr(torch.Tensor, "device", property(
        lambda self: CUDA if getattr(self, "_cuda", False) else real_device(self)))  # fmt: skip
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: getattr(self, "_pinned", False))
    made, copies = [], []
    real_empty_like, real_copy = torch.empty_like, torch.Tensor.copy_

    def empty_like(t, *, device, pin_memory):
        made.append((device, pin_memory))
        out = real_empty_like(t, device=device)
        out._pinned = pin_memory
        return out

    def copy_(self, src, non_blocking=False):
        copies.append(non_blocking)
        return real_copy(self, src)

    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    weights = torch.arange(6.0).view(2, 3)
    weights._cuda = True
    first = download(weights)
    again = download(weights, into=first)
    assert made == [("cpu", True)] and copies == [True, True] and again is first
    assert torch.equal(first, torch.arange(6.0).view(2, 3))
    made.clear(), copies.clear()
    download(torch.zeros(2, 3), into=torch.zeros(3, 2))  # another shape: a new buffer
    assert made == [("cpu", False)] and copies == [False]

    recorded = []

    class Event:
        def __init__(self, blocking: bool = False) -> None:
            assert blocking  # the writer thread sleeps while it waits

        def record(self, stream):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    assert len(copies_done([CUDA, CPU, CUDA])) == 1 and recorded == [f"stream of {CUDA}"]
    assert copies_done([CPU]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_background_checkpoint_on_cuda_holds_the_values_of_its_save(tmp_path: Path) -> None:
    from conkd.checkpoint import Checkpointer, load_checkpoint

    model = torch.nn.Linear(256, 256).to(CUDA)
    opt = torch.optim.AdamW(model.parameters())
    writer = Checkpointer(tmp_path, model, {}, opt, background=True)
    before = model.weight.detach().cpu()
    writer.save_last(TrainState())
    with torch.no_grad():
        for _ in range(100):  # queued after the copy: they must not reach the file
            model.weight.add_(1.0)
    writer.close()
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["state_dict"]["weight"], before)


@pytest.mark.parametrize(
    ("crop", "resident"),
    [("resized", "true"), ("pad", "false")],
    ids=["resized-resident", "pad-mapped"],
)
def test_every_per_batch_copy_to_the_device_goes_through_upload(
    compose_cfg, tiny, teacher_run, monkeypatch, crop: str, resident: str
) -> None:
    """A training epoch and a validation pass of the mission's student through the real loader
    and teacher cache, the arrays and cache resident on the device or memory-mapped (the CPU as
    the device), each crop's path: ConKD's code moves tensors to the device only inside
    :mod:`conkd.devices`, so no step makes the host wait for a CUDA device's queue."""
    from conkd.engine import validate
    from conkd.run import setup

    direct: Counter = Counter()

    def counting(real, moves):
        def wrapper(*args, **kwargs):
            f = sys._getframe(1)
            name = f.f_code.co_filename
            if moves(args, kwargs) and name.startswith(CONKD) and name != DEVICES:
                direct[f"{real.__name__} {Path(name).name}:{f.f_code.co_name}"] += 1
            return real(*args, **kwargs)

        return wrapper

    # Tensor.to with a device; torch.tensor / as_tensor made from host data on a device
    to = counting(torch.Tensor.to, lambda a, kw: "device" in kw
                  or any(isinstance(x, torch.device | str) for x in a[1:]))  # fmt: skip
    on_device = lambda a, kw: kw.get("device") is not None  # noqa: E731

    cfg = compose_cfg([
        *tiny, "loss=lsd+supcon", "optimizer=lion", "model@teacher=resnet18",
        f"teacher_ckpt={teacher_run}/checkpoints/best.pt", "teacher_cache.enabled=true",
        f"teacher_cache.resident={resident}", f"dataset.decode.resident={resident}",
        "mlflow.enabled=false", f"dataset.augment.crop={crop}",
    ])  # fmt: skip
    parts = setup(cfg, None)
    monkeypatch.setattr(torch.Tensor, "to", to)
    for make in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, make, counting(getattr(torch, make), on_device))
    train_one_epoch(parts.job, parts.loaders.train(0), 0, TrainState())
    validate(parts.job, parts.loaders.eval("val"))
    assert direct == Counter(), direct


def test_cudnn_autotuning_follows_the_config_on_cuda_only(monkeypatch) -> None:
    from conkd.builders import tune_convolutions

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    tune_convolutions(CPU, True)
    assert torch.backends.cudnn.benchmark is False
    tune_convolutions(CUDA, True)
    assert torch.backends.cudnn.benchmark is True
    tune_convolutions(CUDA, False)
    assert torch.backends.cudnn.benchmark is False
