"""Exact resume: a crashed or killed run continues from its last good checkpoint and ends
bit-identical (CPU, fixed seed) to an uninterrupted one, in the same MLflow run."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from benchmarks.fault_resume import compare_runs, fault_run, fault_sweep, write_dataset
from conkd import checkpoint as ckpt_io
from conkd.callbacks import CheckpointCallback
from conkd.errors import ConKDError
from conkd.run import run
from tests.conftest import run_cli, tiny_overrides


class Crash(Exception):
    """Stands in for a process dying after a checkpoint write."""


def overrides(image_folder: Path, out: Path, store: Path, *extra: str) -> list[str]:
    return [
        "stage=teacher", "loss=supcon", "teacher_ckpt=null", "optimizer=lion",
        *tiny_overrides(image_folder, out, store), "trainer.epochs=3",
        "trainer.checkpoint_every_steps=1", *extra,
    ]  # fmt: skip


def crash_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    real = CheckpointCallback.on_step_end

    def on_step_end(self, state):
        real(self, state)
        if state.step == step:
            raise Crash(f"crash after step {step}")

    monkeypatch.setattr(CheckpointCallback, "on_step_end", on_step_end)


@pytest.fixture
def reference(compose_cfg, image_folder: Path, tmp_path: Path) -> Path:
    """The uninterrupted run everything below is compared with."""
    out = tmp_path / "reference"
    value = run(compose_cfg(overrides(image_folder, out, tmp_path / "mlruns")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert value == metrics["objective"] == metrics["best/val/top1"]
    return out


def metric_steps(store: Path, run_id: str, key: str = "val/top1") -> list[int]:
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_crash_mid_epoch_resumes_bit_identical_in_the_same_mlflow_run(
    compose_cfg, image_folder: Path, tmp_path: Path, reference: Path, monkeypatch
) -> None:
    out, store = tmp_path / "crashed", tmp_path / "mlruns"
    cfg = overrides(image_folder, out, store)
    with monkeypatch.context() as m:
        crash_after_step(m, 5)  # epoch 1 (of 0..2), its second of three batches
        with pytest.raises(Crash):
            run(compose_cfg(cfg))
    first = ckpt_io.load_checkpoint(out / "checkpoints" / "last.pt")
    assert first["train_state"]["epoch"] == 1 and first["train_state"]["batch"] == 2
    run_id = first["run_id"]
    run(compose_cfg(cfg))  # resume=auto, the same command
    assert compare_runs(reference, out) == []
    assert json.loads((out / "metrics.json").read_text())["run_id"] == run_id
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert metric_steps(store, run_id) == [0, 1, 2]  # each epoch logged once


def test_corrupt_last_checkpoint_falls_back_to_the_previous(
    compose_cfg, image_folder: Path, tmp_path: Path, reference: Path, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="conkd")
    out = tmp_path / "crashed"
    cfg = overrides(image_folder, out, tmp_path / "mlruns")
    with monkeypatch.context() as m:
        crash_after_step(m, 4)
        with pytest.raises(Crash):
            run(compose_cfg(cfg))
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    run(compose_cfg(cfg))
    assert "not a readable ConKD checkpoint" in caplog.text
    assert "last.prev.pt" in caplog.text  # resumed from the one before
    assert compare_runs(reference, out) == []


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    compose_cfg, image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    real, calls = torch.save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 3:  # the third write: half the bytes, then ENOSPC
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    with pytest.raises(ConKDError, match="the disk is full. The previous checkpoint is intact"):
        run(compose_cfg(overrides(image_folder, out, tmp_path / "mlruns")))
    good = ckpt_io.latest_resumable(out / "checkpoints")
    assert good is not None and good["train_state"]["step"] == 2
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_ctrl_c_during_a_checkpoint_write_takes_effect_after_it(
    tmp_path: Path, monkeypatch, request
) -> None:
    """SIGINT that arrives mid-write: the file is completed and renamed, then KeyboardInterrupt."""
    import signal

    real, done = torch.save, []

    def save(obj, path):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands while the bytes are being written
        real(obj, path)
        done.append(path)

    monkeypatch.setattr(ckpt_io.torch, "save", save)
    # Ctrl-C raises KeyboardInterrupt, even where pytest was started with SIGINT ignored (`cmd &`)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    path = tmp_path / "last.pt"
    model = torch.nn.Linear(3, 2)
    spec = {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2}
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.save_checkpoint(path, model, spec, step=7)
    assert len(done) == 1  # the write was not cut off
    assert ckpt_io.load_checkpoint(path)["step"] == 7
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_never_and_finished_runs_are_refused(
    compose_cfg, image_folder: Path, tmp_path: Path, reference: Path, monkeypatch
) -> None:
    with pytest.raises(ConKDError, match="holds a finished run"):
        run(compose_cfg(overrides(image_folder, reference, tmp_path / "mlruns")))
    out = tmp_path / "crashed"
    with monkeypatch.context() as m:
        crash_after_step(m, 2)
        with pytest.raises(Crash):
            run(compose_cfg(overrides(image_folder, out, tmp_path / "mlruns")))
    cfg = overrides(image_folder, out, tmp_path / "mlruns", "resume=never")
    with pytest.raises(ConKDError, match="already holds checkpoints.*resume=auto"):
        run(compose_cfg(cfg))
    changed = overrides(image_folder, out, tmp_path / "mlruns", "optimizer.lr=1e-3")
    with pytest.raises(ConKDError, match=r"other settings \(optimizer.lr: 0.0003 -> 0.001\)"):
        run(compose_cfg(changed))


def test_resume_from_another_runs_checkpoint_starts_a_new_mlflow_run(
    compose_cfg, image_folder: Path, tmp_path: Path, reference: Path, monkeypatch
) -> None:
    crashed, store = tmp_path / "crashed", tmp_path / "mlruns"
    with monkeypatch.context() as m:
        crash_after_step(m, 7)
        with pytest.raises(Crash):
            run(compose_cfg(overrides(image_folder, crashed, store)))
    out = tmp_path / "continued"
    run(compose_cfg(overrides(image_folder, out, store, f"resume={crashed}")))
    assert compare_runs(reference, out) == []
    new_id = json.loads((out / "metrics.json").read_text())["run_id"]
    assert new_id != ckpt_io.load_checkpoint(crashed / "checkpoints" / "last.pt")["run_id"]
    assert metric_steps(store, new_id) == [0, 1, 2]  # epochs 0-1 logged from the history


@pytest.mark.slow
def test_sweep_killed_twice_evaluates_nothing_twice(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    report = fault_sweep(tmp_path, data, seed=0)
    assert len(report["killed_trials"]) == 2 and report["complete"] == 4, report
    assert report["duplicate_params"] == 0 and report["running_children"] == 0
    assert all(n == 1 for n in report["children_per_trial"].values())
    # a re-queued trial continued from its checkpoint and ended as an uninterrupted run
    assert report["continued_trials"] and all(d == [] for _, d in report["continued_vs_alone"])


@pytest.mark.slow
def test_torchrun_run_killed_twice_resumes_bit_identical(tmp_path: Path) -> None:
    """Two gloo processes: a kill takes both ranks down, the same torchrun command resumes
    every rank from rank 0's checkpoint and ends as the uninterrupted 2-process run."""
    data = write_dataset(tmp_path / "data")
    report = fault_run(tmp_path, data, kills=2, epochs=2, steps=3, seed=1, nproc=2)
    assert len(report["kills"]) == 2, report
    assert report["mismatches"] == []
    assert report["mlflow"] == {
        "status": "FINISHED",
        "val_top1_steps": [0, 1],
        "duplicates": 0,
        "missing": [],
    }


@pytest.mark.slow
def test_sigkill_at_five_points_resumes_bit_identical(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data")
    report = fault_run(tmp_path, data, kills=5, epochs=3, steps=4, seed=0)
    assert len(report["kills"]) == 5, report
    assert "during a checkpoint write" in report["kills"]
    assert report["mismatches"] == []
    assert report["mlflow"] == {
        "status": "FINISHED",
        "val_top1_steps": [0, 1, 2],
        "duplicates": 0,
        "missing": [],
    }


def test_stale_runs_are_listed_and_closed(tmp_path: Path) -> None:
    import socket

    from conkd import maintenance
    from conkd.owner import RUN_TAGS
    from conkd.tracking import stale_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    host = socket.gethostname()
    tags = {
        "dead": {RUN_TAGS.host: host, RUN_TAGS.pid: dead},
        "alive": {RUN_TAGS.host: host, RUN_TAGS.pid: str(os.getpid())},
        "quiet": {RUN_TAGS.host: "elsewhere", RUN_TAGS.heartbeat: "1000"},
        "recent": {RUN_TAGS.host: "elsewhere", RUN_TAGS.heartbeat: str(int(time.time()))},
    }  # fmt: skip
    ids = {
        name: client.create_run(exp, run_name=name, tags=t).info.run_id for name, t in tags.items()
    }
    stale = {r.info.run_name: why for r, why in stale_runs(client)}
    assert set(stale) == {"dead", "quiet"}
    assert stale["dead"] == f"pid {dead} is not running on {host}"
    assert maintenance.main(["--tracking-uri", uri, "close-stale"]) == 0
    status = {n: client.get_run(i).info.status for n, i in ids.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "quiet": "KILLED", "recent": "RUNNING"}


def test_tracking_outage_buffers_metrics_and_sends_them_later(tmp_path: Path, caplog) -> None:
    from conkd.tracking import MLflowTracker, replay

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pending = tmp_path / "out" / "mlflow_pending.json"
    with MLflowTracker(uri, "e", pending_file=pending) as tracker:
        client, real = tracker.client, tracker.client.log_batch
        down = {"on": True}

        def log_batch(*args, **kwargs):
            if down["on"]:
                raise ConnectionError("server went away")
            return real(*args, **kwargs)

        client.log_batch = log_batch
        tracker.log_metrics({"a": 1.0}, step=0)  # training goes on
        tracker.log_metrics({"a": 2.0}, step=1)
        assert len(tracker.pending) == 2 and "does not answer" in caplog.text
        down["on"] = False
        tracker.log_metrics({"a": 3.0}, step=2)  # back: the backlog goes first
        assert tracker.pending == [] and "answers again" in caplog.text
        down["on"] = True
        tracker.log_metrics({"a": 4.0}, step=3)
    run_id = tracker.run_id
    steps = [(m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "a")]
    assert sorted(steps) == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert pending.is_file() and "conkd.maintenance replay" in caplog.text
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # its end is in the file too
    assert replay(client, pending) == 1
    steps = [m.step for m in client.get_metric_history(run_id, "a")]
    assert sorted(steps) == [0, 1, 2, 3] and client.get_run(run_id).info.status == "FINISHED"


def test_cli_lists_runs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_run(client.create_experiment("e"), run_name="orphan")
    res = run_cli("-m", "conkd.maintenance", "--tracking-uri", uri, "list", "--older-than", "0")
    assert res.returncode == 0, res.stderr
    assert "orphan" in res.stdout and "1 RUNNING, 1 stale" in res.stdout
