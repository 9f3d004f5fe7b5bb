"""Teacher-output cache through whole runs: exact replay of the online teacher, reuse without
the teacher, the sweep warning. The cache module itself: tests/test_teacher_cache.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import conkd.run as run_module
import conkd.teacher as teacher_module
from conkd.checkpoint import load_checkpoint
from conkd.hydra_callback import warn_cache_key_sweep
from conkd.provenance import varying_cache_fields
from tests.conftest import tiny_overrides


def student(compose_cfg, image_folder: Path, teacher_run: Path, out: Path, *extra: str):
    cfg = compose_cfg(
        [
            "loss=lsd+supcon",
            "optimizer=lion",
            "model@teacher=resnet18",
            f"teacher_ckpt={teacher_run / 'checkpoints' / 'best.pt'}",
            *tiny_overrides(image_folder, out, out.parent / "mlruns"),
            f"paths.cache_dir={out.parent / 'cache'}",
            "mlflow.enabled=false",
            *extra,
        ]
    )
    run_module.run(cfg)
    return load_checkpoint(out / "checkpoints" / "last.pt")


def test_cached_teacher_trains_the_student_like_the_online_one(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path, monkeypatch
) -> None:
    """The cache replays the online teacher's outputs for exactly the views the student sees:
    a run reading it is bit-identical to an online run whose outputs are rounded to the cache's
    float16, and its first step matches the plain online teacher within float16 tolerance."""
    sgd = ["optimizer=sgd", "optimizer.lr=0.002"]
    cached = student(compose_cfg, image_folder, teacher_run, tmp_path / "cached", *sgd)
    (folder,) = [p for p in (tmp_path / "cache" / "teacher").iterdir() if p.is_dir()]
    assert (folder / "train_logits.npy").is_file() and (folder / "val_logits.npy").is_file()
    assert not (folder / "train_projection.npy").exists()  # lsd+supcon reads teacher logits only

    real = teacher_module.online_teacher

    def rounded(teacher):
        outputs = real(teacher)
        return lambda x, e, i: {k: v.half().float() for k, v in outputs(x, e, i).items()}

    monkeypatch.setattr(teacher_module, "online_teacher", rounded)
    online = student(
        compose_cfg,
        image_folder,
        teacher_run,
        tmp_path / "online",
        *sgd,
        "teacher_cache.enabled=false",
    )
    for key in ("train/kd", "train/supcon", "train/ce", "train/loss", "val/kd", "val/loss"):
        assert cached["metrics"][key] == online["metrics"][key]
    for name, weight in online["state_dict"].items():
        assert torch.equal(cached["state_dict"][name], weight), name
    # one step against the unrounded online teacher: the same loss terms up to float16
    monkeypatch.setattr(teacher_module, "online_teacher", real)
    one = ["trainer.epochs=1", "trainer.max_steps_per_epoch=1", *sgd]
    a = student(compose_cfg, image_folder, teacher_run, tmp_path / "a", *one)
    b = student(
        compose_cfg,
        image_folder,
        teacher_run,
        tmp_path / "b",
        *one,
        "teacher_cache.enabled=false",
    )
    for key in ("train/kd", "train/loss", "val/kd"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-3, abs=1e-4)
    assert a["metrics"]["train/ce"] == b["metrics"]["train/ce"]  # no teacher in CE


def test_resident_data_and_cache_train_the_same_student(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path, monkeypatch
) -> None:
    """The device-resident path (the CPU as the device): decoded arrays and teacher cache copied
    into memory once and gathered by index give a bit-identical student."""
    from conkd.teacher_cache import TeacherCache

    mapped = student(compose_cfg, image_folder, teacher_run, tmp_path / "mapped",
                     "dataset.decode.resident=false", "teacher_cache.resident=false")  # fmt: skip
    moved: list = []
    real = TeacherCache.to_device
    monkeypatch.setattr(TeacherCache, "to_device", lambda c, d: (moved.append(d), real(c, d)))
    resident = student(compose_cfg, image_folder, teacher_run, tmp_path / "resident",
                       "dataset.decode.resident=true", "teacher_cache.resident=true")  # fmt: skip
    assert moved == [torch.device("cpu")]
    for key in ("train/kd", "train/supcon", "train/loss", "val/kd", "val/top1"):
        assert resident["metrics"][key] == mapped["metrics"][key], key
    for name, weight in mapped["state_dict"].items():
        assert torch.equal(resident["state_dict"][name], weight), name


def test_reused_cache_never_loads_the_teacher(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path, monkeypatch
) -> None:
    student(compose_cfg, image_folder, teacher_run, tmp_path / "first")

    def no_network(*args):
        raise AssertionError("the teacher network was built although its cache exists")

    monkeypatch.setattr(teacher_module, "build_teacher", no_network)
    student(compose_cfg, image_folder, teacher_run, tmp_path / "second", "loss.alpha=0.5")
    with pytest.raises(AssertionError, match="teacher network was built"):
        student(compose_cfg, image_folder, teacher_run, tmp_path / "third", "seed=1")


def test_sweeps_are_told_which_swept_keys_split_the_cache() -> None:
    swept = ["loss.alpha", "seed", "optimizer.lr", "dataset.image_size", "dataset.num_workers"]
    assert varying_cache_fields(swept) == ["dataset.image_size", "seed"]
    assert varying_cache_fields(["loss.kd_temperature", "optimizer.weight_decay"]) == []


@pytest.mark.parametrize(
    ("swept", "splits"),
    [
        ("dataset.decode.workers=1,2", False),  # decoding processes: the same arrays
        ("dataset.source.verify=true,false", False),  # a check before training
        ("dataset.num_workers=0,2", False),
        ("dataset.augment.scale_min=0.2,0.5", True),  # other views: other teacher outputs
        ("model@teacher=resnet18,resnet34", True),
    ],
)
def test_sweep_warning_names_only_keys_that_split_the_cache(
    compose_cfg, caplog, swept: str, splits: bool
) -> None:
    cfg = compose_cfg(["dataset=imagefolder", "dataset.root=/data"], keep_hydra=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, swept]
    with caplog.at_level(logging.WARNING, logger="conkd"):
        warn_cache_key_sweep(cfg)
    key = swept.partition("=")[0]
    assert ("each value builds its own cache" in caplog.text) == splits
    assert (key in caplog.text) == splits


def test_consistent_mixup_cache_replays_the_online_teacher_on_mixed_views(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path, monkeypatch
) -> None:
    """Function matching: with mixing on, the cache stores the teacher's outputs on exactly the
    mixed images the student sees, so a student reading it trains bit-identically to one whose
    online teacher sees those mixed images (outputs rounded to the cache's float16), and one step
    matches the plain online teacher within float16 tolerance. The mixing settings are part of
    the cache's key: other settings build another cache."""
    mixing = ["optimizer=sgd", "optimizer.lr=0.002", "dataset.mix.mixup_alpha=0.4",
              "dataset.mix.cutmix_alpha=1.0"]  # fmt: skip
    cached = student(compose_cfg, image_folder, teacher_run, tmp_path / "cached", *mixing)
    real = teacher_module.online_teacher

    def rounded(teacher):
        outputs = real(teacher)
        return lambda x, e, i: {k: v.half().float() for k, v in outputs(x, e, i).items()}

    monkeypatch.setattr(teacher_module, "online_teacher", rounded)
    online = student(compose_cfg, image_folder, teacher_run, tmp_path / "online", *mixing,
                     "teacher_cache.enabled=false")  # fmt: skip
    for key in ("train/kd", "train/supcon", "train/ce", "train/loss", "val/kd"):
        assert cached["metrics"][key] == online["metrics"][key], key
    for name, weight in online["state_dict"].items():
        assert torch.equal(cached["state_dict"][name], weight), name
    monkeypatch.setattr(teacher_module, "online_teacher", real)
    one = ["trainer.epochs=1", "trainer.max_steps_per_epoch=1", *mixing]
    a = student(compose_cfg, image_folder, teacher_run, tmp_path / "a", *one)
    b = student(compose_cfg, image_folder, teacher_run, tmp_path / "b", *one,
                "teacher_cache.enabled=false")  # fmt: skip
    for key in ("train/kd", "train/loss"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-3, abs=1e-4)
    # without mixing the teacher's KD term is another number: the cache did mix
    plain = student(compose_cfg, image_folder, teacher_run, tmp_path / "plain",
                    *one[:-2], "optimizer=sgd", "optimizer.lr=0.002")  # fmt: skip
    assert plain["metrics"]["train/kd"] != pytest.approx(a["metrics"]["train/kd"], rel=1e-3)
    folders = {p.name for p in (tmp_path / "cache" / "teacher").iterdir() if p.is_dir()}
    student(compose_cfg, image_folder, teacher_run, tmp_path / "other", *mixing,
            "dataset.mix.mixup_alpha=0.8")  # fmt: skip
    assert len({p.name for p in (tmp_path / "cache" / "teacher").iterdir() if p.is_dir()}) == (
        len(folders) + 1
    )
