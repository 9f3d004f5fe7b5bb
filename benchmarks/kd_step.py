"""Benchmark: a distillation step reading the teacher cache vs a plain CE student step.

Both sides are the project's own path (the real configs composed by Hydra, ``conkd.run.setup``,
``conkd.engine.train_one_epoch``) with the same ResNet-18, batch, resolution, optimizer and
decode-once input; the KD side uses the mission's ``loss=lsd+supcon`` with its teacher's outputs
read from the cache (built once before timing), the CE side ``loss=ce`` with no teacher. With
``--online`` the online ResNet-101 teacher is timed too. Rounds alternate so noise hits all alike.

    python benchmarks/kd_step.py --data ../shared/data/imagenette --image-size 64 --steps 20

Prints images/s of each and, last, ``ratio kd(cache)/ce step time: X.XX`` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import ROOT, compose, missing_dataset, scratch_dir  # noqa: E402


def timed_epoch(overrides: list[str], epoch: int, steps: int) -> float:
    """Images/s of one epoch of ``steps`` steps through the project's loop."""
    from conkd.engine import TrainState, train_one_epoch
    from conkd.run import setup

    parts = setup(compose(overrides), None)
    loader = parts.data.train_loader(epoch)
    start = time.perf_counter()
    train_one_epoch(parts.job, loader, epoch, TrainState())
    return steps * parts.data.batch_size / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--online", action="store_true", help="also time the online teacher")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "conkd-bench-cache"))
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()

    data = Path(args.data)
    if missing_dataset(args.data):
        return 0
    from conkd.run import run

    out = scratch_dir("conkd-bench-kd-", args.keep)
    rounds = args.rounds
    common = [
        "dataset=imagefolder",
        f"dataset.root={data}",
        "dataset.source.verify=false",
        f"dataset.image_size={args.image_size}",
        f"dataset.batch_size={args.batch_size}",
        f"dataset.decode.dir={args.cache_dir}/decoded",
        f"teacher_cache.dir={out}/teacher_cache",
        "trainer.progress=false",
        "trainer.device=cpu",
        f"trainer.epochs={rounds + 1}",
        f"trainer.max_steps_per_epoch={args.steps}",
        "mlflow.enabled=false",
    ]
    # a small ResNet-101 teacher (its accuracy does not matter for timing)
    run(
        compose(
            [
                *common,
                "experiment=teacher",
                "trainer.epochs=1",
                "trainer.max_steps_per_epoch=2",
                f"paths.output_dir={out}/teacher",
            ]
        )
    )
    teacher = f"teacher_ckpt={out}/teacher/checkpoints/best.pt"
    ce = [*common, "loss=ce", f"paths.output_dir={out}/ce"]
    kd = [*common, "loss=lsd+supcon", teacher, f"paths.output_dir={out}/kd"]
    online = [*kd, "teacher_cache.enabled=false"]
    timed_epoch(kd, 0, args.steps)  # builds the cache (all epochs), outside the timing
    results: dict[str, list[float]] = {"ce": [], "kd (cache)": [], "kd (online)": []}
    sides = {"ce": ce, "kd (cache)": kd, **({"kd (online)": online} if args.online else {})}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # ABBA: no order bias
        for name in order:
            results[name].append(timed_epoch(sides[name], r + 1, args.steps))
    import torch

    print(
        f"resnet18 student, resnet101 teacher, {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps} steps, Lion, decode-once input, {torch.get_num_threads()} threads"
    )
    best = {k: max(v) for k, v in results.items() if v}
    for name, value in best.items():
        print(f"{name:<12} {value:7.1f} img/s (best of {rounds})")
    if "kd (online)" in best:
        print(f"ratio kd(online)/ce step time: {best['ce'] / best['kd (online)']:.2f}")
    print(f"ratio kd(cache)/ce step time: {best['ce'] / best['kd (cache)']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
