"""Benchmark: the same Optuna sweep with and without the median pruner, side by side.

Runs ``python train.py -m hparams_search=conkd_lion`` twice on Imagenette (class folders) at a
small size, with the same sampler seed, once with ``hydra/sweeper/pruner=median`` and once with
``hydra/sweeper/pruner=none``, and prints the epochs each consumed, the best validation top-1
each found, wall time, and the ratios.

    python benchmarks/sweep_pruning.py --data ../shared/data/imagenette --trials 8 --epochs 4

Without ``--teacher-ckpt`` it first trains a small ResNet-101 teacher on the same data.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import missing_dataset  # noqa: E402


def train(*overrides: str) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette"))
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="training steps per epoch (batch 64)")
    ap.add_argument("--teacher-ckpt", default=None)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_pruning"))
    args = ap.parse_args()

    data = Path(args.data)
    if missing_dataset(args.data):
        return 0
    out = Path(args.out) / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    common = [
        "dataset=imagefolder",
        f"dataset.root={data}",
        f"dataset.image_size={args.image_size}",
        "dataset.batch_size=64",
        "model.small_stem=false",
        "teacher.small_stem=false",
        f"trainer.max_steps_per_epoch={args.steps}",
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.experiment_name=bench-pruning",
    ]
    teacher = args.teacher_ckpt
    if teacher is None:
        train(
            "experiment=teacher",
            *common,
            "trainer.epochs=3",
            "mlflow.register=null",
            f"hydra.run.dir={out / 'teacher'}",
        )
        teacher = str(out / "teacher" / "checkpoints" / "best.pt")

    storage = f"sqlite:///{out / 'optuna.db'}"
    results = {}
    for pruner in ("median", "none"):
        start = time.perf_counter()
        train(
            "-m",
            "hparams_search=conkd_lion",
            f"teacher_ckpt={teacher}",
            *common,
            f"trainer.epochs={args.epochs}",
            f"hydra/sweeper/pruner={pruner}",
            f"hydra.sweeper.n_trials={args.trials}",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name={pruner}",
            f"hydra.sweep.dir={out / pruner}",
        )
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=pruner, storage=storage)
        epochs = sum(len(t.intermediate_values) for t in study.trials)
        finished = [t for t in study.trials if t.state.name == "COMPLETE"]
        results[pruner] = {
            "epochs": epochs,
            "best": max(t.value for t in finished),
            "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
            "wall_s": wall,
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
