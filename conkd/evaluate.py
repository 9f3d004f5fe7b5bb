"""Evaluation of a saved checkpoint on a dataset split (the ``eval.py`` command)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conkd import checkpoint as ckpt_io
from conkd import plots
from conkd.builders import resolve_device
from conkd.engine import evaluate
from conkd.errors import ConKDError
from conkd.targets import build

log = logging.getLogger("conkd")


def dataset_config(cfg: DictConfig, ckpt: Mapping[str, Any]) -> DictConfig:
    """The dataset to evaluate on: ``dataset=...`` when given, else the one stored in the
    checkpoint (the run's resolved config), optionally read from ``dataset_root``."""
    if cfg.get("dataset") is not None:
        return cfg.dataset
    stored = (ckpt.get("config") or {}).get("dataset")
    if not stored:
        raise ConKDError(
            f"checkpoint {cfg.ckpt_path} stores no dataset config; pass the dataset it was "
            "trained on, e.g. dataset=imagefolder dataset.root=PATH"
        )
    dataset = OmegaConf.create(stored)
    root = cfg.get("dataset_root") or dataset.get("root")
    if root and not Path(root).expanduser().is_absolute() and not Path(root).exists():
        root = str(Path(cfg.paths.root_dir) / root)  # relative to the project, as train.py ran
    if root:
        dataset.root = root
        if "root" in dataset.get("source", {}):
            dataset.source.root = root
    log.info("dataset: %s (stored in the checkpoint)", dataset.get("name"))
    return dataset


def evaluate_checkpoint(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None = None) -> dict:
    """Top-1/top-5 and per-class accuracy of ``cfg.ckpt_path`` on ``cfg.split``; writes
    ``eval.json``, ``per_class.txt`` and ``confusion_matrix.png`` to the output dir."""
    if cfg.split not in ("val", "test"):
        raise ConKDError(f"split must be val or test, got {cfg.split!r}")
    ckpt = ckpt_io.load_checkpoint(cfg.ckpt_path)
    model_cfg = ckpt["model"].get("network", ckpt["model"])
    dataset = dataset_config(cfg, ckpt)
    size = cfg.image_size or model_cfg.get("image_size") or dataset.get("image_size")
    data = build(dataset, "dataset config", seed=cfg.seed, image_size=size)
    if model_cfg.get("num_classes") != data.num_classes:
        raise ConKDError(
            f"checkpoint {cfg.ckpt_path} predicts {model_cfg.get('num_classes')} classes but "
            f"dataset {data.name} has {data.num_classes}; pass the dataset it was trained on"
        )
    device = resolve_device(cfg.trainer.device)
    model = ckpt_io.build_from_checkpoint(ckpt).to(device)
    metrics, confusion = evaluate(
        model,
        data.loaders(device).eval(cfg.split),
        device,
        data.num_classes,
        precision=str(cfg.trainer.precision),
        channels_last=cfg.trainer.channels_last,
        prefix=cfg.split,
        progress=cfg.trainer.progress,
    )
    table = plots.per_class_table(confusion, data.classes)
    print(
        f"{cfg.ckpt_path}\n{data.name} {cfg.split}: top1 {metrics[f'{cfg.split}/top1']:.2f}  "
        f"top5 {metrics[f'{cfg.split}/top5']:.2f}  ({int(confusion.sum())} images)\n{table}"
    )
    out_dir = Path(hydra_cfg["output_dir"]) if hydra_cfg else Path(cfg.paths.root_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "per_class.txt").write_text(table)
    plots.confusion_matrix(
        confusion,
        data.classes,
        out_dir / "confusion_matrix.png",
        f"{cfg.split} confusion, top-1 {metrics[f'{cfg.split}/top1']:.2f}%",
    )
    result = {"checkpoint": str(cfg.ckpt_path), "split": cfg.split, **metrics}
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result
