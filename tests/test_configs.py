"""Every option of every config group composes and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conkd.builders import model_spec, run_name
from conkd.data import DataModule
from conkd.losses import Objective
from conkd.models import Network
from conkd.targets import build
from tests.conftest import ROOT
from tests.test_data import write_fake_imagenette


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def test_groups_are_discovered() -> None:
    assert {"lsd+supcon", "lsd", "supcon", "ce", "kd"} <= set(options("loss"))
    assert {"lion", "adamw", "sgd"} <= set(options("optimizer"))
    assert {"teacher", "conkd_lion"} <= set(options("experiment"))


@pytest.mark.parametrize("name", options("loss"))
def test_loss_options(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"loss={name}"])
    objective = Objective(build(cfg.loss.terms, "loss config"))
    assert cfg.loss.name == name
    b = 6
    student = {
        "logits": torch.randn(b, 3),
        "embedding": torch.randn(b, 8),
        "projection": torch.randn(b, 8),
    }
    out = objective(student, student, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("name", options("optimizer"))
@pytest.mark.parametrize("sched", options("scheduler"))
def test_optimizer_and_scheduler_options(compose_cfg, name: str, sched: str) -> None:
    cfg = compose_cfg([f"optimizer={name}", f"scheduler={sched}"])
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = build(cfg.optimizer, "optimizer config")(params)
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    if cfg.scheduler is None:
        assert sched == "none"
        return
    scheduler = build(cfg.scheduler, "scheduler config")(opt, total_steps=20)
    lrs = []
    for _ in range(20):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(cfg.optimizer.lr, rel=0.05)  # warmup reaches the base lr
    assert lrs[-1] < 0.05 * cfg.optimizer.lr  # and cosine decays it


@pytest.mark.parametrize("name", options("model"))
def test_model_options(compose_cfg, name: str) -> None:
    extra = ["model.arch=mobilenet_v3_small"] if name == "torchvision" else []
    cfg = compose_cfg([f"model={name}", *extra])
    net = build(model_spec(cfg.model, num_classes=7, image_size=32), "model config")
    assert isinstance(net, Network)
    net.eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 7)
    assert out["projection"].shape == (2, 128)
    torch.testing.assert_close(out["projection"].norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options(compose_cfg, image_folder: Path, tmp_path: Path, name: str) -> None:
    extra = {
        "imagefolder": [f"dataset.root={image_folder}", "dataset.batch_size=8"],
        "imagenette": [
            f"dataset.root={write_fake_imagenette(tmp_path)}",
            "dataset.source.download=false",
            "dataset.batch_size=8",
        ],
        "digits": [],
    }[name]
    cfg = compose_cfg([f"dataset={name}", "dataset.image_size=24", "dataset.num_workers=0", *extra])
    data = build(cfg.dataset, "dataset config", seed=0)
    assert isinstance(data, DataModule)
    x, y, i = next(iter(data.loaders().train(0)))
    assert x.shape[1:] == (3, 24, 24) and y.max() < data.num_classes


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_presets(compose_cfg, name: str) -> None:
    cfg = compose_cfg([f"experiment={name}"])
    assert cfg.stage in ("teacher", "student", "probe")
    objective = Objective(build(cfg.loss.terms, "loss config"))
    assert objective.needs_teacher == (cfg.stage == "student")
    assert run_name(cfg)
    if name == "conkd_lion":
        assert cfg.loss.name == "lsd+supcon" and "Lion" in cfg.optimizer._target_
        assert cfg.model.arch == "resnet18" and cfg.teacher.arch == "resnet101"
    if name == "teacher":
        assert cfg.model.arch == "resnet101" and cfg.loss.name == "ce"


def test_mission_command_line_composes(compose_cfg) -> None:
    cfg = compose_cfg(["loss=lsd+supcon", "optimizer=lion", "model@teacher=resnet50"])
    assert cfg.loss.alpha == 0.15 and cfg.loss.terms.supcon.weight == 0.15
    assert cfg.teacher.arch == "resnet50"
    cfg = compose_cfg(["loss=lsd+supcon", "loss.alpha=0.4", "loss.kd_temperature=3"])
    assert cfg.loss.terms.supcon.weight == 0.4
    assert cfg.loss.terms.kd.loss.temperature == 3


@pytest.mark.parametrize("name", options("hparams_search"))
def test_hparams_search_presets(name: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf")):
        cfg = compose("train", overrides=[f"hparams_search={name}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("ConKDOptunaSweeper")
    assert sweeper.direction == "maximize" and cfg.objective_mode == "max"
    assert sweeper.storage.startswith(f"sqlite:///{ROOT}/")  # absolute: resumable from anywhere
    assert sweeper.sampler.seed == 0 and sweeper.pruner._target_.endswith("MedianPruner")
    assert "optimizer.lr" in sweeper.params and sweeper.study_name.endswith("_digits")
    expected_opt = "AdamW" if name == "conkd_adamw" else "Lion"
    assert expected_opt in cfg.optimizer._target_


def test_precision_typed_as_a_number_is_accepted(compose_cfg) -> None:
    """`trainer.precision=32` reaches the config as an int; it means the same as "32"."""
    from conkd.checks import check_config
    from conkd.errors import ConKDError

    check_config(compose_cfg(["trainer.precision=32"]))
    with pytest.raises(ConKDError, match="trainer.precision must be 32 or bf16, got '16'"):
        check_config(compose_cfg(["trainer.precision=16"]))
