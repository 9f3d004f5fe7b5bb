"""Parallel trials: pull-based workers vs Hydra's batched joblib launcher, side by side.

The same 6-trial ``conkd_optuna`` sweep with median pruning, two trials at a time:

(a) batched: one ``python train.py -m`` with ``hydra/launcher=joblib hydra.launcher.n_jobs=2
    hydra.sweeper.n_jobs=2``: the sweeper asks for 2 trials, runs them, waits for both; a pruned
    (short) trial leaves its slot idle until its partner ends (hydra issue 1954).
(b) pull: two ``python train.py -m`` workers with ``hydra.sweeper.n_jobs=1`` on one shared
    study; each asks for its next trial the moment it is free.

Both use a PostgreSQL study (a local server from the ``pgserver`` wheel) and one thread per
trial. Prints both wall times and, last, the ratio pull / batched.

    python benchmarks/pull_workers.py [--trials 6] [--epochs 4] [--steps 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ROOT,
    parser,
    scratch_dir,
    study_stats,
    tiny_overrides,
    train_cmd,
    train_env,
)
from benchmarks.fault_resume import write_dataset  # noqa: E402
from tests.servers import postgres  # noqa: E402


def sweep_args(data: Path, work: Path, name: str, storage: str, args: argparse.Namespace) -> list:
    return train_cmd(
        "-m", "hydra/sweeper=conkd_optuna",
        "hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2",
        "stage=teacher", "loss=ce", "teacher_ckpt=null", "model=resnet18", "optimizer=adamw",
        "optimizer.lr=tag(log, interval(1e-5, 1e-1))", f"hydra.sweeper.n_trials={args.trials}",
        "hydra.sweeper.sampler.seed=0", f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={work / name}",
        "hydra.sweep.subdir=trial_${optuna.trial}",
        *tiny_overrides(data, work, args.epochs, args.steps),
        "mlflow.log_model=false", "mlflow.log_checkpoint=false",
    )  # fmt: skip


def run_all(cmds: list[list[str]]) -> float:
    env = train_env(OMP_NUM_THREADS="1")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in cmds
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err.decode()[-3000:])
    return time.perf_counter() - start


def summary(storage: str, name: str) -> str:
    s = study_stats(name, storage)
    return f"{s['trials']} trials ({s['pruned']} pruned), {s['epochs']} epochs"


def main() -> int:
    args = parser(__doc__, trials=6, epochs=4, steps=8, keep=False).parse_args()
    work = scratch_dir("conkd_pull_", args.keep)
    data = write_dataset(work / "data", per_class_train=40)
    with postgres(work) as pg:
        storage = f"postgresql+psycopg2://{pg}/optuna"
        batched = sweep_args(data, work, "batched", storage, args) + [
            "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
        ]  # fmt: skip
        t_batched = run_all([batched])
        print(f"batched (joblib, 2 per batch): {t_batched:.0f} s, {summary(storage, 'batched')}")
        pull = sweep_args(data, work, "pull", storage, args) + ["hydra.sweeper.n_jobs=1"]
        t_pull = run_all([pull, pull])
        print(f"pull (2 workers, shared study): {t_pull:.0f} s, {summary(storage, 'pull')}")
    print(f"ratio pull / batched wall time: {t_pull / t_batched:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
