"""Shared fixtures: the real configs composed for tiny runs, and a generated image dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
os.environ.setdefault("CONKD_ROOT", str(ROOT))
# Hydra's deprecations (an instantiate without execution whitelist, version_base, ...) are
# errors in every test and in every command a test starts: the suite fails if our code or
# configs rely on anything Hydra 1.5 removes.
os.environ["HYDRA_DEPRECATION_WARNINGS_AS_ERRORS"] = "1"

CLASS_COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


def write_image_folder(root: Path, per_class_train: int = 12, per_class_val: int = 4) -> Path:
    """A learnable 3-class class-folder dataset: coloured squares with noise, 40x40 PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c, color in enumerate(CLASS_COLORS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 60, (40, 40, 3)).astype(np.uint8)
                x0, y0 = rng.integers(0, 16, 2)
                img[y0 : y0 + 24, x0 : x0 + 24] = color
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tiny") / "data")


def tiny_overrides(data_root: Path, out_dir: Path, store: Path) -> list[str]:
    """Overrides for a run of a few steps at 32 px on the generated dataset."""
    return [
        "dataset=imagefolder",
        f"dataset.root={data_root}",
        "dataset.image_size=32",
        "dataset.batch_size=8",
        "dataset.eval_batch_size=16",
        "dataset.num_workers=0",
        "dataset.val_fraction=0.2",
        "model.small_stem=false",
        "teacher.small_stem=false",
        "trainer.epochs=2",
        "trainer.max_steps_per_epoch=3",
        "trainer.progress=false",
        "mlflow.log_model=false",
        f"paths.output_dir={out_dir}",
        f"paths.cache_dir={store.parent / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{store}/mlflow.db",
    ]


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose conf/<config_name>.yaml with overrides, as Hydra would for a run."""

    def _compose(
        overrides: list[str], config_name: str = "train", keep_hydra: bool = False
    ) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(ROOT / "conf")):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        if not keep_hydra:
            with open_dict(cfg):
                del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command-line entry point (train.py / eval.py) the way a user does."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=600,
    )


def run_workers(args: list[str], n: int = 2) -> list[str]:
    """Start ``n`` sweep workers with the same command at once (as on ``n`` machines); waits for
    all, asserts each succeeded and returns their outputs."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    workers = [
        subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(n)
    ]  # fmt: skip
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]
    return outputs


def compose_train(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml outside a fixture (for session-scoped fixtures)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="session")
def teacher_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 'teacher' trained with CE for a few steps, shared by the whole session."""
    from conkd.run import run

    out = tmp_path_factory.mktemp("teacher")
    cfg = compose_train(
        [
            "experiment=teacher",
            "model=resnet18",
            "mlflow.register=null",
            *tiny_overrides(image_folder, out / "run", out / "mlruns"),
        ]
    )
    value = run(cfg)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert value == metrics["objective"] == metrics["best/val/top1"]
    return out / "run"
