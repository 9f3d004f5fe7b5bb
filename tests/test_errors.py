"""Bad input fails before training with one line that names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from conkd.checkpoint import load_checkpoint
from conkd.errors import ConKDError
from conkd.run import run
from tests.conftest import run_cli, tiny_overrides


def expect_error(compose_cfg, overrides: list[str], match: str) -> str:
    cfg = compose_cfg(overrides)
    with pytest.raises(ConKDError, match=match) as err:
        run(cfg)
    return str(err.value)


@pytest.fixture
def tiny(image_folder: Path, tmp_path: Path) -> list[str]:
    return tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("loss.kd_temperature=0", r"loss.kd_temperature must be > 0"),
        ("loss.supcon_temperature=-0.1", r"loss.supcon_temperature must be > 0"),
        ("loss.alpha=-0.5", r"loss.alpha must be >= 0"),
        ("loss.ce_weight=-1", r"loss.ce_weight must be >= 0"),
        ("optimizer.lr=0", r"optimizer.lr must be > 0"),
        ("optimizer.lr=-1e-4", r"optimizer.lr must be > 0"),
    ],
)
def test_bad_hyperparameters(compose_cfg, tiny, override: str, match: str) -> None:
    expect_error(compose_cfg, ["teacher_ckpt=/nonexistent.pt", override, *tiny], match)


def test_student_loss_without_teacher(compose_cfg, tiny) -> None:
    expect_error(compose_cfg, ["loss=lsd+supcon", "teacher_ckpt=null", *tiny], r"teacher_ckpt=PATH")


def test_auto_teacher_none_registered(compose_cfg, tiny) -> None:
    """The default teacher_ckpt=auto in a store with no teacher for this dataset."""
    msg = expect_error(compose_cfg, ["loss=lsd+supcon", *tiny], r"no teacher is registered")
    assert "experiment=teacher" in msg and "models:/conkd-teacher-data-" in msg


def test_auto_teacher_without_tracking(compose_cfg, tiny) -> None:
    expect_error(
        compose_cfg, ["loss=lsd+supcon", *tiny, "mlflow.enabled=false"], r"mlflow.enabled=false"
    )


def test_teacher_checkpoint_missing(compose_cfg, tiny, tmp_path: Path) -> None:
    msg = expect_error(compose_cfg, [f"teacher_ckpt={tmp_path}/nope.pt", *tiny], "does not exist")
    assert "nope.pt" in msg


def test_teacher_checkpoint_other_architecture(compose_cfg, tiny, teacher_run) -> None:
    ckpt = teacher_run / "checkpoints" / "best.pt"
    msg = expect_error(
        compose_cfg, [f"teacher_ckpt={ckpt}", "model@teacher=resnet34", *tiny], "arch"
    )
    assert "'resnet18'" in msg and "'resnet34'" in msg


def test_teacher_checkpoint_other_class_count(compose_cfg, tmp_path, teacher_run) -> None:
    ckpt = teacher_run / "checkpoints" / "best.pt"
    expect_error(
        compose_cfg,
        [
            f"teacher_ckpt={ckpt}",
            "model@teacher=resnet18",
            "dataset=digits",
            f"paths.output_dir={tmp_path}/run",
            "mlflow.enabled=false",
            "trainer.progress=false",
        ],
        r"num_classes=3.*num_classes=10",
    )


def test_dataset_root_missing_or_empty(compose_cfg, tiny, tmp_path: Path) -> None:
    expect_error(
        compose_cfg,
        ["stage=teacher", "loss=ce", *tiny, f"dataset.root={tmp_path}/absent"],
        "does not exist",
    )
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    expect_error(
        compose_cfg,
        ["stage=teacher", "loss=ce", *tiny, f"dataset.root={tmp_path}/empty"],
        "empty or incomplete",
    )


def test_unreadable_image_is_named(compose_cfg, tiny, image_folder: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(image_folder, copy)
    bad = copy / "train" / "class_1" / "broken.png"
    bad.write_bytes(b"this is not a png")
    msg = expect_error(
        compose_cfg,
        ["stage=teacher", "loss=ce", *tiny, f"dataset.root={copy}"],
        "cannot read image",
    )
    assert str(bad) in msg


def test_failed_run_keeps_earlier_checkpoints(compose_cfg, tiny, teacher_run) -> None:
    best = teacher_run / "checkpoints" / "best.pt"
    before = best.read_bytes()
    expect_error(
        compose_cfg,
        ["stage=teacher", "loss=ce", *tiny, f"paths.output_dir={teacher_run}"],
        "holds a finished run",
    )
    assert best.read_bytes() == before
    assert load_checkpoint(best)["stage"] == "teacher"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["loss=nope"], "Could not find 'loss/nope'"),
        (["experiment=teacher", "loss.label_smoothing=-1"], "label_smoothing"),
        (
            ["dataset=imagefolder", "dataset.root=/definitely/not/here", "experiment=teacher"],
            "dataset root /definitely/not/here does not exist",
        ),
    ],
)
def test_cli_prints_one_line_without_traceback(args: list[str], needle: str, tmp_path) -> None:
    res = run_cli("train.py", *args, "mlflow.enabled=false", f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
