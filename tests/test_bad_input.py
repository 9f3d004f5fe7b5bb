"""Bad input is stopped early and named: typed config at compose time, broken data before
training, non-finite inputs at the batch that carries them, crafted checkpoints on load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from conkd.checkpoint import instantiate_model
from conkd.checks import check_range
from conkd.errors import ConKDError, DivergedError
from conkd.run import run
from tests.conftest import run_cli, tiny_overrides


@pytest.fixture
def tiny(image_folder: Path, tmp_path: Path) -> list[str]:
    return ["stage=teacher", "loss=ce", "teacher_ckpt=null",
            *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns")]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "key", "why"),
    [
        ("loss.alpha=abc", "loss.alpha", "could not be converted to Float"),
        ("trainer.epochs=many", "trainer.epochs", "could not be converted to Integer"),
        (
            "stage=teach",
            "stage",
            "Invalid value 'teach', expected one of [teacher, student, probe]",
        ),
        ("objective_mode=maximum", "objective_mode", "expected one of [max, min]"),
        ("trainer.channels_last=maybe", "trainer.channels_last", "is not a valid bool"),
    ],
)
def test_wrong_types_fail_at_compose_time_naming_the_key(
    compose_cfg, override: str, key: str, why: str
) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override])
    cause = str(err.value.__cause__)
    assert why in cause and f"full_key: {key}" in cause


def test_wrong_type_on_the_command_line_is_one_message(tmp_path: Path) -> None:
    res = run_cli("train.py", "loss.alpha=abc", f"hydra.run.dir={tmp_path}")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "full_key: loss.alpha" in res.stderr


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optimizer.lr=fast", r"optimizer.lr must be a number, got 'fast' \(str\)"),
        ("dataset.batch_size=1", r"dataset.batch_size must be >= 2, got 1"),
        ("dataset.val_fraction=1.0", r"dataset.val_fraction must be in \(0, 1\), got 1.0"),
        (
            "trainer.checkpoint_background=maybe",
            "trainer.checkpoint_background must be auto, true or false, got 'maybe'",
        ),
    ],
)
def test_untyped_constructor_arguments_are_checked_by_name(
    compose_cfg, tiny, override: str, match: str
) -> None:
    with pytest.raises(ConKDError, match=match):
        run(compose_cfg([*tiny, override]))


@pytest.mark.parametrize(
    ("name", "ok", "bad", "rule"),
    [
        ("dataset.batch_size", 2, 1, ">= 2"),
        ("dataset.image_size", 8, 7, ">= 8"),
        ("optimizer.lr", 1e-9, 0, "> 0"),
        ("dataset.val_fraction", 0.5, 0, r"in \(0, 1\)"),
        ("dataset.val_fraction", 0.99, 1, r"in \(0, 1\)"),
    ],
)
def test_range_rules_hold_for_constructor_arguments_too(
    name: str, ok: float, bad: float, rule: str
) -> None:
    """The rules the config check applies, as the constructors that take the numbers call them
    (``DataModule(batch_size=1)`` from Python is refused with the config key's message)."""
    check_range(name, ok)
    with pytest.raises(ConKDError, match=f"{name} must be {rule}, got {bad}"):
        check_range(name, bad)
    with pytest.raises(ConKDError, match=f"{name} must be a number, got True"):
        check_range(name, True)


def copy_folder(image_folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(image_folder, copy)
    return copy


def test_truncated_image_is_named(compose_cfg, tiny, image_folder: Path, tmp_path: Path) -> None:
    data = copy_folder(image_folder, tmp_path)
    bad = data / "train" / "class_0" / "0.png"
    bad.write_bytes(bad.read_bytes()[:200])  # a valid header, cut off
    with pytest.raises(ConKDError, match="cannot read image") as err:
        run(compose_cfg([*tiny, f"dataset.root={data}", "dataset.source.verify=false"]))
    assert str(bad) in str(err.value)


def test_skip_bad_images_skips_and_counts(
    compose_cfg, tiny, image_folder: Path, tmp_path: Path, caplog
) -> None:
    data = copy_folder(image_folder, tmp_path)
    (data / "train" / "class_0" / "0.png").write_bytes(b"not an image")
    truncated = data / "val" / "class_2" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    run(compose_cfg([*tiny, f"dataset.root={data}", "dataset.source.skip_bad_images=true",
                     "trainer.epochs=1", "mlflow.enabled=false"]))  # fmt: skip
    assert "skipped 1 of 36 images" in caplog.text and "skipped 1 of 12 images" in caplog.text
    assert str(truncated) in caplog.text


def test_non_image_files_are_ignored(compose_cfg, tiny, image_folder: Path, tmp_path) -> None:
    data = copy_folder(image_folder, tmp_path)
    (data / "train" / "class_1" / "notes.txt").write_text("not an image, not an image name")
    (data / "train" / ".DS_Store").write_bytes(b"\0\1")
    value = run(compose_cfg([*tiny, f"dataset.root={data}", "trainer.epochs=1",
                             "mlflow.enabled=false"]))  # fmt: skip
    assert isinstance(value, float)


def test_empty_class_folder(compose_cfg, tiny, image_folder: Path, tmp_path: Path) -> None:
    data = copy_folder(image_folder, tmp_path)
    (data / "train" / "class_3").mkdir()
    (data / "val" / "class_3").mkdir()
    with pytest.raises(ConKDError, match="class_3"):
        run(compose_cfg([*tiny, f"dataset.root={data}"]))


def test_one_class_dataset(compose_cfg, tiny, image_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(image_folder / split / "class_0", data / split / "class_0")
    with pytest.raises(ConKDError, match=r"1 class \(class_0\); classification needs at least 2"):
        run(compose_cfg([*tiny, f"dataset.root={data}"]))


def test_nan_input_is_named(compose_cfg, tiny, monkeypatch) -> None:
    import conkd.loaders as loaders

    real = loaders.render

    def poisoned(spec, *args, **kwargs):
        x = real(spec, *args, **kwargs)
        if spec.train:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(loaders, "render", poisoned)
    with pytest.raises(DivergedError, match=r"input batch at epoch 0 batch 0 holds 1 NaN/Inf"):
        run(compose_cfg([*tiny, "mlflow.enabled=false"]))


def test_checkpoint_cannot_name_an_arbitrary_callable() -> None:
    spec = {"_target_": "os.system", "command": "echo pwned"}
    with pytest.raises(ConKDError, match="invalid model spec: Target 'os.system' cannot be"):
        instantiate_model(spec)
    nested = {"_target_": "conkd.models.Network", "arch": {"_target_": "builtins.eval"}}
    with pytest.raises(ConKDError, match="'builtins.eval' cannot be authorized.* full_key: arch"):
        instantiate_model(nested)
    # a harmless class that is not a network is refused too: the list is conkd.models.*
    with pytest.raises(ConKDError, match="'collections.OrderedDict' is not in the Hydra execution"):
        instantiate_model({"_target_": "collections.OrderedDict"})
    head = {"_target_": "conkd.models.linear_head", "embedding_dim": 3, "num_classes": 2}
    assert isinstance(instantiate_model(head), torch.nn.Linear)


def test_grad_clip_bounds_the_gradient_norm(compose_cfg, tiny, tmp_path: Path) -> None:
    """With trainer.grad_clip, every step's gradient norm is at most the clip (far below the
    unclipped norm, which the second run shows, so the check fails without clipping)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms: list[float] = []

    def record(optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        quick = ["trainer.epochs=1", "mlflow.enabled=false"]
        run(compose_cfg([*tiny, *quick, "trainer.grad_clip=0.01"]))
        clipped = list(norms)
        norms.clear()
        run(compose_cfg([*tiny, *quick, f"paths.output_dir={tmp_path / 'noclip'}"]))
    finally:
        handle.remove()
    assert len(clipped) == 3 and max(clipped) <= 0.01 * (1 + 1e-5)
    assert min(norms) > 0.01
