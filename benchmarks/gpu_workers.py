"""Several trials on one GPU: trials per hour with 1, 2 and 4 pull-based sweep workers sharing
it (one shared study each time).

A ResNet-18 trial at 128 px keeps an H200 busy for only a fraction of each step (launches and
the input pipeline leave it idle between kernels), so two or four trials side by side can
finish more trials per hour than one. Each worker is ``python train.py -m`` on the same Optuna
study (``hydra/sweeper/storage=journal``: a file, no database server), all on the one visible
GPU (``CUDA_VISIBLE_DEVICES``), each capped at ``trainer.gpu_memory_fraction = 0.9 / workers``
so that one worker's allocator cannot starve the others. The sweep is a CE student's learning
rate with median pruning (pruned trials end early, as in a real sweep), ``--per-worker`` trials
for each worker.

    python benchmarks/gpu_workers.py --data ../shared/data/imagenette [--workers 1,2,4]

Prints each setting's wall time and trials per hour, then the ratios to one worker. ``--device
cpu --image-size 32 --epochs 1 --steps 2 --workers 1,2`` checks the script on a machine without
a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    DATA,
    ROOT,
    dataset_overrides,
    missing_dataset,
    parser,
    study_stats,
    train_cmd,
    train_env,
)


def worker_cmd(args, work: Path, n: int) -> list[str]:
    """One worker of the ``n``-worker sweep (all ``n`` run this same command)."""
    journal = work / f"w{n}" / "optuna.journal"
    journal.parent.mkdir(parents=True, exist_ok=True)
    fraction = [f"trainer.gpu_memory_fraction={0.9 / n:.3f}"] if args.device != "cpu" else []
    return train_cmd(
        "-m", "hydra/sweeper=conkd_optuna", "hydra/sweeper/storage=journal",
        f"hydra.sweeper.storage.log_storage.file_path={journal}",
        "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2",
        f"hydra.sweeper.n_trials={args.per_worker * n}", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.seed=0", f"hydra.sweeper.study_name=w{n}",
        f"hydra.sweep.dir={work / f'w{n}'}", "hydra.sweep.subdir=trial_${optuna.trial}",
        "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
        "stage=teacher", "loss=ce", "teacher_ckpt=null", "model=resnet18", "optimizer=adamw",
        *dataset_overrides(Path(args.data).resolve(), args.image_size, args.batch_size, work,
                           workers=4),
        f"trainer.device={args.device}", f"trainer.epochs={args.epochs}", *fraction,
        *([f"trainer.max_steps_per_epoch={args.steps}"] if args.steps else []),
        f"trainer.precision={'32' if args.device == 'cpu' else 'bf16'}",
        f"trainer.channels_last={str(args.device != 'cpu').lower()}",
        "trainer.progress=false", f"paths.cache_dir={work / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{work / f'w{n}' / 'mlflow.db'}",
        "mlflow.log_model=false", "mlflow.log_checkpoint=false",
    )  # fmt: skip


def run_workers(cmd: list[str], n: int, logs: Path) -> float:
    """Start ``n`` copies of ``cmd`` at once; the wall time until the last one ends. Each
    worker's output goes to a file in ``logs`` (a pipe read one worker at a time would stall
    the others once its buffer filled)."""
    env = train_env(CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    paths = [logs / f"worker{i}.log" for i in range(n)]
    start = time.perf_counter()
    procs = []
    for path in paths:
        with path.open("w") as log:  # the child holds its own descriptor
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    for p, path in zip(procs, paths):
        if p.wait():
            raise RuntimeError(f"{path}:\n{path.read_text()[-3000:]}")
    return time.perf_counter() - start


def main() -> int:
    args = parser(
        __doc__, data=DATA, image_size=128, batch_size=256, epochs=4, steps=0, device="cuda",
        workers=("1,2,4", "worker counts to time"), per_worker=(4, "trials per worker"),
        workdir=str(Path(tempfile.gettempdir()) / "conkd-gpu-workers"),
    ).parse_args()  # fmt: skip
    if missing_dataset(args.data):
        return 0
    work = Path(args.workdir)
    rates: dict[int, float] = {}
    for n in (int(w) for w in args.workers.split(",")):
        wall = run_workers(worker_cmd(args, work, n), n, work / f"w{n}")
        stats = study_stats(f"w{n}", _journal(work / f"w{n}" / "optuna.journal"))
        rates[n] = stats["trials"] / wall * 3600
        print(f"{n} worker(s): {stats['trials']} trials ({stats['pruned']} pruned, "
              f"{stats['epochs']} epochs) in {wall:.0f} s: {rates[n]:.0f} trials/h",
              flush=True)  # fmt: skip
    one = rates.get(1)
    if one:
        for n, rate in rates.items():
            print(f"trials/h with {n} worker(s) / with 1: {rate / one:.2f}")
    return 0


def _journal(path: Path):
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


if __name__ == "__main__":
    sys.exit(main())
