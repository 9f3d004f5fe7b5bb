"""Benchmark: what the teacher cache and the fast path save a real Optuna sweep, side by side.

All sweeps are ``python train.py -m hparams_search=conkd_lion`` on Imagenette class folders with
the same sampler seed, ``--epochs`` epochs of ``--steps`` steps per trial (batch 64):

(a) ``--trials`` trials with the teacher cache (a fresh cache folder, so its build is included)
    vs the same trials with the online teacher (``teacher_cache.enabled=false``), and vs the cache
    build plus the same trials' optimizer settings run as plain CE students (no teacher at all):
    the cache should cost nothing but its build.
(b) ``--fast-trials`` trials of the whole fast path (decode-once input, teacher cache, median
    pruning, and the speed switches measured fastest on this CPU: bf16 autocast + channels_last,
    for the cache build and the students; ``--fast-fp32`` leaves them off) vs today's path (JPEG
    decode every epoch, online teacher, no pruning, fp32).

    python benchmarks/sweep_cache.py --data ../shared/data/imagenette --image-size 64

Without ``--teacher-ckpt`` it first trains a small ResNet-101 teacher (its accuracy does not
matter here, only its cost). Prints a table and, last, the ratios.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import (
    DATA,
    ROOT,
    cache_metas,
    dataset_overrides,
    dated_dir,
    lion_sweep,
    missing_dataset,
    parser,
    sweep_teacher,
    timed_train,
)


def cache_build_seconds(cache_dir: Path) -> float:
    """Build time recorded by the teacher cache(s) under ``cache_dir``."""
    return sum(meta["build_seconds"] for meta in cache_metas(cache_dir))


def sweeps_a(sweep, common: list[str], out: Path, trials: int, epochs: int) -> dict[str, dict]:
    """(a): cached vs online sweep, and the cache build + the same trials as CE students."""
    rows: dict[str, dict] = {}
    nopr = "hydra/sweeper/pruner=none"
    rows["a_cached"] = sweep("a_cached", trials, nopr, f"teacher_cache.dir={out / 'cache_a'}")
    rows["a_cached"]["build_s"] = cache_build_seconds(out / "cache_a")
    rows["a_online"] = sweep("a_online", trials, nopr, "teacher_cache.enabled=false")
    lrs = [t.params["optimizer.lr"] for t in rows["a_cached"]["study"].trials]
    wds = [t.params["optimizer.weight_decay"] for t in rows["a_cached"]["study"].trials]
    start = time.perf_counter()
    for i, (lr, wd) in enumerate(zip(lrs, wds)):
        timed_train(
            *common,
            "loss=ce",
            f"optimizer.lr={lr}",
            f"optimizer.weight_decay={wd}",
            f"hydra.run.dir={out / 'a_ce' / str(i)}",
        )
    rows["a_ce"] = {
        "wall_s": time.perf_counter() - start,
        "epochs": len(lrs) * epochs,
        "pruned": 0,
        "best": float("nan"),
    }
    return rows


def print_report(rows: dict[str, dict], args: argparse.Namespace, data: Path) -> None:
    """The table, then the ratios (last)."""
    print(
        f"\nconkd_lion sweeps, {args.image_size}px, {args.epochs} epochs x {args.steps} steps "
        f"(batch 64) per trial, data {data}"
    )
    print(f"{'sweep':<10} {'wall s':>8} {'epochs':>7} {'pruned':>7} {'best val top1':>14}")
    for name, r in rows.items():
        print(
            f"{name:<10} {r['wall_s']:>8.0f} {r['epochs']:>7d} {r['pruned']:>7d} {r['best']:>14.2f}"
        )
    if "a_cached" in rows:
        a, o, ce = rows["a_cached"], rows["a_online"], rows["a_ce"]
        print(f"teacher cache build: {a['build_s']:.0f} s")
        print(f"ratio (a) cached/online sweep: {a['wall_s'] / o['wall_s']:.2f}")
        print(
            "ratio (a) cached sweep / (cache build + same trials as CE students): "
            f"{a['wall_s'] / (a['build_s'] + ce['wall_s']):.2f}  (target <= 1.10)"
        )
    if "b_fast" in rows:
        print(
            "ratio (b) fast path / today's path: "
            f"{rows['b_fast']['wall_s'] / rows['b_today']['wall_s']:.2f}  (target <= 0.35)"
        )


def parse_args() -> argparse.Namespace:
    return parser(
        __doc__, data=DATA, trials=4, fast_trials=8, epochs=3,
        steps=(40, "training steps per epoch (batch 64)"), image_size=64, teacher_ckpt=None,
        only={"choices": ("a", "b"), "default": None},
        fast_fp32=(False, "(b): no bf16 + channels_last on the fast side"),
        out=str(ROOT / "outputs" / "bench_sweep_cache"),
    ).parse_args()  # fmt: skip


def main() -> int:
    args = parse_args()

    data = Path(args.data)
    if missing_dataset(args.data):
        return 0
    out = dated_dir(args.out)
    common = [
        *dataset_overrides(data, args.image_size, 64, out),
        f"trainer.max_steps_per_epoch={args.steps}",
        f"trainer.epochs={args.epochs}",
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.log_checkpoint=false",
        f"mlflow.tracking_uri=sqlite:///{out / 'mlruns' / 'mlflow.db'}",
    ]
    teacher = sweep_teacher(
        args.teacher_ckpt, common, out, "trainer.epochs=1", "trainer.max_steps_per_epoch=5"
    )
    # warm the decoded arrays once, so no sweep below pays for (or is spared) their build
    timed_train(
        *common,
        "loss=ce",
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=1",
        f"hydra.run.dir={out / 'warm'}",
    )

    def sweep(name: str, trials: int, *extra: str) -> dict[str, float]:
        return lion_sweep(out, name, trials, f"teacher_ckpt={teacher}", *common, *extra)

    rows: dict[str, dict] = {}
    if args.only in (None, "a"):
        rows.update(sweeps_a(sweep, common, out, args.trials, args.epochs))
    if args.only in (None, "b"):
        rows["b_fast"] = sweep(
            "b_fast",
            args.fast_trials,
            "hydra/sweeper/pruner=median",
            f"teacher_cache.dir={out / 'cache_b'}",
            *([] if args.fast_fp32 else ["trainer.precision=bf16", "trainer.channels_last=true"]),
        )
        rows["b_today"] = sweep(
            "b_today",
            args.fast_trials,
            "hydra/sweeper/pruner=none",
            "teacher_cache.enabled=false",
            "dataset.decode.enabled=false",
        )

    print_report(rows, args, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
