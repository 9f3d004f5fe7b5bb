"""Optuna sweeps through the conkd_optuna sweeper: results, failures, pruning, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from tests.conftest import ROOT, run_cli, run_workers, tiny_overrides, write_image_folder


def sweep_args(image_folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    """A multirun on the tiny dataset with its own Optuna storage and MLflow store."""
    tiny = [
        o
        for o in tiny_overrides(image_folder, tmp_path / "unused", tmp_path / "mlruns")
        if not o.startswith("paths.output_dir")
    ]
    return [
        "train.py",
        "-m",
        *tiny,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "hydra.sweeper.study_name=test",
        *extra,
    ]


def study(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="test", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def mlflow_runs(tmp_path: Path) -> tuple[list, list]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("conkd-imagefolder")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def conkd_lion_args(image_folder: Path, teacher_run: Path, tmp_path: Path, *extra: str) -> list:
    """The mission's search space, 4 trials, no pruner, with the session's tiny teacher."""
    return sweep_args(
        image_folder, tmp_path, "hparams_search=conkd_lion", "model@teacher=resnet18",
        f"teacher_ckpt={teacher_run / 'checkpoints' / 'best.pt'}", "hydra.sweeper.n_trials=4",
        "hydra/sweeper/pruner=none", *extra,
    )  # fmt: skip


def lr_sweep_args(image_folder: Path, tmp_path: Path, *extra: str) -> list:
    """A cheap conkd_optuna sweep: CE-trained ResNet-18, AdamW lr searched, 2 trials."""
    return sweep_args(
        image_folder, tmp_path, "hydra/sweeper=conkd_optuna", "stage=teacher", "loss=ce",
        "model=resnet18", "optimizer=adamw", "optimizer.lr=interval(1e-4, 1e-2)",
        "hydra.sweeper.n_trials=2", *extra,
    )  # fmt: skip


def states(s: optuna.Study) -> list[str]:
    return [t.state.name for t in s.trials]


def test_four_trial_sweep_over_the_search_space(
    image_folder: Path, teacher_run: Path, tmp_path: Path
) -> None:
    res = run_cli(*conkd_lion_args(image_folder, teacher_run, tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    s = study(tmp_path)
    assert states(s) == ["COMPLETE"] * 4
    assert set(s.best_trial.params) == {
        "loss.alpha",
        "loss.kd_temperature",
        "optimizer.lr",
        "loss.supcon_temperature",
        "optimizer.weight_decay",
        "loss.ce_weight",
    }
    parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert sorted(int(c.data.tags["sweep.trial"]) for c in children) == [0, 1, 2, 3]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # best params saved by the sweeper and by the summary, with a runnable command
    sweep = tmp_path / "sweep"
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == (
        pytest.approx(s.best_value)
    )
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["best_value"] == pytest.approx(s.best_value)
    assert summary["best_trial"] == s.best_trial.number
    line = (sweep / "best_overrides.txt").read_text()
    assert line.startswith("python train.py ") and "loss=lsd+supcon" in line
    assert f"optimizer.lr={s.best_trial.params['optimizer.lr']}" in line
    assert (sweep / "best_experiment.yaml").read_text().startswith("# @package _global_")
    assert parents[0].data.metrics["best_value"] == pytest.approx(s.best_value)
    assert (sweep / f"trial_{s.best_trial.number}" / "checkpoints" / "best.pt").is_file()


def test_best_command_reruns_the_best_trial(
    image_folder: Path, tmp_path: Path, compose_cfg
) -> None:
    """The saved experiment file composes to the best trial's values."""
    res = run_cli(
        *lr_sweep_args(image_folder, tmp_path, "hydra/sweeper/pruner=none", "trainer.epochs=1")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    best = study(tmp_path).best_trial.params["optimizer.lr"]
    # as a user would copy it into conf/experiment/, but into a search-path folder of its own
    extra = tmp_path / "extra_conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "_test_best.yaml").write_text(
        (tmp_path / "sweep" / "best_experiment.yaml").read_text()
    )
    cfg = compose_cfg([f"hydra.searchpath=[file://{extra.parent}]", "experiment=_test_best"])
    assert cfg.optimizer.lr == pytest.approx(best)
    assert "AdamW" in cfg.optimizer._target_ and cfg.stage == "teacher"


def test_diverged_trial_fails_and_sweep_goes_on(image_folder: Path, tmp_path: Path) -> None:
    res = run_cli(
        *sweep_args(
            image_folder,
            tmp_path,
            "hydra/sweeper=conkd_optuna",
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.n_trials=2",  # TPE with seed 0 draws lr 1e12, then 0.01
            "stage=teacher",
            "loss=ce",
            "model=resnet18",
            "optimizer=sgd",
            "scheduler=none",
            "optimizer.lr=choice(0.01, 1e12)",
            "trainer.epochs=1",
        )
    )
    assert res.returncode == 0, res.stderr[-3000:]
    s = study(tmp_path)
    assert sorted(states(s)) == ["COMPLETE", "FAIL"]
    failed = next(t for t in s.trials if t.state.name == "FAIL")
    assert failed.params["optimizer.lr"] == 1e12
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert len(summary["failures"]) == 1 and "non-finite" in summary["failures"][0]["error"]
    _, children = mlflow_runs(tmp_path)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]


def test_failure_budget_stops_the_sweep(image_folder: Path, tmp_path: Path) -> None:
    """max_failure_rate=0.25 of 4 trials allows one failure: the second one stops the sweep
    before trials 3 and 4 run."""
    res = run_cli(
        *sweep_args(
            image_folder,
            tmp_path,
            "hydra/sweeper=conkd_optuna",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.max_failure_rate=0.25",
            "stage=teacher",
            "loss=ce",
            "model=resnet18",
            "optimizer=sgd",
            "scheduler=none",
            "optimizer.lr=choice(1e12)",
            "trainer.epochs=1",
        )  # fmt: skip
    )
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "2 trials failed, more than max_failure_rate=0.25 of 4: stopping" in out
    assert states(study(tmp_path)) == ["FAIL", "FAIL"]


def test_pruner_stops_a_clearly_worse_trial(tmp_path: Path) -> None:
    image_folder = write_image_folder(tmp_path / "data", per_class_train=40, per_class_val=4)
    common = [
        "hydra/sweeper=conkd_optuna",
        "stage=teacher",
        "loss=ce",
        "model=resnet18",
        "optimizer=adamw",
        "scheduler=none",
        "trainer.epochs=4",
        "trainer.max_steps_per_epoch=null",
        "loss.label_smoothing=interval(0.0, 0.01)",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "hydra.sweeper.pruner.n_warmup_steps=1",
        "hydra.sweep.subdir=trial_${optuna.trial}",
    ]
    good = run_cli(
        *sweep_args(
            image_folder, tmp_path, *common, "optimizer.lr=3e-3", "hydra.sweeper.n_trials=2"
        )
    )
    assert good.returncode == 0, good.stderr[-3000:]
    # same study, one more trial with a learning rate that cannot learn anything
    bad = run_cli(
        *sweep_args(
            image_folder, tmp_path, *common, "optimizer.lr=1e-12", "hydra.sweeper.n_trials=3"
        )
    )
    assert bad.returncode == 0, bad.stderr[-3000:]
    s = study(tmp_path)
    assert states(s) == ["COMPLETE", "COMPLETE", "PRUNED"], [
        (t.state.name, t.intermediate_values) for t in s.trials
    ]
    pruned = s.trials[2]
    assert max(pruned.intermediate_values) < 3  # stopped before its last epoch (index 3)
    _, children = mlflow_runs(tmp_path)
    tags = {c.data.tags["sweep.trial"]: c.data.tags.get("pruned") for c in children}
    assert tags == {"0": None, "1": None, "2": "true"}
    # the pruned trial is not tested; the finished ones are
    tested = {c.data.tags["sweep.trial"]: "test/top1" in c.data.metrics for c in children}
    assert tested == {"0": True, "1": True, "2": False}


@pytest.mark.slow
def test_interrupted_sweep_resumes_to_requested_total(
    image_folder: Path, teacher_run: Path, tmp_path: Path
) -> None:
    args = conkd_lion_args(image_folder, teacher_run, tmp_path, "trainer.epochs=3")
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            done = states(optuna.load_study(study_name="test", storage=storage)).count("COMPLETE")
        except Exception:  # study not created yet
            done = 0
        if done >= 2:
            break
        assert proc.poll() is None, "sweep ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert states(study(tmp_path)).count("COMPLETE") == 2

    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    s = study(tmp_path)
    finished = [t for t in s.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4
    assert all(t.user_attrs.get("conkd:interrupted") for t in s.trials if t.state.name == "FAIL")
    # no parameter set evaluated twice (the re-run does not replay the sampler's sequence), and
    # the interrupted trial's parameters are evaluated exactly once, by its re-queued trial
    evaluated = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(evaluated)) == len(evaluated) == 4
    for t in s.trials:
        if t.state.name == "FAIL":
            assert evaluated.count(tuple(sorted(t.params.items()))) == 1
    parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1  # the resumed sweep reuses the study's parent run
    finished_children = [c for c in children if c.info.status == "FINISHED"]
    trials = [c.data.tags["sweep.trial"] for c in finished_children]
    assert len(trials) == len(set(trials)) == 4  # one child run per trial, no duplicates
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)


def test_parallel_trials_with_joblib(image_folder: Path, tmp_path: Path) -> None:
    res = run_cli(
        *lr_sweep_args(
            image_folder,
            tmp_path,
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweep.subdir=trial_${optuna.trial}",
        )  # fmt: skip
    )
    assert res.returncode == 0, res.stderr[-3000:]
    s = study(tmp_path)
    assert states(s) == ["COMPLETE", "COMPLETE"]
    # each job reported to its own trial from its own process
    assert all(len(t.intermediate_values) == 2 for t in s.trials)
    parents, children = mlflow_runs(tmp_path)
    assert len(parents) == 1
    assert sorted(c.data.tags["sweep.trial"] for c in children) == ["0", "1"]


def test_workers_that_race_settle_on_one_parent_run(tmp_path: Path) -> None:
    """Two workers of one study that both found no parent and created one: each keeps the
    oldest and deletes its own, so every trial nests under the same run."""
    from conkd.tracking import SweepParent

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    tags = {"sweep.parent": "true", "sweep.study": "s"}
    first = client.create_run(exp, tags=tags, start_time=1000).info.run_id
    second = client.create_run(exp, tags=tags, start_time=2000).info.run_id
    client.create_run(exp, tags={**tags, "sweep.study": "other"}, start_time=500)
    workers = [SweepParent(client, exp), SweepParent(client, exp)]
    assert workers[1].settle("s", second) == first
    assert workers[0].settle("s", first) == first
    assert client.get_run(second).info.lifecycle_stage == "deleted"
    assert client.get_run(first).info.lifecycle_stage == "active"
    assert [r.info.run_id for r in workers[0].study_parents("s")] == [first]


def test_workers_that_start_together_draw_different_parameters() -> None:
    """Two workers with the same sampler seed on one empty study: one seeded sampler per worker
    draws the same first parameters in both (a wasted evaluation); seeded per trial number, they
    differ, and one worker alone draws the very same values for the same trial numbers."""
    from hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper import TrialSeeded

    space = {
        "alpha": optuna.distributions.FloatDistribution(0.0, 1.0),
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True),
    }

    def first_asks(samplers: list) -> list[dict]:
        """Each sampler (a worker) asks one trial of one shared in-memory study, in turn."""
        s = optuna.create_study(direction="maximize")
        out = []
        for sampler in samplers:
            s.sampler = sampler
            out.append(s.ask(space).params)
        return out

    per_worker = first_asks([optuna.samplers.TPESampler(seed=7) for _ in range(2)])
    assert per_worker[0] == per_worker[1]  # what a per-worker seed does

    def per_trial() -> TrialSeeded:
        return TrialSeeded(lambda seed: optuna.samplers.TPESampler(seed=seed), 7)

    two_workers = first_asks([per_trial(), per_trial()])
    assert two_workers[0] != two_workers[1]
    one_worker = first_asks([per_trial()] * 2)
    assert one_worker == two_workers


def test_a_trial_is_marked_by_its_worker_and_an_unmarked_one_is_an_orphan(tmp_path: Path) -> None:
    """A worker killed right after ``ask`` (before the sweeper configured the trial) once left a
    RUNNING trial with no host or pid: resumed workers counted it as live and the sweep ended
    one trial short. A worker marks its trial as it asks for it; a RUNNING trial nobody marked
    is an orphan once older than the few milliseconds marking takes."""
    import socket

    from conkd.owner import STALE_AFTER_S, TRIAL_ATTRS
    from conkd.sweep import StudyTrials, open_storage
    from hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper import claim, orphan_reason

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    trials = StudyTrials(storage, "s")
    mine = trials.get(claim(study).number)
    assert (mine.user_attrs[TRIAL_ATTRS.host], mine.user_attrs[TRIAL_ATTRS.pid]) == (
        socket.gethostname(),
        os.getpid(),
    )
    assert orphan_reason(mine, STALE_AFTER_S) is None  # this process is alive
    # killed between ask and the mark
    bare = trials.get(study.ask().number)
    start = bare.datetime_start.timestamp()
    assert orphan_reason(bare, STALE_AFTER_S, now=start + 1.0) is None  # may be marking it now
    assert orphan_reason(bare, STALE_AFTER_S, now=start + 3.0) == (
        "its worker stopped before marking it"
    )
    # marked by a worker that has exited
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    trials.mark(bare.number, TRIAL_ATTRS.host, socket.gethostname())
    trials.mark(bare.number, TRIAL_ATTRS.pid, int(done.stdout))
    why = orphan_reason(trials.get(bare.number), STALE_AFTER_S)
    assert why == f"pid {int(done.stdout)} is not running on {socket.gethostname()}"
    # a queued trial is marked by the worker that runs it, not by the one that queued it
    study.enqueue_trial({"x": 1.0}, user_attrs={"conkd:resume": "last.pt"})
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))[0]
    assert TRIAL_ATTRS.pid not in waiting.user_attrs
    popped = trials.get(claim(study).number)
    assert popped.number == waiting.number and popped.user_attrs[TRIAL_ATTRS.pid] == os.getpid()
    assert popped.user_attrs["conkd:resume"] == "last.pt"


def test_a_restarted_sweep_waits_to_judge_a_trial_asked_for_just_before_the_kill(
    tmp_path: Path,
) -> None:
    """A sweep killed between ``study.ask()`` and the mark leaves a bare RUNNING trial; a
    restart can check it under 2 s later (seen in CI: 1.97 s), when it still looks like one a
    live worker is marking, and counted it as running: one trial short. The restart waits until
    the bare trial is old enough, then marks it FAIL (interrupted)."""
    from types import SimpleNamespace

    from conkd.owner import STALE_AFTER_S
    from conkd.sweep import INTERRUPTED_ATTR, StudyTrials, open_storage
    from hydra_plugins.conkd_optuna_sweeper.conkd_optuna_sweeper import (
        UNCLAIMED_AFTER_S,
        ConKDOptunaSweeperImpl,
        unclaimed_wait,
    )

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage)
    bare = study.ask()  # the killed worker's last act
    frozen = study.get_trials(deepcopy=False)[0]
    start = frozen.datetime_start.timestamp()
    assert unclaimed_wait(frozen, now=start + 0.5) == pytest.approx(UNCLAIMED_AFTER_S - 0.5)
    assert unclaimed_wait(frozen, now=start + 3.0) == 0.0
    sweeper = SimpleNamespace(trials=StudyTrials(storage, "s"), stale_after_s=STALE_AFTER_S)
    ConKDOptunaSweeperImpl._requeue_orphans(sweeper, study)  # at once: the trial is not 2 s old
    after = study.get_trials(deepcopy=False)[bare.number]
    assert time.time() - start >= UNCLAIMED_AFTER_S
    assert after.state.name == "FAIL" and after.user_attrs[INTERRUPTED_ATTR] is True


def test_old_optuna_database_is_refused_with_the_upgrade_command(tmp_path: Path) -> None:
    """A study database the old stack wrote (optuna 2.10.1: tests/fixtures/optuna-2.10.1.db, a
    3-trial study made by it) stops with one line giving the command that upgrades it; after
    that command the study opens with its trials."""
    import shutil

    from conkd.errors import ConKDError
    from conkd.sweep import open_storage

    shutil.copy(ROOT / "tests" / "fixtures" / "optuna-2.10.1.db", tmp_path / "optuna.db")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(ConKDError) as err:
        open_storage(url)
    command = f"optuna storage upgrade --storage {url}"
    assert str(err.value) == (
        f"the Optuna storage {url} was written by an older Optuna (optuna 2.10.1); upgrade it "
        f"once (then only Optuna >= 3 reads it) with: {command}"
    )
    cli = Path(sys.executable).parent / "optuna"
    subprocess.run([str(cli), *command.split()[1:]], check=True, capture_output=True)
    study = optuna.load_study(study_name="conkd_lion_digits", storage=open_storage(url))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert set(study.best_params) == {"loss.alpha"}


def test_gp_sampler_is_a_config_choice(image_folder: Path, tmp_path: Path) -> None:
    """hydra/sweeper/sampler=gp: Optuna's Gaussian-process sampler (seeded per trial like the
    others) proposes the trials after its startup ones."""
    res = run_cli(
        *lr_sweep_args(
            image_folder,
            tmp_path,
            "hydra/sweeper/sampler=gp",
            "hydra.sweeper.sampler.seed=0",
            "hydra.sweeper.sampler.n_startup_trials=1",
            "hydra.sweeper.n_trials=3",
            "hydra/sweeper/pruner=none",
            "trainer.epochs=1",
        )  # fmt: skip
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "study test on sqlite:///" in out and "sampler GPSampler" in out
    assert "greenlet" not in out  # GPSampler's batched optimiser is installed
    s = study(tmp_path)
    assert states(s) == ["COMPLETE"] * 3
    lrs = [t.params["optimizer.lr"] for t in s.trials]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)


@pytest.mark.slow  # two worker processes: ~30-60 s; CI runs it (make test-all)
def test_two_workers_share_one_journal_file(image_folder: Path, tmp_path: Path) -> None:
    """hydra/sweeper/storage=journal: a study in one file (no database server), as on a network
    file system. Two workers started together on it run the requested total, each trial number
    once, and both take trials."""
    journal = tmp_path / "shared" / "optuna.journal"
    journal.parent.mkdir()
    args = [
        a for a in lr_sweep_args(
            image_folder, tmp_path, "hydra/sweeper/storage=journal",
            f"hydra.sweeper.storage.log_storage.file_path={journal}", "hydra.sweeper.n_trials=4",
            "hydra/sweeper/pruner=none", "trainer.epochs=1",
            "hydra.sweep.subdir=trial_${optuna.trial}",
        ) if not a.startswith("hydra.sweeper.storage=sqlite")
    ]  # fmt: skip
    outputs = run_workers(args)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="test", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, "\n".join(outputs)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert len({t.user_attrs["conkd:pid"] for t in trials}) == 2  # both workers pulled trials
    assert all(f"study test on journal:{journal}, sampler TPESampler" in out for out in outputs)
    assert not (tmp_path / "optuna.db").exists()
