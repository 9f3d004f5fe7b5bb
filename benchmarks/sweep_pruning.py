"""Benchmark: the same Optuna sweep with and without the median pruner, side by side.

Runs ``python train.py -m hparams_search=conkd_lion`` twice on Imagenette (class folders) at a
small size, with the same sampler seed, once with ``hydra/sweeper/pruner=median`` and once with
``hydra/sweeper/pruner=none``, and prints the epochs each consumed, the best validation top-1
each found, wall time, and the ratios.

    python benchmarks/sweep_pruning.py --data ../shared/data/imagenette --trials 8 --epochs 4

Without ``--teacher-ckpt`` it first trains a small ResNet-101 teacher on the same data.
"""

from __future__ import annotations

from pathlib import Path

from _common import (
    DATA,
    ROOT,
    dataset_overrides,
    dated_dir,
    lion_sweep,
    missing_dataset,
    parser,
    sweep_teacher,
)


def main() -> int:
    args = parser(
        __doc__, data=DATA, trials=8, epochs=4, image_size=32,
        steps=(40, "training steps per epoch (batch 64)"), teacher_ckpt=None,
        out=str(ROOT / "outputs" / "bench_pruning"),
    ).parse_args()  # fmt: skip
    if missing_dataset(args.data):
        return 0
    data = Path(args.data)
    out = dated_dir(args.out)
    common = [
        *dataset_overrides(data, args.image_size, 64, verify=True),
        "model.small_stem=false",
        "teacher.small_stem=false",
        f"trainer.max_steps_per_epoch={args.steps}",
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.experiment_name=bench-pruning",
    ]
    teacher = sweep_teacher(args.teacher_ckpt, common, out, "trainer.epochs=3")
    results = {
        pruner: lion_sweep(
            out,
            pruner,
            args.trials,
            f"teacher_ckpt={teacher}",
            *common,
            f"trainer.epochs={args.epochs}",
            f"hydra/sweeper/pruner={pruner}",
        )
        for pruner in ("median", "none")
    }

    budget = args.trials * args.epochs
    print(
        f"\nsweep: {args.trials} trials x {args.epochs} epochs ({budget} epochs budget), "
        f"{args.image_size}px, {args.steps} steps/epoch, data {data}"
    )
    print(f"{'pruner':<8} {'epochs':>7} {'pruned':>7} {'best val top1':>14} {'wall s':>8}")
    for name, r in results.items():
        print(
            f"{name:<8} {r['epochs']:>7d} {r['pruned']:>7d} {r['best']:>14.2f} {r['wall_s']:>8.0f}"
        )
    m, n = results["median"], results["none"]
    print(
        f"ratio median/none: epochs {m['epochs'] / n['epochs']:.2f}, "
        f"wall time {m['wall_s'] / n['wall_s']:.2f}, best value {m['best'] / n['best']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
