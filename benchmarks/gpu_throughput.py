"""GPU check (one H100-class GPU): training throughput of teacher and student, the teacher
cache's build rate, and a student step with the input pipeline included. Each figure is printed
when it is measured, the compile modes (minutes of compilation each) last, so a run stopped at a
time limit keeps the rest (``experiments/gpu_check.sh`` runs it with ``--compile false``; with
``PART=scaling``, ``--only-ce --compile false,default,reduce-overhead``).

Everything goes through the project's own path (composed configs, ``conkd.run.setup``,
``conkd.engine.train_one_epoch``) at 128 px with bf16 autocast and channels_last, with and
without ``torch.compile``:

1. teacher (ResNet-101, CE) and student (ResNet-18, CE) img/s on the decode-once pipeline;
2. the teacher cache build (``TeacherCache.build`` through ``setup`` with a fresh cache dir):
   img/s of teacher forward passes stored;
3. the mission's student (``loss=lsd+supcon optimizer=lion``) reading that cache: img/s with
   the input pipeline (gather, augmentation on the GPU) included, and the host synchronisations
   in one epoch of it, by source line (``torch.cuda.set_sync_debug_mode``).

    python benchmarks/gpu_throughput.py --data ../shared/data/imagenette --image-size 128

Prints one line per figure, with the device name and, for the CE rows, the achieved TFLOP/s:
img/s times the network's forward + backward FLOPs per image (counted by torch's
``FlopCounterMode`` on one step of a fresh copy of the network), so the distance to the chip's
peak (an H200: about 990 dense bf16 TFLOP/s) is visible. ``--device cpu --steps 2
--image-size 32`` checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import (
    DATA,
    QUIET,
    cache_metas,
    dataset_overrides,
    epoch_rate,
    missing_dataset,
    parser,
    setup_parts,
    train_teacher,
)


def train_flops(spec: dict, image_size: int, device: object) -> float:
    """Forward + backward FLOPs per image of one training step of the network ``spec``
    describes (a fresh copy: the benchmarked one may be compiled or wrapped)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from conkd.checkpoint import instantiate_model

    net = instantiate_model(spec).to(device).train()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        net(x)["logits"].float().sum().backward()
    return counter.get_total_flops() / 2


def throughput(overrides: list[str], steps: int) -> tuple[float, object, float]:
    """img/s of ``steps`` training steps after one warm-up epoch of 3 steps, and that epoch's
    seconds (compilation included: what a whole run pays once)."""
    parts = setup_parts(overrides)
    start = time.perf_counter()
    epoch_rate(parts, 0, 3)  # warm-up / compile
    warmup = time.perf_counter() - start
    parts.job.options.max_steps = steps
    return epoch_rate(parts, 1, steps, count_loader=True)[0], parts, warmup


def compile_overrides(mode: str) -> list[str]:
    """``--compile`` entries: ``false``, or a ``torch.compile`` mode (``true`` = default)."""
    if mode == "false":
        return ["trainer.compile=false"]
    return ["trainer.compile=true", f"trainer.compile_mode={'default' if mode == 'true' else mode}"]


def report(what: str, ips: float, tflops: float | None = None, first: float | None = None) -> None:
    """One figure's line, printed as soon as it is measured (a run stopped at the device call's
    time limit keeps what it measured)."""
    achieved = f"  {tflops:7.2f} TFLOP/s" if tflops is not None else ""
    warm = f"  first 3 steps {first:.1f} s" if first is not None else ""
    print(f"{what:<62} {ips:8.0f} img/s{achieved}{warm}", flush=True)


def ce_throughput(common: list[str], compiled: str, who: str, arch: str, work: Path,
                  steps: int, image_size: int) -> float:  # fmt: skip
    """1.: img/s of ``arch`` trained with CE under one ``trainer.compile`` setting, reported with
    its achieved TFLOP/s and its first steps' seconds (compilation included)."""
    overrides = [
        *common,
        "stage=teacher",
        "loss=ce",
        f"model={arch}",
        *compile_overrides(compiled),
        f"paths.output_dir={work}/{who}{compiled}",
    ]
    ips, parts, warmup = throughput(overrides, steps)
    flops = train_flops(parts.spec, image_size, parts.job.device)
    report(f"{who} {arch} CE, compile={compiled}", ips, ips * flops / 1e12, warmup)
    return ips


def lion_kernels(common: list[str], work: Path, steps: int) -> None:
    """img/s of the student trained with CE and Lion per ``trainer.optimizer_kernel`` (the
    plain per-tensor loop, lion-pytorch's foreach module) and with its triton kernel."""
    for name, extra in (("plain", ["trainer.optimizer_kernel=plain"]),
                        ("foreach (fused)", ["trainer.optimizer_kernel=fused"]),
                        ("triton", ["+optimizer.use_triton=true"])):  # fmt: skip
        overrides = [*common, "stage=teacher", "loss=ce", "model=resnet18", "optimizer=lion",
                     *extra, f"paths.output_dir={work}/lion-{name.split()[0]}"]  # fmt: skip
        try:
            report(f"student resnet18 CE, Lion {name}", throughput(overrides, steps)[0])
        except Exception as err:  # triton needs its package and a GPU
            why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            print(f"Lion {name}: not measured ({why})", flush=True)


def cached_student(common: list[str], work: Path, steps: int, batch_size: int) -> float:
    """2. and 3.: train a teacher to distil from, then the mission's student building and
    reading its cache; reports the cache's build rate and the student's img/s (returned)."""
    teacher = train_teacher(common, f"{work}/t")
    cache_dir = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    student = [
        *common,
        "loss=lsd+supcon",
        "optimizer=lion",
        f"teacher_cache.dir={cache_dir}",
        teacher,
        f"paths.output_dir={work}/s",
        f"trainer.max_steps_per_epoch={steps}",
    ]
    ips, parts, _ = throughput(student, steps)
    (meta,) = cache_metas(cache_dir)
    stored = meta["epochs"] * min(steps * batch_size, meta["n_train"]) + meta["n_val"]
    report("teacher cache build (resnet101 forward + store)", stored / meta["build_seconds"])
    report("student lsd+supcon lion from cache, input pipeline included", ips)
    host_syncs(parts, steps)
    return ips


def host_syncs(parts: object, steps: int) -> None:
    """The synchronising CUDA calls in one more epoch of ``parts`` (torch's sync debug mode
    warns at each), counted by the Python line that made them: the loop should make one per
    ``trainer.sync_every_steps`` and one at the epoch's end, not one per step."""
    import warnings

    import torch

    if parts.job.device.type != "cuda":
        print("host synchronisations per epoch: not measured (sync debug mode needs CUDA)")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            epoch_rate(parts, 1, steps)  # epoch 1 again: the cache holds epochs 0 and 1 only
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    where = ", ".join(f"{site} x{n}" for site, n in sites.most_common(6)) or "none"
    print(f"host synchronisations in {steps} steps of that student, input included: "
          f"{sum(sites.values())} ({where})", flush=True)  # fmt: skip


def main() -> int:
    args = parser(
        __doc__, data=DATA, image_size=128, batch_size=128, steps=30, device="auto",
        compile=("false,default,reduce-overhead", "false or torch.compile modes to time"),
        only_ce=(False, "only the CE rows per compile mode: no cache, no Lion kernels"),
        workdir=str(Path(tempfile.gettempdir()) / "conkd-gpu-bench"),
    ).parse_args()  # fmt: skip
    if missing_dataset(args.data):
        return 0
    import torch

    from conkd.builders import resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    work = Path(args.workdir)
    fast = "bf16" if device.type == "cuda" else "32"
    common = [
        *dataset_overrides(args.data, args.image_size, args.batch_size, work, workers=4),
        f"trainer.device={args.device}",
        f"trainer.precision={fast}",
        "trainer.channels_last=true",
        "trainer.max_steps_per_epoch=3",
        "trainer.epochs=2",
        *QUIET,
    ]
    print(f"{name}, torch {torch.__version__}, {args.image_size} px, batch {args.batch_size}, "
          f"precision {fast}, channels_last", flush=True)  # fmt: skip
    # The uncompiled rows and the cached student's ratio first, then Lion's kernels, then the
    # compile modes (minutes of compilation each): what a time limit cuts comes last.
    modes = args.compile.split(",")
    plain = [m for m in modes if m == "false"]
    ce = {
        arch: ce_throughput(common, m, who, arch, work, args.steps, args.image_size)
        for m in plain
        for who, arch in (("teacher", "resnet101"), ("student", "resnet18"))
    }
    if not args.only_ce:
        ips = cached_student(common, work, args.steps, args.batch_size)
        if ce:
            print(f"cached-teacher student / CE student (compile=false): "
                  f"{ips / ce['resnet18']:.3f}x", flush=True)  # fmt: skip
        lion_kernels(common, work, args.steps)
    for mode in (m for m in modes if m != "false"):
        for who, arch in (("teacher", "resnet101"), ("student", "resnet18")):
            ce_throughput(common, mode, who, arch, work, args.steps, args.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
