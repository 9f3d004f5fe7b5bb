"""GPU check (one H100-class GPU, under 8 minutes; measured on an H200): training throughput of
teacher and student, the teacher cache's build rate, and a student step with the input pipeline
included.

Everything goes through the project's own path (composed configs, ``conkd.run.setup``,
``conkd.engine.train_one_epoch``) at 128 px with bf16 autocast and channels_last, with and
without ``torch.compile``:

1. teacher (ResNet-101, CE) and student (ResNet-18, CE) img/s on the decode-once pipeline;
2. the teacher cache build (``TeacherCache.build`` through ``setup`` with a fresh cache dir):
   img/s of teacher forward passes stored;
3. the mission's student (``loss=lsd+supcon optimizer=lion``) reading that cache: img/s with
   the input pipeline (gather, augmentation on the GPU) included.

    python benchmarks/gpu_throughput.py --data ../shared/data/imagenette --image-size 128

Prints one line per figure, with the device name; ``--device cpu --steps 2 --image-size 32``
checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import tempfile
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


def throughput(overrides: list[str], steps: int) -> tuple[float, object]:
    """img/s of ``steps`` training steps (after one warm-up epoch of 3 steps)."""
    parts = setup_parts(overrides)
    epoch_rate(parts, 0, 3)  # warm-up / compile
    parts.job.options.max_steps = steps
    return epoch_rate(parts, 1, steps, count_loader=True)[0], parts


def ce_throughputs(common: list[str], compiles: list[str], work: Path, steps: int) -> dict:
    """1.: img/s of the teacher and the student trained with CE, per ``trainer.compile``."""
    results: dict[str, float] = {}
    for compiled in compiles:
        for who, arch in (("teacher", "resnet101"), ("student", "resnet18")):
            ips, _ = throughput(
                [
                    *common,
                    "stage=teacher",
                    "loss=ce",
                    f"model={arch}",
                    f"trainer.compile={compiled}",
                    f"paths.output_dir={work}/{who}{compiled}",
                ],
                steps,
            )
            results[f"{who} {arch} CE, compile={compiled}"] = ips
    return results


def main() -> int:
    args = parser(
        __doc__, data=DATA, image_size=128, batch_size=128, steps=30, device="auto",
        compile=("false,true", "trainer.compile settings to time"),
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
    results = ce_throughputs(common, args.compile.split(","), work, args.steps)
    teacher = train_teacher(common, f"{work}/t")  # a checkpoint to distil from
    cache_dir = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    student = [
        *common,
        "loss=lsd+supcon",
        "optimizer=lion",
        f"teacher_cache.dir={cache_dir}",
        teacher,
        f"paths.output_dir={work}/s",
        f"trainer.max_steps_per_epoch={args.steps}",
    ]
    ips, parts = throughput(student, args.steps)
    (meta,) = cache_metas(cache_dir)
    stored = meta["epochs"] * min(args.steps * args.batch_size, meta["n_train"]) + meta["n_val"]
    results["teacher cache build (resnet101 forward + store)"] = stored / meta["build_seconds"]
    results["student lsd+supcon lion from cache, input pipeline included"] = ips
    print(
        f"\n{name}, torch {torch.__version__}, {args.image_size} px, batch {args.batch_size}, "
        f"precision {fast}, channels_last"
    )
    for what, value in results.items():
        print(f"{what:<62} {value:8.0f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
