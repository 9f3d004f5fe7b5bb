"""End-to-end runs on a generated class-folder dataset at 32 px: teacher -> student -> probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conkd.checkpoint import build_from_checkpoint, load_checkpoint
from conkd.run import run
from tests.conftest import run_cli, tiny_overrides


def test_teacher_run_writes_checkpoints(teacher_run: Path) -> None:
    ckpt = load_checkpoint(teacher_run / "checkpoints" / "best.pt")
    assert ckpt["model"]["arch"] == "resnet18" and ckpt["model"]["num_classes"] == 3
    assert ckpt["stage"] == "teacher" and ckpt["classes"] == ["class_0", "class_1", "class_2"]
    assert (teacher_run / "checkpoints" / "last.pt").is_file()
    metrics = json.loads((teacher_run / "metrics.json").read_text())
    assert {"test/top1", "test/top5", "best/val/top1"} <= set(metrics)
    for name in ("learning_curves.png", "confusion_matrix.png", "config.yaml", "per_class.txt"):
        assert (teacher_run / name).is_file()
    net = build_from_checkpoint(ckpt).eval()
    assert net(torch.randn(1, 3, 32, 32))["logits"].shape == (1, 3)


def test_student_distils_from_teacher_checkpoint(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path, monkeypatch
) -> None:
    import conkd.teacher as teacher_module

    loaded = []
    real = teacher_module.online_teacher
    monkeypatch.setattr(teacher_module, "online_teacher", lambda t: loaded.append(t) or real(t))
    cfg = compose_cfg(
        [
            "loss=lsd+supcon",
            "optimizer=lion",
            "model@teacher=resnet18",
            f"teacher_ckpt={teacher_run / 'checkpoints' / 'best.pt'}",
            "teacher_cache.enabled=false",  # the online teacher, to inspect it afterwards
            *tiny_overrides(image_folder, tmp_path / "student", tmp_path / "mlruns"),
        ]
    )
    value = run(cfg)
    (teacher,) = loaded
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the teacher stayed frozen: its weights equal the checkpoint's
    ref = load_checkpoint(teacher_run / "checkpoints" / "best.pt")["state_dict"]
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    ckpt = load_checkpoint(tmp_path / "student" / "checkpoints" / "best.pt")
    assert ckpt["stage"] == "student" and ckpt["config"]["teacher_ckpt"].endswith("best.pt")
    assert ckpt["metrics"]["val/top1"] == pytest.approx(value)
    for term in ("ce", "kd", "supcon", "loss"):
        assert f"train/{term}" in ckpt["metrics"]


def test_same_seed_same_metrics(compose_cfg, image_folder: Path, tmp_path: Path) -> None:
    results = []
    for i in range(2):
        cfg = compose_cfg(
            [
                "loss=supcon",
                "stage=teacher",
                "optimizer=lion",
                *tiny_overrides(image_folder, tmp_path / f"r{i}", tmp_path / "mlruns"),
                "mlflow.enabled=false",
            ]
        )
        run(cfg)
        results.append(load_checkpoint(tmp_path / f"r{i}" / "checkpoints" / "last.pt"))

    def stable(metrics: dict) -> dict:  # wall-clock figures differ run to run
        return {k: v for k, v in metrics.items() if "time" not in k and "throughput" not in k}

    assert stable(results[0]["metrics"]) == stable(results[1]["metrics"])
    for k, v in results[0]["state_dict"].items():
        torch.testing.assert_close(v, results[1]["state_dict"][k])


def test_probe_stage_trains_only_the_head(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path
) -> None:
    backbone = teacher_run / "checkpoints" / "best.pt"
    cfg = compose_cfg(
        [
            "experiment=notebook_probe",
            f"probe.checkpoint={backbone}",
            *tiny_overrides(image_folder, tmp_path / "probe", tmp_path / "mlruns"),
        ]
    )
    run(cfg)
    ckpt = load_checkpoint(tmp_path / "probe" / "checkpoints" / "last.pt")
    before = load_checkpoint(backbone)["state_dict"]
    for k, v in before.items():  # backbone, BN statistics included, untouched
        torch.testing.assert_close(ckpt["state_dict"][f"network.{k}"], v)
    probe = build_from_checkpoint(ckpt).eval()
    assert probe(torch.randn(2, 3, 32, 32))["logits"].shape == (2, 3)


def test_cli_teacher_then_eval(image_folder: Path, teacher_run: Path, tmp_path: Path) -> None:
    res = run_cli(
        "eval.py",
        f"ckpt_path={teacher_run / 'checkpoints' / 'best.pt'}",
        "dataset=imagefolder",
        f"dataset.root={image_folder}",
        "dataset.num_workers=0",
        "dataset.batch_size=4",
        f"hydra.run.dir={tmp_path / 'eval'}",
        "trainer.progress=false",
    )
    assert res.returncode == 0, res.stderr
    assert "top1" in res.stdout and "class_2" in res.stdout
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    ckpt_metrics = json.loads((teacher_run / "metrics.json").read_text())
    assert result["test/top1"] == pytest.approx(ckpt_metrics["test/top1"])


def test_bf16_autocast_and_channels_last_run(compose_cfg, image_folder: Path, tmp_path: Path):
    cfg = compose_cfg(
        [
            "stage=teacher",
            "loss=supcon",
            "trainer.precision=bf16",
            "trainer.channels_last=true",
            *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns"),
            "mlflow.enabled=false",
            "trainer.epochs=1",
        ]
    )
    value = run(cfg)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["metrics"]
    assert value == best["val/top1"]
    # loss=supcon: ce_weight * CE + alpha * SupCon, with both weights 1.0
    assert best["train/loss"] == pytest.approx(best["train/ce"] + best["train/supcon"], rel=1e-5)


def test_pretrained_weights_unreachable_is_clear(monkeypatch, tmp_path: Path) -> None:
    import urllib.error

    from conkd.errors import ConKDError
    from conkd.models import Network

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    with pytest.raises(ConKDError, match="model.pretrained=false") as err:
        Network("resnet18", num_classes=10, pretrained=True)
    assert "resnet18-" in str(err.value) and str(tmp_path) in str(err.value)


def test_notebook_student_distils_projections(
    compose_cfg, image_folder: Path, teacher_run: Path, tmp_path: Path
) -> None:
    """The original notebooks' pipeline is a config: projection-level LS-KD + 0.15 SupCon,
    no CE, checkpoint chosen by the lowest validation loss."""
    cfg = compose_cfg([
        "experiment=notebook_student", "model@teacher=resnet18",
        f"teacher_ckpt={teacher_run / 'checkpoints' / 'best.pt'}",
        *tiny_overrides(image_folder, tmp_path / "run", tmp_path / "mlruns"),
    ])  # fmt: skip
    assert cfg.loss.terms.kd.input == "projection" and cfg.loss.ce_weight == 0.0
    value = run(cfg)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["metrics"]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["metrics"]
    assert value == pytest.approx(best["val/loss"]) and best["val/loss"] <= last["val/loss"]
    assert best["train/loss"] == pytest.approx(best["train/kd"] + 0.15 * best["train/supcon"])
