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

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import ROOT, compose, missing_dataset  # noqa: E402


def throughput(overrides: list[str], steps: int) -> tuple[float, object]:
    """img/s of ``steps`` training steps (after one warm-up epoch of 3 steps)."""
    import torch

    from conkd.engine import TrainState, train_one_epoch
    from conkd.run import setup

    parts = setup(compose(overrides), None)
    train_one_epoch(parts.job, parts.data.train_loader(0), 0, TrainState())  # warm-up / compile
    if parts.job.device.type == "cuda":
        torch.cuda.synchronize()
    parts.job.options.max_steps = steps
    start = time.perf_counter()
    train_one_epoch(parts.job, parts.data.train_loader(1), 1, TrainState())
    if parts.job.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * parts.data.batch_size / (time.perf_counter() - start), parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette"))
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", default="false,true", help="trainer.compile settings to time")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "conkd-gpu-bench"))
    args = ap.parse_args()
    data = Path(args.data)
    if missing_dataset(args.data):
        return 0
    import torch

    from conkd.run import resolve_device, run

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    work = Path(args.workdir)
    fast = "bf16" if device.type == "cuda" else "32"
    common = [
        "dataset=imagefolder",
        f"dataset.root={data}",
        "dataset.source.verify=false",
        f"dataset.image_size={args.image_size}",
        f"dataset.batch_size={args.batch_size}",
        "dataset.num_workers=4",
        f"dataset.decode.dir={work}/decoded",
        f"trainer.device={args.device}",
        f"trainer.precision={fast}",
        "trainer.channels_last=true",
        "trainer.max_steps_per_epoch=3",
        "trainer.epochs=2",
        "trainer.progress=false",
        "mlflow.enabled=false",
    ]
    results: dict[str, float] = {}
    for compiled in args.compile.split(","):
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
                args.steps,
            )
            results[f"{who} {arch} CE, compile={compiled}"] = ips
    # a teacher checkpoint to distil from (2 quick steps)
    run(
        compose(
            [
                *common,
                "experiment=teacher",
                "trainer.epochs=1",
                "trainer.max_steps_per_epoch=2",
                f"paths.output_dir={work}/t",
            ]
        )
    )
    cache_dir = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    student = [
        *common,
        "loss=lsd+supcon",
        "optimizer=lion",
        f"teacher_cache.dir={cache_dir}",
        f"teacher_ckpt={work}/t/checkpoints/best.pt",
        f"paths.output_dir={work}/s",
        f"trainer.max_steps_per_epoch={args.steps}",
    ]
    ips, parts = throughput(student, args.steps)
    (meta,) = [json.loads(m.read_text()) for m in cache_dir.glob("*/meta.json")]
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
