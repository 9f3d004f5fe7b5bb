"""experiments/protocol.py: which rows run, the table written from MLflow, and (slow) the whole
protocol at toy scale run twice (the second run finds everything done)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

spec = importlib.util.spec_from_file_location("protocol", ROOT / "experiments" / "protocol.py")
protocol = importlib.util.module_from_spec(spec)
sys.modules["protocol"] = protocol  # dataclasses look their module up while the file runs
spec.loader.exec_module(protocol)


def fake_run(client, exp_id: str, row: str, seed: int, top1: float, status: str = "FINISHED",
             epoch_s: float = 30.0, curve: tuple[float, ...] = (50.0, 60.0)) -> str:  # fmt: skip
    """A run as train.py logs it: tags, params, per-epoch history and final metrics."""
    tags = {"protocol": "t", "row": row, "conkd.device": "cpu (2 threads)"}
    run = client.create_run(exp_id, tags=tags)
    rid = run.info.run_id
    for k, v in {"seed": seed, "trainer.epochs": len(curve), "dataset.image_size": 32}.items():
        client.log_param(rid, k, v)
    for step, v in enumerate(curve):
        client.log_metric(rid, "val/top1", v, step=step)
        client.log_metric(rid, "train/epoch_time_s", epoch_s, step=step)
    for k, v in {"test/top1": top1, "test/top5": 99.0, "best/val/top1": max(curve)}.items():
        client.log_metric(rid, k, v)
    client.set_terminated(rid, status)
    return rid


@pytest.fixture
def store(tmp_path: Path, image_folder: Path):
    from mlflow import MlflowClient

    s = protocol.Settings(
        name="t", data=image_folder, out=tmp_path / "out", seeds=(0, 1), trials=3,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )  # fmt: skip
    client = MlflowClient(s.tracking_uri)
    exp = client.create_experiment(s.experiment)
    fake_run(client, exp, "teacher", 0, 80.0)
    fake_run(client, exp, "ce", 0, 70.0)
    fake_run(client, exp, "ce", 1, 72.0, curve=(52.0, 64.0))
    fake_run(client, exp, "kd", 0, 75.0)
    fake_run(client, exp, "kd", 1, 99.0, status="KILLED")  # killed: must run again
    return s, client


def test_plan_runs_only_what_is_not_finished(store) -> None:
    s, client = store
    steps = {(r.name, seed): cmd for r, seed, cmd in protocol.plan(s, protocol.ROWS, client)}
    assert steps[("teacher", 0)].startswith("done (run ")
    assert steps[("ce", 0)].startswith("done") and steps[("ce", 1)].startswith("done")
    assert steps[("kd", 0)].startswith("done")
    kd1 = steps[("kd", 1)]
    assert kd1[:2] == ["loss=kd", "optimizer=adamw"]
    assert "seed=1" in kd1 and f"hydra.run.dir={(s.dir / 'kd' / 'seed1').resolve()}" in kd1
    assert f"teacher_ckpt={s.teacher_ckpt().resolve()}" in kd1
    assert "++mlflow.tags.row=kd" in kd1
    sweep = steps[("sweep", 0)]
    assert sweep[0] == "-m" and "hydra.sweeper.n_trials=3" in sweep
    assert steps[("sweep_best", 0)] == steps[("sweep_best", 1)] == "waits for the sweep"
    assert ("notebook", 0) in steps  # plan() takes any rows; select() leaves optional ones out
    assert "notebook" not in {r.name for r in protocol.select(None)}


def test_students_wait_for_the_teacher(tmp_path: Path, image_folder: Path) -> None:
    from mlflow import MlflowClient

    s = protocol.Settings(name="t", data=image_folder, out=tmp_path,
                          tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")  # fmt: skip
    steps = protocol.plan(s, [protocol.BY_NAME["teacher"], protocol.BY_NAME["kd"]],
                          MlflowClient(s.tracking_uri))  # fmt: skip
    assert isinstance(steps[0][2], list)
    assert [cmd for _, _, cmd in steps[1:]] == ["waits for teacher"] * 2
    # the extra ResNet-18 teacher's students wait for it, then distil from its checkpoint
    rows = [protocol.BY_NAME["teacher_r18"], protocol.BY_NAME["kd_r18t"]]
    client = MlflowClient(s.tracking_uri)
    assert protocol.plan(s, rows, client)[1][2] == "waits for teacher_r18"
    exp = client.get_experiment_by_name(s.experiment) or client.create_experiment(s.experiment)
    fake_run(client, getattr(exp, "experiment_id", exp), "teacher_r18", 0, 85.0)
    teacher, kd = protocol.plan(s, rows, client)[:2]
    assert teacher[2].startswith("done (run ")
    ckpt = (tmp_path / "t" / "teacher_r18" / "seed0" / "checkpoints" / "best.pt").resolve()
    assert f"teacher_ckpt={ckpt}" in kd[2] and "model@teacher=resnet18" in kd[2]
    assert "trainer.epochs=8" in kd[2]
    assert "trainer.epochs=40" in command_of(s, "teacher_r18")


def command_of(s, row: str) -> list[str]:
    return protocol.command(s, protocol.BY_NAME[row], 0)


def test_table_from_the_store(store, tmp_path: Path) -> None:
    s, _ = store
    s = dataclasses.replace(s, extra=("dataset.batch_size=256",))  # ``--set``: in every command
    readme = tmp_path / "README.md"
    readme.write_text("# Experiments\n\nintro\n")
    protocol.tabulate(s, readme, tmp_path / "figures")
    # re-tabulating replaces the section; --section-out copies it, markers included
    protocol.tabulate(s, readme, tmp_path / "figures", tmp_path / "section.md")
    text = readme.read_text()
    copy = (tmp_path / "section.md").read_text()
    assert copy.startswith("<!-- protocol:t:start -->\nProtocol `t`: 64 px, teacher 40 epochs")
    assert copy.endswith("<!-- protocol:t:end -->\n") and copy in text
    assert text.count("<!-- protocol:t:start -->") == 1 and text.startswith("# Experiments\n")
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| teacher ResNet-101, the teacher preset (experiment=teacher) "
                              "| 80.00 | 99.00 |")  # fmt: skip
    assert rows[1] == (
        "| ResNet-18, CE only, AdamW | 71.00 ± 1.41 (70.00, 72.00) | 99.00 | 62.00 | 2 | 32 "
        "| 1.0 min | cpu (2 threads) | `stage=teacher loss=ce optimizer=adamw teacher_ckpt=null` |"
    )
    assert rows[2].startswith(
        "| ResNet-18, Hinton KD (T 4), AdamW | 75.00 | "
    )  # killed run left out
    assert len(rows) == 3
    # the header gives the planned seeds; the row whose second seed did not finish is named
    assert "seeds 0, 1. Every row" in text
    assert "\n- seeds that finished, where not all did: ResNet-18, Hinton KD (T 4), AdamW " \
           "(0 of 0, 1)\n" in text  # fmt: skip
    assert "- teacher vs CE student (must be clearly positive): +9.00 points (larger than the " \
           "seed spread, spread 1.41)" in text  # fmt: skip
    assert "- KD vs CE: +4.00 points (larger than the seed spread, spread 1.41)" in text
    assert (tmp_path / "figures" / "t_val_curves.png").stat().st_size > 0
    # the shared overrides name paths relative to the project, not this machine's folders
    ckpt = os.path.relpath(s.teacher_ckpt().resolve(), ROOT)
    assert f" teacher_ckpt={ckpt} dataset.batch_size=256\n" in text and "=/" not in text
    assert "![validation top-1 per epoch](figures/t_val_curves.png)" in text


def test_unknown_row_is_named() -> None:
    with pytest.raises(SystemExit, match="unknown row.*nope"):
        protocol.select("kd,nope")


@pytest.mark.slow
def test_whole_protocol_at_toy_scale_then_nothing_twice(image_folder: Path, tmp_path: Path) -> None:
    """Every kind of default row at 32 px / 2 steps, one seed, a 2-trial sweep; run again: all
    done. ``kd_r18t`` and ``lsd_r18t`` are left out to keep CI short: they differ from ``kd`` and
    ``lsd`` only in the teacher, whose path ``conkd_lion_r18t`` runs and
    ``test_students_wait_for_the_teacher`` plans."""
    rows = [
        r.name for r in protocol.ROWS if not r.optional and r.name not in ("kd_r18t", "lsd_r18t")
    ]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        str(ROOT / "experiments" / "protocol.py"), "run", "--name", "toy", "--rows", ",".join(rows),
        "--data", str(image_folder), "--out", str(tmp_path / "out"), "--image-size", "32",
        "--teacher-epochs", "1", "--student-epochs", "2", "--seeds", "0", "--trials", "2",
        "--tracking-uri", store, "--readme", str(tmp_path / "README.md"),
        "--figures", str(tmp_path / "figures"),
    ]  # fmt: skip
    for o in ("dataset.batch_size=8", "dataset.eval_batch_size=16", "dataset.num_workers=0",
              "dataset.val_fraction=0.2", "model.small_stem=false", "teacher.small_stem=false",
              "trainer.max_steps_per_epoch=2", "mlflow.log_model=false",
              f"paths.cache_dir={tmp_path / 'cache'}"):  # fmt: skip
        args += ["--set", o]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    # teacher, 6 rows, the ResNet-18 teacher and one of its students, sweep, best
    assert first.stdout.count(": running (log ") == 11
    assert first.stdout.count(": done in ") == 11
    second = run_cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert ": running" not in second.stdout
    assert second.stdout.count(": done (") == 11

    table = run_cli(*[a if a != "run" else "table" for a in args])
    assert table.returncode == 0, table.stdout + table.stderr
    text = (tmp_path / "README.md").read_text()
    out = tmp_path / "out" / "toy"
    for row in ("teacher", "ce", "kd", "lsd", "lsd_supcon_adamw", "conkd_lion", "conkd_lion_mix",
                "teacher_r18", "conkd_lion_r18t", "sweep_best"):  # fmt: skip
        metrics = json.loads((out / row / "seed0" / "metrics.json").read_text())
        title = protocol.BY_NAME[row].title
        assert f"| {title} | {metrics['test/top1']:.2f} | {metrics['test/top5']:.2f} |" in text
    assert "- trials: 2 counted of 2" in text


def test_sweep_count_leaves_out_interrupted_and_orphaned_trials(tmp_path: Path) -> None:
    """A killed sweep's interrupted trial (re-queued by the sweeper) and its orphaned RUNNING
    one do not count towards the protocol's trials; finished, pruned and failed ones do."""
    import optuna
    from optuna.trial import TrialState

    from conkd.sweep import INTERRUPTED_ATTR

    s = protocol.Settings(name="t", out=tmp_path, trials=3)
    s.dir.mkdir(parents=True)
    study = optuna.create_study(study_name=s.study, storage=s.storage)
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        value = 1.0 if state == TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, value=value))
    # as the sweeper leaves an orphan: flagged interrupted, FAIL (and re-queued)
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={INTERRUPTED_ATTR: True})
    )
    study.ask()  # RUNNING, and nobody runs it
    assert protocol.sweep_state(s)[1] == 3


def test_one_seed_differences_are_not_called_significant() -> None:
    """With one seed on each side there is no spread: the line says so instead of a verdict."""

    def result(row: str, top1: list[float]) -> protocol.Result:
        return protocol.Result(protocol.BY_NAME[row], list(range(len(top1))), top1, top1, top1,
                               20, 128, 1.0, "gpu", [top1], "")  # fmt: skip

    lines = protocol.comparisons([result("ce", [81.43]), result("conkd_lion", [82.22])])
    assert lines == [
        "- the mission's method vs CE only: +0.79 points (one seed: no spread to judge it by)"
    ]
    lines = protocol.comparisons([result("ce", [70.0, 72.0]), result("conkd_lion", [75.0])])
    assert lines == [
        "- the mission's method vs CE only: +4.00 points (larger than the seed spread, spread 1.41)"
    ]


def test_sweep_savings_count_ended_trials_only(tmp_path: Path) -> None:
    """Pruning savings compare the epochs ended trials ran with running them all to the end; a
    trial still running (2 epochs so far) must not read as a pruned one."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    s = protocol.Settings(name="t", out=tmp_path, trials=4, student_epochs=8)
    s.dir.mkdir(parents=True)
    study = optuna.create_study(study_name=s.study, storage=s.storage, direction="maximize")
    dist = {"loss.alpha": FloatDistribution(0.0, 1.0)}
    for state, epochs, value in ((TrialState.COMPLETE, 8, 70.0), (TrialState.PRUNED, 2, None)):
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params={"loss.alpha": 0.5}, distributions=dist,
            intermediate_values={e: 50.0 for e in range(epochs)}))  # fmt: skip
    running = study.ask()
    for e in range(2):
        running.report(40.0, e)
    lines = protocol.sweep_lines(s)
    assert lines[1] == "- epochs run: 10 of 16 (38% saved by pruning)"
    assert lines[2] == "- best val top-1 70.00 (trial 0): `loss.alpha=0.5`"


def test_recipe_rows_each_add_one_change_to_their_base_row() -> None:
    """Each recipe row is its base (the row before, or a named one) plus overrides of its own,
    and the write-up compares every row with its base."""
    rows = protocol.select(None, "recipes")
    by = {r.name: r for r in rows}
    assert rows == list(protocol.RECIPE_ROWS) and rows[0].overrides[0] == "experiment=teacher"
    bases = {r.name: protocol.RECIPE_BASES[r.name] for r in rows}
    assert bases["r1_ls"] == "r0_preset" and bases["r7_lion"] == "r4_ema"
    for row in rows[1:]:
        base = by[bases[row.name]]
        assert row.overrides[: len(base.overrides)] == base.overrides
        assert len(row.overrides) > len(base.overrides)
    assert by["r7_lion"].overrides[-1] == "optimizer=lion"
    assert "optimizer=sgd" not in by["r7_lion"].overrides
    assert all(r.trains_teacher and r.teacher is None and r.seeds == (0,) for r in rows)
    pairs = protocol.SUITES["recipes"].pairs
    assert [(a, b) for a, b, _ in pairs] == [(r.name, bases[r.name]) for r in rows[1:]]
    with pytest.raises(SystemExit, match="unknown row.*kd"):
        protocol.select("kd", "recipes")  # an ablation row is not a recipe row


def _flat(cfg: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_recipe_rows_compose_one_change_each_and_r0_is_the_old_preset() -> None:
    """Composed with the real configs, each row differs from its base in exactly the keys its
    change names, and r0 stays the old preset (pinned, whatever experiment=teacher sets now)."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_train

    cfgs = {
        r.name: _flat(OmegaConf.to_container(compose_train(list(r.overrides))))
        for r in protocol.RECIPE_ROWS
    }
    changed = {}
    for r in protocol.RECIPE_ROWS[1:]:
        a, b = cfgs[r.name], cfgs[protocol.RECIPE_BASES[r.name]]
        changed[r.name] = {k.split(".")[0] if k.startswith("optimizer.") else k
                           for k in a.keys() | b.keys() if a.get(k) != b.get(k)}  # fmt: skip
    assert changed == {
        "r1_ls": {"loss.label_smoothing"},
        "r2_zero_init": {"model.zero_init_residual"},
        "r3_flat_cos": {"scheduler.flat_fraction"},
        "r4_ema": {"trainer.ema_decay"},
        "r5_mix": {"dataset.mix.cutmix_alpha", "dataset.mix.mixup_alpha"},
        "r6_sgd": {"optimizer", "trainer.decay_norms_and_biases"},
        "r7_lion": {"optimizer"},
    }
    old = cfgs["r0_preset"]
    assert old["model.zero_init_residual"] is False and old["trainer.ema_decay"] is None
    assert (old["optimizer._target_"], old["optimizer.lr"]) == ("torch.optim.AdamW", 1e-3)
    assert "scheduler.flat_fraction" not in old and old["loss.label_smoothing"] == 0.0
    assert (old["dataset.mix.mixup_alpha"], old["dataset.mix.cutmix_alpha"]) == (0.0, 0.0)
    assert old["mlflow.register"] is None  # recipe rows register no teacher


@pytest.mark.parametrize(
    ("cuda", "caps", "expected"),
    [
        (False, {"avx2": True, "amx_bf16": False, "avx512_bf16": False}, "32"),
        (False, {"amx_bf16": True}, "bf16"),
        (False, {"avx512_bf16": True}, "bf16"),
        (True, {}, "bf16"),
    ],
)
def test_precision_auto_uses_bf16_only_where_it_is_native(
    monkeypatch, cuda: bool, caps: dict, expected: str
) -> None:
    """bf16 autocast is emulated on a CPU without AMX or AVX512-BF16 (7x slower than float32
    there): ``--precision auto`` then trains in float32, without channels_last."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert protocol.fast_precision() == expected
    s = protocol.settings(protocol.parse(["run", "--precision", "auto"]))
    args = protocol.common(s, protocol.BY_NAME["ce"], 0)
    assert f"trainer.precision={expected}" in args
    assert f"trainer.channels_last={str(expected == 'bf16').lower()}" in args
