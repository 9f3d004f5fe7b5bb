"""MLflow tracking: runs, failures, the model registry, sweeps, concurrency, a real server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from conkd.checkpoint import build_from_checkpoint, load_checkpoint
from conkd.errors import ConKDError, DivergedError
from conkd.run import run
from conkd.tracking import resolve_store
from tests.conftest import ROOT, run_cli, tiny_overrides


def client_for(store: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")


def only_run(client: mlflow.MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_default_store_is_absolute_under_project(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri, artifacts = resolve_store(ROOT, None)
    assert uri == f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (ROOT / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_store(ROOT, None) == ("http://127.0.0.1:5999", None)
    assert resolve_store(ROOT, "sqlite:///x.db")[0] == f"sqlite:///{tmp_path / 'x.db'}"


def test_student_run_is_fully_tracked(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path
) -> None:
    store = tmp_path / "mlruns"
    cfg = compose_cfg(
        [
            "loss=lsd+supcon",
            "optimizer=lion",
            "model@teacher=resnet18",
            f"teacher_ckpt={teacher_run / 'checkpoints' / 'best.pt'}",
            *tiny_overrides(image_folder, tmp_path / "run", store),
            "mlflow.log_model=true",
        ]
    )
    run(cfg)
    client = client_for(store)
    r = only_run(client, "conkd-imagefolder")
    assert r.info.status == "FINISHED"
    assert r.info.run_name == "resnet18<-resnet18 lsd+supcon lion"
    p = r.data.params
    assert p["loss.alpha"] == "0.15" and p["loss.kd_temperature"] == "2.0"
    assert p["loss.supcon_temperature"] == "0.07" and p["optimizer.lr"] == "0.0003"
    assert p["optimizer.weight_decay"] == "0.5" and p["optimizer.betas"] == "[0.95, 0.98]"
    assert p["model.arch"] == "resnet18" and p["teacher.arch"] == "resnet18"
    assert p["dataset.image_size"] == "32" and p["dataset.batch_size"] == "8"
    assert p["trainer.epochs"] == "2" and p["seed"] == "0"
    tags = r.data.tags
    assert tags["stage"] == "student" and tags["teacher"].endswith("best.pt")
    assert tags["teacher.run_id"] and "git.commit" in tags
    for key in (
        "train/loss",
        "train/ce",
        "train/kd",
        "train/supcon",
        "val/loss",
        "val/top1",
        "val/top5",
        "train/lr",
        "train/epoch_time_s",
        "train/throughput_img_s",
    ):
        history = client.get_metric_history(r.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    assert {"test/top1", "test/top5", "objective"} <= set(r.data.metrics)
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {
        "config.yaml",
        "learning_curves.png",
        "confusion_matrix.png",
        "per_class.txt",
        "checkpoints",
    } <= arts  # (.hydra/ exists under a real Hydra run: see the multirun)
    # the network is logged in the safe format (torch.export, no pickle) and loads back with
    # the best checkpoint's predictions, at another batch size than the one it was traced on
    assert tags["model_format"] == "pt2"
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    try:
        model = mlflow.pytorch.load_model(tags["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    best = build_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt"))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got, want = model(x), best.eval()(x)
    assert set(got) == {"logits", "embedding", "projection"}
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_failed_run_is_failed_with_error_tag(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path
) -> None:
    best = teacher_run / "checkpoints" / "best.pt"
    before = best.read_bytes()
    store = tmp_path / "mlruns"
    cfg = compose_cfg(
        [
            "stage=teacher",
            "loss=ce",
            "optimizer=sgd",
            "optimizer.lr=1e12",
            "scheduler=none",
            *tiny_overrides(image_folder, tmp_path / "run", store),
        ]
    )
    with pytest.raises(DivergedError, match="non-finite loss"):
        run(cfg)
    r = only_run(client_for(store), "conkd-imagefolder")
    assert r.info.status == "FAILED"
    assert "non-finite loss" in r.data.tags["error"]
    assert best.read_bytes() == before


def test_teacher_registered_and_loaded_by_uri(
    compose_cfg, image_folder: Path, tmp_path: Path
) -> None:
    store = tmp_path / "mlruns"
    cfg = compose_cfg(
        [
            "experiment=teacher",
            "model=resnet18",
            "mlflow.register.name=tiny-teacher",
            "mlflow.register.alias=champion",
            "trainer.epochs=1",
            *tiny_overrides(image_folder, tmp_path / "teacher", store),
        ]
    )
    run(cfg)
    client = client_for(store)
    mv = client.get_model_version_by_alias("tiny-teacher", "champion")
    cfg = compose_cfg(
        [
            "loss=lsd",
            "model@teacher=resnet18",
            "teacher_ckpt=models:/tiny-teacher@champion",
            "trainer.epochs=1",
            *tiny_overrides(image_folder, tmp_path / "student", store),
        ]
    )
    run(cfg)
    exp = client.get_experiment_by_name("conkd-imagefolder")
    student = client.search_runs([exp.experiment_id], "tags.stage = 'student'")[0]
    assert student.info.status == "FINISHED"
    assert student.data.tags["teacher"] == "models:/tiny-teacher@champion"
    assert student.data.tags["teacher.run_id"] == mv.run_id
    # the registered model itself loads back through mlflow.pytorch (the pt2 export) and
    # predicts what the teacher's best checkpoint predicts
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    try:
        net = mlflow.pytorch.load_model("models:/tiny-teacher@champion")
    finally:
        mlflow.set_tracking_uri(None)
    best = build_from_checkpoint(load_checkpoint(tmp_path / "teacher" / "checkpoints" / "best.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x)["logits"], best.eval()(x)["logits"])


def test_missing_registered_teacher_is_clear(compose_cfg, image_folder: Path, tmp_path: Path):
    cfg = compose_cfg(
        [
            "loss=lsd",
            "model@teacher=resnet18",
            "teacher_ckpt=models:/nope@x",
            *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns"),
        ]
    )
    with pytest.raises(ConKDError, match="not in the model registry"):
        run(cfg)


def alpha_multirun(image_folder: Path, tmp_path: Path, *extra: str) -> tuple:
    """A 3-job plain multirun over loss.alpha; returns (client, all runs, parent, children)."""
    store = tmp_path / "mlruns"
    tiny = tiny_overrides(image_folder, tmp_path / "x", store)
    res = run_cli(
        "train.py", "-m", "experiment=teacher", "model=resnet18", "loss=supcon",
        "loss.alpha=0.1,0.5,1.0", "mlflow.register=null", *extra,
        *[o for o in tiny if not o.startswith("paths.output_dir")],
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    client = client_for(store)
    exp = client.get_experiment_by_name("conkd-imagefolder")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, runs, parents[0], children


def test_multirun_makes_parent_with_children(image_folder: Path, tmp_path: Path) -> None:
    client, _, parent, children = alpha_multirun(image_folder, tmp_path)
    assert parent.info.status == "FINISHED"
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["loss.alpha"] for c in children) == ["0.1", "0.5", "1.0"]
    assert sorted(c.data.tags["sweep.trial"] for c in children) == ["0", "1", "2"]
    hydra_files = {a.path for a in client.list_artifacts(children[0].info.run_id, "hydra")}
    assert "hydra/overrides.yaml" in hydra_files
    assert parent.data.params["override.loss.alpha"] == "0.1,0.5,1.0"
    assert "best_value" in parent.data.metrics and "best.loss.alpha" in parent.data.params
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert summary["n_finished"] == 3 and summary["best_run_id"] in {
        c.info.run_id for c in children
    }
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/sweep_objective_per_trial.png" in arts
    assert "sweep/sweep_parallel_coordinates.png" in arts


def test_concurrent_processes_on_fresh_store(image_folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "fresh"
    procs = []
    for i in range(2):
        args = [
            "train.py",
            "experiment=teacher",
            "model=resnet18",
            "mlflow.register=null",
            f"seed={i}",
            *tiny_overrides(image_folder, tmp_path / f"r{i}", store),
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    client = client_for(store)
    exp = client.get_experiment_by_name("conkd-imagefolder")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        for key in ("train/loss", "val/top1", "train/lr"):
            assert len(client.get_metric_history(r.info.run_id, key)) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_at_startup(compose_cfg, image_folder, tmp_path) -> None:
    port = free_port()  # nothing listens there
    cfg = compose_cfg(
        [
            *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "s"),
            "stage=teacher",
            "loss=ce",
            f"mlflow.tracking_uri=http://127.0.0.1:{port}",
        ]
    )
    start = time.monotonic()
    with pytest.raises(ConKDError, match="cannot reach the MLflow tracking store"):
        run(cfg)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_real_tracking_server(compose_cfg, image_folder: Path, tmp_path: Path) -> None:
    """A run logs into a real ``mlflow server`` started from the project's environment."""
    from tests.servers import mlflow_server

    with mlflow_server(
        f"sqlite:///{tmp_path}/server.db", tmp_path / "server-artifacts", tmp_path / "server.log"
    ) as url:
        cfg = compose_cfg(
            [
                *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "s"),
                "stage=teacher",
                "loss=ce",
                f"mlflow.tracking_uri={url}",
            ]
        )
        run(cfg)
        client = mlflow.MlflowClient(url)
        exp = client.get_experiment_by_name("conkd-imagefolder")
        run_id = client.search_runs([exp.experiment_id])[0].info.run_id
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}") as resp:
            body = json.load(resp)
        assert body["run"]["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in body["run"]["data"]["metrics"]}
        assert {"val/top1", "train/loss", "test/top1"} <= keys


def test_optuna_dashboard_serves_the_sweeps_studies(tmp_path: Path) -> None:
    """``make dashboard``'s optuna-dashboard, from the same environment as training (Optuna 5,
    SQLAlchemy 2), answers on 127.0.0.1 with a study's trials."""
    import optuna

    from tests.servers import optuna_dashboard

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="conkd_lion_digits", storage=storage)
    for value in (0.5, 0.25):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"conkd:pid": 1}))
    with optuna_dashboard(storage, tmp_path / "dashboard.log") as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/api/studies") as resp:
            (summary,) = json.load(resp)["study_summaries"]
        assert summary["study_name"] == "conkd_lion_digits"
        with urllib.request.urlopen(f"{url}/api/studies/{summary['study_id']}") as resp:
            trials = json.load(resp)["trials"]
    assert [t["values"] for t in trials] == [[0.5], [0.25]]


def test_ctrl_c_marks_run_killed(image_folder: Path, tmp_path: Path) -> None:
    import signal

    store = tmp_path / "mlruns"
    args = [
        "train.py",
        "experiment=teacher",
        "model=resnet18",
        "mlflow.register=null",
        *tiny_overrides(image_folder, tmp_path / "run", store),
        "trainer.epochs=500",
    ]
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that starts pytest in the background (`cmd &`) has its children ignore SIGINT,
        # and Python then installs no KeyboardInterrupt handler: give the run the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    client = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the run has logged an epoch
        if (tmp_path / "run" / "checkpoints" / "last.pt").exists():
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    client = client_for(store)
    r = only_run(client, "conkd-imagefolder")
    assert r.info.status == "KILLED"


def test_parallel_jobs_nest_under_one_parent(image_folder: Path, tmp_path: Path) -> None:
    client, runs, _, children = alpha_multirun(
        image_folder, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    assert len(runs) == 4 and len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:  # no lost metrics from concurrent writers
        assert len(client.get_metric_history(c.info.run_id, "val/top1")) == 2


def test_dataset_input_survives_the_stores_insert_race(tmp_path: Path, caplog) -> None:
    """Runs that record the same dataset at the same moment race in MLflow's check-then-insert
    (PostgreSQL answers "duplicate key ... dataset_pk"): the loser retries and finds the row; a
    store that keeps refusing costs a warning, never the training run."""
    from mlflow.exceptions import MlflowException

    from conkd.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fingerprint = {"identity": "imagenette", "digest": "d" * 40, "source": "/data",
                   "classes": ["a", "b"], "sizes": {"train": 8}}  # fmt: skip
    race = MlflowException(
        "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique "
        'constraint "dataset_pk"'
    )
    with MLflowTracker(uri, "e") as tracker:
        real, calls = tracker.client.log_inputs, []

        def log_inputs(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:  # the other run inserted the dataset first
                real(*args, **kwargs)
                raise race
            return real(*args, **kwargs)

        tracker.client.log_inputs = log_inputs
        tracker.log_dataset(fingerprint)
        assert len(calls) == 2 and "did not record" not in caplog.text

        def refused(*args, **kwargs):
            calls.append(1)
            raise race

        tracker.client.log_inputs = refused
        tracker.log_dataset(fingerprint)  # no exception
    assert len(calls) == 2 + 4 and "did not record the dataset input" in caplog.text
    inputs = mlflow.MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("imagenette", "d" * 36)]


def test_a_continued_run_gets_tags_it_lacks(tmp_path: Path) -> None:
    """A run started before a tag existed (conkd.device) gets it when it is continued."""
    from conkd.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MLflowTracker(uri, "e", tags={"stage": "teacher"}) as first:
        pass
    with MLflowTracker(uri, "e", tags={"stage": "teacher", "conkd.device": "cpu (2 threads)"},
                       resume_run_id=first.run_id) as again:  # fmt: skip
        assert again.resumed and again.run_id == first.run_id
    tags = mlflow.MlflowClient(uri).get_run(first.run_id).data.tags
    assert tags["conkd.device"] == "cpu (2 threads)" and tags["stage"] == "teacher"


def test_activating_a_run_leaves_the_next_runs_store_alone(
    tmp_path: Path, monkeypatch, request
) -> None:
    """``MLflowTracker.active`` (used to log models) must restore "no tracking URI set": a
    sweep's next trial in the same process then resolves the project store again, not MLflow's
    default ``sqlite:///mlflow.db`` in the working directory (which trials 1.. of a sweep used to
    get)."""
    from conkd.tracking import MLflowTracker, default_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(None))  # also when an assert fails
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    with MLflowTracker(uri, "e") as tracker, tracker.active():
        assert mlflow.get_tracking_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert resolve_store(tmp_path / "project", None) == default_store(tmp_path / "project")
    # an explicitly set URI is put back as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    with MLflowTracker(uri, "e") as tracker, tracker.active():
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////elsewhere/mlflow.db"
