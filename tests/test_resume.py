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
from conkd.state import TrainState
from tests.conftest import run_cli, tiny_overrides

#: Checkpoints written in the background on the CPU too (``auto``: on CUDA only).
BACKGROUND = "trainer.checkpoint_background=true"


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


def small_writer(directory: Path, background: bool) -> tuple[ckpt_io.Checkpointer, TrainState]:
    """A checkpointer of a stepped network with AdamW, a scheduler and a weight EMA, and a
    state with history: every kind of content a resumable checkpoint holds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model = model.to(memory_format=torch.channels_last)  # strided weights are kept as they are
    spec = {"_target_": "torch.nn.Identity"}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step(), sched.step()
    average = torch.optim.swa_utils.AveragedModel(model)
    extra = {"classes": ["a", "b"], "config": {"seed": 0, "trainer": {"epochs": 3}}}
    writer = ckpt_io.Checkpointer(directory, model, spec, opt, sched, extra, average, background)
    state = TrainState(epoch=1, step=4, history=[{"val/top1": 50.0}], best={"val/top1": 50.0})
    return writer, state


def test_a_background_checkpoint_is_the_file_a_direct_write_gives(tmp_path: Path) -> None:
    for background in (False, True):
        writer, state = small_writer(tmp_path / str(background), background)
        torch.manual_seed(5)  # the same RNG states in both files
        writer.save_best(epoch=0, metrics={"val/top1": 50.0})
        writer.save_last(state, epoch=0)
        writer.close()
    for name in ("last.pt", "best.pt"):
        direct, queued = ((tmp_path / b / name).read_bytes() for b in ("False", "True"))
        assert direct == queued, name


def test_a_background_checkpoint_holds_the_values_of_its_save_while_training_goes_on(
    tmp_path: Path, monkeypatch
) -> None:
    import threading

    release, real = threading.Event(), torch.save

    def slow_save(obj, path):
        assert release.wait(30)
        real(obj, path)

    monkeypatch.setattr(ckpt_io.torch, "save", slow_save)
    writer, state = small_writer(tmp_path, background=True)
    model, opt = writer.model, writer.optimizer
    weight = model[0].weight.detach().clone()
    moment = opt.state[model[0].weight]["exp_avg"].clone()
    writer.save_last(state)  # returns with the write still to come
    assert not (tmp_path / "last.pt").exists()
    with torch.no_grad():  # training goes on: weights, optimizer state and history change
        model[0].weight.add_(1.0)
    opt.state[model[0].weight]["exp_avg"].add_(1.0)
    state.history.append({"val/top1": 60.0})
    release.set()
    writer.close()
    saved = ckpt_io.load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(saved["state_dict"]["0.weight"], weight)
    assert saved["state_dict"]["0.weight"].stride() == weight.stride()
    assert torch.equal(saved["optimizer"]["state"][0]["exp_avg"], moment)
    assert saved["train_state"]["history"] == [{"val/top1": 50.0}]


def test_background_copies_reuse_their_buffers(tmp_path: Path) -> None:
    writer, state = small_writer(tmp_path, background=True)
    writer.save_last(state)
    copies = writer._writer._copies["last.pt"]  # noqa: SLF001 - the buffers are the point
    first = [t.data_ptr() for t in copies.buffers]
    writer.save_last(state)
    writer.close()
    assert [t.data_ptr() for t in copies.buffers] == first and len(first) > 10


def test_a_failed_background_write_is_raised_at_the_next_save_and_at_close(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full)
    writer, state = small_writer(tmp_path, background=True)
    writer.save_last(state)
    with pytest.raises(ConKDError, match="last.pt: the disk is full. The previous checkpoint"):
        writer.save_last(state)
    with pytest.raises(ConKDError, match="last.pt: the disk is full"):
        writer.save_best(epoch=1)  # nothing more is queued after a failed write
    writer.close()  # raised already
    writer, state = small_writer(tmp_path, background=True)
    writer.save_last(state)
    writer.close(raise_errors=False)  # training already ends with another error: logged
    assert "last.pt: the disk is full" in caplog.text
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "last.pt").exists()


def test_a_failed_best_checkpoint_keeps_the_last_one_of_its_epoch_from_landing(
    tmp_path: Path, monkeypatch
) -> None:
    """``last.pt`` names the best epoch: written after a failed ``best.pt`` it would name weights
    that no file holds. The previous ``last.pt`` stays."""
    real = torch.save

    def best_fails(obj, path):
        if Path(path).name.startswith("best.pt"):
            time.sleep(0.3)  # last.pt is queued behind it by then
            raise OSError(errno.EIO, "Input/output error")
        real(obj, path)

    writer, state = small_writer(tmp_path, background=True)
    writer.save_last(state, epoch=0)
    writer.flush()
    monkeypatch.setattr(ckpt_io.torch, "save", best_fails)
    state.epoch, state.best = 2, {"val/top1": 70.0, "epoch": 1}
    error = r"could not write checkpoint .*best.pt: \[Errno 5\] Input/output"
    writer.save_best(epoch=1)
    writer.save_last(state, epoch=1)  # queued behind the failing best.pt
    with pytest.raises(ConKDError, match=error):
        writer.close()
    assert not (tmp_path / "best.pt").exists()
    assert ckpt_io.load_checkpoint(tmp_path / "last.pt")["epoch"] == 0


def test_a_crashing_run_waits_for_the_checkpoint_in_flight(
    compose_cfg, image_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    real = torch.save

    def slow_save(obj, path):
        time.sleep(0.3)  # the crash below reaches the loop before this write ends
        real(obj, path)

    monkeypatch.setattr(ckpt_io.torch, "save", slow_save)
    out = tmp_path / "crashed"
    crash_after_step(monkeypatch, 2)
    with pytest.raises(Crash):
        run(compose_cfg(overrides(image_folder, out, tmp_path / "mlruns", BACKGROUND)))
    assert ckpt_io.load_checkpoint(out / "checkpoints" / "last.pt")["train_state"]["step"] == 2


def test_an_epoch_logged_before_its_checkpoint_landed_is_not_logged_twice(
    compose_cfg, image_folder: Path, tmp_path: Path, reference: Path, monkeypatch
) -> None:
    """The kill lands after epoch 1's metrics were logged, while its ``last.pt`` is written in
    the background: the run resumes from the checkpoint before (epoch 1's last step) and
    trains epoch 1's end again, with the same metrics, which it does not log again."""
    real = torch.save

    def killed_at_epoch_end(obj, path):
        ts = obj.get("train_state") or {}
        if ts.get("epoch") == 2 and ts.get("batch") == 0:  # last.pt at the end of epoch 1
            raise Crash("killed while writing epoch 1's last.pt")
        real(obj, path)

    out, store = tmp_path / "killed", tmp_path / "mlruns"
    cfg = overrides(image_folder, out, store, BACKGROUND)
    with monkeypatch.context() as m:
        m.setattr(ckpt_io.torch, "save", killed_at_epoch_end)
        with pytest.raises(Crash):
            run(compose_cfg(cfg))
    left = ckpt_io.load_checkpoint(out / "checkpoints" / "last.pt")
    run_id = left["run_id"]
    assert (left["train_state"]["epoch"], left["train_state"]["batch"]) == (1, 3)
    assert metric_steps(store, run_id) == [0, 1]  # epoch 1 was logged before the kill
    run(compose_cfg(cfg))
    assert compare_runs(reference, out) == []
    assert metric_steps(store, run_id) == [0, 1, 2]  # each epoch once


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
