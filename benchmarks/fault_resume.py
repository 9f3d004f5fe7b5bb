"""Fault test: SIGKILL a training run (and a sweep) at random points, resume, compare.

A run (``python train.py``, resumable ``last.pt`` every step, written in the background as on a
GPU) is killed ``--kills`` times: some
kills land at a random moment inside an epoch, the others while a checkpoint is being written
(the moment ``last.pt.tmp`` appears). Each time the same command is run again (``resume=auto``)
until it finishes. Its final weights, optimizer state and metrics are then compared with an
uninterrupted run of the same command, and its MLflow run is checked: one run across all the
kills, ending FINISHED, each epoch's metrics logged once.

``--sweep`` also kills a 4-trial ``conkd_optuna`` sweep twice during trials and re-runs it:
no parameter set may be evaluated twice, there must be one MLflow child per trial number and
none left RUNNING, and a re-queued trial that continued from its checkpoint must end exactly
(weights, optimizer state, metrics) as the same parameters run without interruption.

    python benchmarks/fault_resume.py [--kills 5] [--sweep] [--seed 0]

Uses a generated 3-class image folder (no download). Prints a report; the last line is
``kills survived K/N, mismatches M, duplicated evaluations D``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    ROOT,
    parser,
    scratch_dir,
    tiny_overrides,
    train_cmd,
    train_env,
)
from tests.conftest import write_image_folder  # noqa: E402

#: Metrics that measure time, not the computation.
TIMING = ("train/epoch_time_s", "train/throughput_img_s")


def write_dataset(root: Path, per_class_train: int = 16) -> Path:
    """A learnable 3-class image folder (coloured squares with noise): the test suite's."""
    return write_image_folder(root, per_class_train=per_class_train, per_class_val=4)


def run_overrides(data: Path, work: Path, epochs: int, steps: int) -> list[str]:
    """A small Lion-trained ResNet-18 run with a resumable checkpoint after every step."""
    return [
        "experiment=teacher", "model=resnet18", "optimizer=lion", "mlflow.register=null",
        "mlflow.log_model=false", *tiny_overrides(data, work, epochs, steps),
        "dataset.eval_batch_size=16", "trainer.checkpoint_every_steps=1",
        "trainer.checkpoint_background=true",  # the GPU's writer (auto: direct on a CPU)
    ]  # fmt: skip


def start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    """``train.py args`` in its own process group; with ``nproc`` > 1 under torchrun (gloo)."""
    return subprocess.Popen(
        train_cmd(*args, torchrun=nproc if nproc > 1 else None),
        cwd=ROOT,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process under it, as a lost machine would: torchrun starts
    its workers in sessions of their own, so the launcher's process group is not enough."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def kill_once(
    args: list[str], ckpt_dir: Path, rng: random.Random, during_write: bool, nproc: int = 1
) -> str:
    """Start the run and SIGKILL it after 1-3 more checkpoint writes: at once when the next
    ``last.pt.tmp`` appears (``during_write``), else after a random part of a step. Returns
    where it was killed, or ``finished`` when the run ended first."""
    proc = start(args, nproc)
    last, tmp = ckpt_dir / "last.pt", ckpt_dir / "last.pt.tmp"
    seen, target, previous = 0, rng.randint(1, 3), _mtime(last)
    while proc.poll() is None:
        now = _mtime(last)
        if now is not None and now != previous:
            seen, previous = seen + 1, now
        if seen >= target:
            if during_write:
                if tmp.exists():
                    kill(proc)
                    return "during a checkpoint write"
            else:
                time.sleep(rng.uniform(0.0, 0.15))
                kill(proc)
                return "inside an epoch"
        time.sleep(0.002)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {proc.stderr.read().decode()[-2000:]}")
    return "finished"


def finish(args: list[str], nproc: int = 1) -> None:
    proc = start(args, nproc)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {err.decode()[-3000:]}")


def compare_runs(ref: Path, other: Path) -> list[str]:
    """What differs between two finished runs: weights (and their average), optimizer state,
    metrics."""
    import torch

    from conkd.checkpoint import load_checkpoint

    out = []
    for name in ("last.pt", "best.pt"):
        a, b = (load_checkpoint(d / "checkpoints" / name) for d in (ref, other))
        for key, t in a["state_dict"].items():
            if not torch.equal(t, b["state_dict"][key]):
                out.append(f"{name}: weight {key} differs")
        if name == "last.pt":
            for key, t in (a.get("average") or {}).items():  # the weights' EMA, when kept
                if not torch.equal(t, (b.get("average") or {}).get(key, torch.empty(0))):
                    out.append(f"{name}: weight average {key} differs")
            sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
            for i in sa:
                if any(not torch.equal(sa[i][k], sb[i][k]) for k in sa[i]):
                    out.append(f"optimizer state of parameter {i} differs")
            ha, hb = a["train_state"]["history"], b["train_state"]["history"]
            for e, (ma, mb) in enumerate(zip(ha, hb, strict=True)):
                for k in ma:
                    if k not in TIMING and ma[k] != mb[k]:
                        out.append(f"epoch {e} {k}: {ma[k]} != {mb[k]}")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, other))
    for k in ma:
        if k not in ("run_id", "run_name") and ma[k] != mb.get(k):
            out.append(f"metrics.json {k}: {ma[k]} != {mb.get(k)}")
    return out


def mlflow_report(tracking_uri: str, run_id: str, epochs: int) -> dict[str, Any]:
    """Status and per-epoch metric counts of the killed run's MLflow run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "val/top1")]
    return {
        "status": run.info.status,
        "val_top1_steps": sorted(steps),
        "duplicates": len(steps) - len(set(steps)),
        "missing": sorted(set(range(epochs)) - set(steps)),
    }


def fault_run(
    work: Path, data: Path, kills: int, epochs: int, steps: int, seed: int, nproc: int = 1
) -> dict:
    """Reference run, then the same run killed ``kills`` times and resumed; the report. With
    ``nproc`` > 1 both run under torchrun and a kill takes every rank down."""
    base = run_overrides(data, work, epochs, steps)
    t0 = time.perf_counter()
    finish([*base, f"hydra.run.dir={work / 'reference'}"], nproc)
    ref_s = time.perf_counter() - t0
    rng = random.Random(seed)
    killed_dir = work / "killed"
    args = [*base, f"hydra.run.dir={killed_dir}"]
    where = []
    while len(where) < kills:
        during_write = len(where) % 2 == 1
        at = kill_once(args, killed_dir / "checkpoints", rng, during_write, nproc)
        if at == "finished":
            break
        where.append(at)
    if not (killed_dir / "metrics.json").exists():
        finish(args, nproc)
    mismatches = compare_runs(work / "reference", killed_dir)
    meta = json.loads((killed_dir / "metrics.json").read_text())
    tracking = mlflow_report(f"sqlite:///{work / 'mlflow.db'}", meta["run_id"], epochs)
    return {
        "reference_s": ref_s,
        "kills": where,
        "mismatches": mismatches,
        "mlflow": tracking,
    }


def sweep_overrides(data: Path, work: Path) -> list[str]:
    return [
        "-m", "hydra/sweeper=conkd_optuna", "hydra/sweeper/pruner=none", "stage=teacher",
        "loss=ce", "teacher_ckpt=null", "model=resnet18", "optimizer=lion",
        "optimizer.lr=interval(1e-4, 1e-2)", "optimizer.weight_decay=interval(0.01, 1.0)",
        "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=0",
        "hydra.sweep.subdir=trial_${optuna.trial}", f"hydra.sweep.dir={work / 'sweep'}",
        f"hydra.sweeper.storage=sqlite:///{work / 'optuna.db'}", "hydra.sweeper.study_name=fault",
        "mlflow.log_model=false", "mlflow.log_checkpoint=false",
        *tiny_overrides(data, work, epochs=3, steps=3), "dataset.eval_batch_size=16",
        "trainer.checkpoint_every_steps=1", "trainer.checkpoint_background=true",
    ]  # fmt: skip


def kill_sweep_in_trial(args: list[str], storage: str, rng: random.Random) -> int | None:
    """Start the sweep, SIGKILL it once a new trial has written a checkpoint; returns the
    trial killed, or None when the sweep finished first."""
    import optuna

    before = _trials(storage)
    proc = start(args)
    while proc.poll() is None:
        for t in _trials(storage):
            ckpt = t.user_attrs.get("conkd:checkpoint")
            new = t.number not in {b.number for b in before}
            if new and t.state.name == "RUNNING" and ckpt and Path(ckpt).exists():
                time.sleep(rng.uniform(0.0, 0.3))
                kill(proc)
                return t.number
        time.sleep(0.05)
    del optuna
    return None


def _trials(storage: str) -> list:
    import optuna

    try:
        return optuna.load_study(study_name="fault", storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


def fault_sweep(work: Path, data: Path, seed: int) -> dict:
    """A 4-trial sweep killed twice in trials and re-run; duplicates, children, exactness."""
    import mlflow
    import optuna

    args = sweep_overrides(data, work)
    storage = f"sqlite:///{work / 'optuna.db'}"
    rng = random.Random(seed)
    killed = [
        k for k in (kill_sweep_in_trial(args, storage, rng) for _ in range(2)) if k is not None
    ]
    finish(args)
    trials = optuna.load_study(study_name="fault", storage=storage).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    keys = [tuple(sorted(t.params.items())) for t in done]
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("conkd-imagefolder")
    children = [
        r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags
    ]
    per_trial: dict[str, int] = {}
    for c in children:
        per_trial[c.data.tags["sweep.trial"]] = per_trial.get(c.data.tags["sweep.trial"], 0) + 1
    continued = [t for t in done if t.user_attrs.get("conkd:resume")]
    exact = []
    for t in continued:  # the same parameters, uninterrupted, in a run of their own
        out = work / f"alone_{t.number}"
        single = [a for a in args if a != "-m" and not a.startswith(("hydra.sweep", "optimizer."))]
        single += [f"{k}={v}" for k, v in t.params.items()] + [f"hydra.run.dir={out}"]
        finish(single)
        exact.append((t.number, compare_runs(out, work / "sweep" / f"trial_{t.number}")))
    return {
        "killed_trials": killed,
        "complete": len(done),
        "duplicate_params": len(keys) - len(set(keys)),
        "children_per_trial": per_trial,
        "running_children": sum(c.info.status == "RUNNING" for c in children),
        "continued_trials": [t.number for t in continued],
        "continued_vs_alone": exact,
    }


def main() -> int:
    args = parser(
        __doc__, kills=5, epochs=3, steps=(4, "steps per epoch (batch 8)"), seed=0,
        nproc=(1, "processes per run (torchrun, gloo)"), sweep=(False, "also kill a sweep twice"),
        work=(None, "working folder (default: a temporary one)"),
        keep=(False, "keep the temporary working folder"),
    ).parse_args()  # fmt: skip
    work = Path(args.work) if args.work else scratch_dir("conkd_fault_", args.keep)
    data = write_dataset(work / "data")
    run = fault_run(work, data, args.kills, args.epochs, args.steps, args.seed, args.nproc)
    print(f"uninterrupted run: {run['reference_s']:.0f} s")
    for i, at in enumerate(run["kills"], 1):
        print(f"kill {i}: SIGKILL {at}")
    print(f"MLflow run: {run['mlflow']}")
    for m in run["mismatches"]:
        print("mismatch:", m)
    dup = run["mlflow"]["duplicates"]
    mismatches = len(run["mismatches"]) + len(run["mlflow"]["missing"])
    if args.sweep:
        sweep = fault_sweep(work, data, args.seed)
        print(f"sweep: {sweep}")
        dup += sweep["duplicate_params"]
        mismatches += sum(len(diff) for _, diff in sweep["continued_vs_alone"])
        mismatches += sum(n != 1 for n in sweep["children_per_trial"].values())
        mismatches += sweep["running_children"]
    print(
        f"kills survived {len(run['kills'])}/{args.kills}, mismatches {mismatches}, "
        f"duplicated evaluations {dup}"
    )
    return 0 if mismatches == 0 and dup == 0 and len(run["kills"]) == args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
