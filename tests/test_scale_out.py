"""Many trials, many workers: a shared PostgreSQL study, an MLflow tracking server, pull-based
workers; and the SLURM launcher's job script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from tests.conftest import ROOT, run_cli, run_workers, tiny_overrides
from tests.servers import mlflow_server, postgres


def worker_args(image_folder: Path, tmp_path: Path, storage: str, tracking: str) -> list[str]:
    """A CE lr sweep of 4 trials on the tiny data, study and tracking on the servers."""
    tiny = [o for o in tiny_overrides(image_folder, tmp_path / "unused", tmp_path / "mlruns")
            if not o.startswith(("paths.output_dir", "mlflow.tracking_uri"))]  # fmt: skip
    return [
        "train.py", "-m", *tiny, "hydra/sweeper=conkd_optuna", "hydra/sweeper/pruner=none",
        "stage=teacher", "loss=ce", "teacher_ckpt=null", "model=resnet18", "optimizer=adamw",
        "optimizer.lr=interval(1e-4, 1e-2)", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=trial_${optuna.trial}",
        f"mlflow.tracking_uri={tracking}", "mlflow.log_checkpoint=false",
    ]  # fmt: skip


@pytest.mark.slow  # two workers and two servers: ~70 s; CI runs it (make test-all)
def test_two_workers_share_one_study_on_postgres_and_an_mlflow_server(
    image_folder: Path, tmp_path: Path
) -> None:
    with postgres(tmp_path) as pg:
        storage = f"postgresql+psycopg2://{pg}/optuna"
        log = tmp_path / "mlflow_server.log"
        with mlflow_server(
            f"postgresql+psycopg2://{pg}/mlflow", tmp_path / "artifacts", log
        ) as url:
            args = worker_args(image_folder, tmp_path, storage, url)
            outputs = run_workers(args)
            trials = optuna.load_study(study_name="shared", storage=storage).trials
            client = mlflow.MlflowClient(url)
            exp = client.get_experiment_by_name("conkd-imagefolder")
            runs = client.search_runs([exp.experiment_id])
            children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
            histories = {
                c.data.tags["sweep.trial"]: [
                    m.step for m in client.get_metric_history(c.info.run_id, "val/top1")
                ]
                for c in children
            }
    # the study ends at the requested total, each trial number run once, by one of the workers
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE"] * 4, "\n\n".join(o[-4000:] for o in outputs)
    pids = {t.user_attrs["conkd:pid"] for t in trials}
    assert len(pids) == 2  # both workers pulled trials
    # one MLflow child run per trial number, every epoch's metrics there
    assert sorted(c.data.tags["sweep.trial"] for c in children) == ["0", "1", "2", "3"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(sorted(steps) == [0, 1] for steps in histories.values())


def test_runs_that_record_one_dataset_at_once_on_a_server(tmp_path: Path, caplog) -> None:
    """Trials starting together each record the same dataset input; MLflow's server checks,
    then inserts, so on PostgreSQL all but one used to fail with "duplicate key" (and with them
    their trials). Every run gets its record now."""
    from conkd.tracking import MLflowTracker

    fingerprint = {"identity": "shared", "digest": "0" * 36, "source": "/data",
                   "classes": ["a"], "sizes": {"train": 1}}  # fmt: skip
    with postgres(tmp_path, ("mlflow",)) as pg:
        backend = f"postgresql+psycopg2://{pg}/mlflow"
        with mlflow_server(backend, tmp_path / "artifacts", tmp_path / "server.log") as url:
            trackers = [MLflowTracker(url, "race").__enter__() for _ in range(6)]
            start = threading.Barrier(len(trackers))

            def record(tracker: MLflowTracker) -> None:
                start.wait()
                tracker.log_dataset(fingerprint)

            threads = [threading.Thread(target=record, args=(t,)) for t in trackers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            client = mlflow.MlflowClient(url)
            recorded = [len(client.get_run(t.run_id).inputs.dataset_inputs) for t in trackers]
            for t in trackers:
                t.__exit__(None, None, None)
    assert "did not record" not in caplog.text
    assert recorded == [1] * 6


@pytest.mark.slow
def test_tracking_server_that_goes_away_mid_run(image_folder: Path, tmp_path: Path) -> None:
    """The server is stopped after the first epoch: training finishes, the rest is saved to
    mlflow_pending.json with a warning, and replayed into the same store once it is back."""
    out, db = tmp_path / "run", f"sqlite:///{tmp_path / 'server.db'}"
    tiny = [o for o in tiny_overrides(image_folder, out, tmp_path / "unused")
            if not o.startswith(("paths.output_dir", "mlflow.tracking_uri"))]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    with mlflow_server(db, tmp_path / "artifacts", tmp_path / "server1.log") as url:
        cmd = [
            sys.executable,
            "train.py",
            "stage=teacher",
            "loss=ce",
            "teacher_ckpt=null",
            *tiny,
            "trainer.epochs=4",
            f"hydra.run.dir={out}",
            f"mlflow.tracking_uri={url}",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)  # fmt: skip
        log = out / "train.log"
        while not (log.exists() and "epoch 1/4" in log.read_text()):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.1)
    # the server is gone now; the run goes on
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "does not answer" in output and "conkd.maintenance replay" in output
    pending = out / "mlflow_pending.json"
    run_id = json.loads(pending.read_text())["run_id"]
    with mlflow_server(db, tmp_path / "artifacts", tmp_path / "server2.log") as url:
        res = run_cli("-m", "conkd.maintenance", "--tracking-uri", url, "replay", str(pending))
        assert res.returncode == 0, res.stderr[-2000:]
        client = mlflow.MlflowClient(url)
        steps = sorted(m.step for m in client.get_metric_history(run_id, "val/top1"))
        status = client.get_run(run_id).info.status
        test_top1 = client.get_run(run_id).data.metrics.get("test/top1")
        artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert steps == [0, 1, 2, 3] and status == "FINISHED"
    assert test_top1 == json.loads((out / "metrics.json").read_text())["test/top1"]
    assert {"metrics.json", "checkpoints", "hydra"} <= artifacts


def test_slurm_launcher_renders_its_job_script(compose_cfg, tmp_path: Path, monkeypatch) -> None:
    """hydra/launcher=slurm composes, and the sbatch script submitit would submit for it (the
    launcher's parameters passed as hydra-submitit-launcher passes them) carries them."""
    import submitit
    from hydra.utils import get_class
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose_cfg(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
         f"hydra.sweep.dir={tmp_path}"],
        keep_hydra=True,
    )  # fmt: skip
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert get_class(launcher.pop("_target_")).__name__ == "SlurmLauncher"
    # submitit looks for `srun` to decide it is on a cluster: a stand-in (never run)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{
        k if k in base else f"slurm_{k}": v
        for k, v in launcher.items() if k not in ("submitit_folder", "max_num_timeout")
    })  # fmt: skip
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=240",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --nodes=1",
    ):
        assert line in script, script
