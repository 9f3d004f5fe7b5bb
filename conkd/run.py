"""One training run from a composed Hydra config: the only module that reads the config.

It validates the config, builds every object with :func:`hydra.utils.instantiate`, hands plain
objects to :func:`conkd.engine.fit`, tracks the run in MLflow and returns the objective for sweeps.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conkd import checkpoint as ckpt_io
from conkd import plots
from conkd.data import DataModule
from conkd.engine import evaluate, fit, freeze
from conkd.errors import ConKDError
from conkd.losses import Objective
from conkd.models import Probe, model_summary
from conkd.sweep import reporter_from_hydra
from conkd.tracking import (
    Tracker,
    fetch_registered_checkpoint,
    flatten,
    log_model,
    prepare_store,
    resolve_store,
    sweep_parent_run_id,
)

log = logging.getLogger("conkd")

STAGES = ("teacher", "student", "probe")


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with errors from constructors turned into one readable line."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConKDError(f"invalid {what} config: {cause}") from err


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConKDError(
            f"trainer.device={name} but CUDA is not available; use trainer.device=auto"
        )
    return torch.device(name)


def validate(cfg: DictConfig) -> None:
    """Checks that need no data or model, so bad input fails in milliseconds."""
    if cfg.stage not in STAGES:
        raise ConKDError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    for key, value in cfg.loss.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.endswith("temperature") and not value > 0:
            raise ConKDError(f"loss.{key} must be > 0, got {value}")
        if (key == "alpha" or key.endswith("weight")) and not value >= 0:
            raise ConKDError(f"loss.{key} must be >= 0, got {value}")
    lr = cfg.optimizer.get("lr")
    if lr is not None and not lr > 0:
        raise ConKDError(f"optimizer.lr must be > 0, got {lr}")
    if cfg.objective_mode not in ("max", "min"):
        raise ConKDError(f"objective_mode must be max or min, got {cfg.objective_mode!r}")
    if cfg.trainer.epochs < 1:
        raise ConKDError(f"trainer.epochs must be >= 1, got {cfg.trainer.epochs}")
    if cfg.trainer.precision not in ("32", "bf16"):
        raise ConKDError(f"trainer.precision must be 32 or bf16, got {cfg.trainer.precision!r}")


def model_spec(node: DictConfig, num_classes: int, image_size: int) -> dict[str, Any]:
    """The model's constructor as a plain ``_target_`` dict (stored in checkpoints)."""
    spec = OmegaConf.to_container(node, resolve=True)
    assert isinstance(spec, dict)
    spec.update(num_classes=num_classes, image_size=image_size)
    return spec


def load_teacher(
    cfg: DictConfig, data: DataModule, device: torch.device, tracking_uri: str
) -> tuple[nn.Module, dict[str, str]]:
    """The frozen teacher from ``teacher_ckpt`` (a path or ``models:/NAME@ALIAS``), checked
    against ``model@teacher``. Returns it with tags that say where it came from."""
    source = str(cfg.teacher_ckpt)
    tags = {"teacher": source}
    path = source
    if source.startswith("models:/"):
        fetched, run_id = fetch_registered_checkpoint(
            source, tracking_uri, Path(cfg.paths.output_dir) / "teacher"
        )
        path = str(fetched)
        tags["teacher.run_id"] = run_id
    ckpt = ckpt_io.load_checkpoint(path)
    if ckpt.get("run_id"):
        tags.setdefault("teacher.run_id", ckpt["run_id"])
    expected = model_spec(cfg.teacher, data.num_classes, data.image_size)
    ckpt_io.check_compatible(ckpt["model"], expected, "teacher", source)
    teacher = build(ckpt["model"], "teacher model")
    try:
        teacher.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ConKDError(f"teacher checkpoint {source} does not fit its model: {err}") from err
    return freeze(teacher.to(device)), tags


def build_model(cfg: DictConfig, data: DataModule) -> tuple[nn.Module, dict[str, Any]]:
    """The network this run trains, and its spec for the checkpoint."""
    if cfg.stage != "probe":
        spec = model_spec(cfg.model, data.num_classes, data.image_size)
        return build(spec, "model"), spec
    if not cfg.probe.checkpoint:
        raise ConKDError(
            "stage=probe needs probe.checkpoint=PATH (a student or teacher checkpoint)"
        )
    backbone = ckpt_io.load_checkpoint(cfg.probe.checkpoint)
    network = ckpt_io.build_from_checkpoint(backbone)
    head = OmegaConf.to_container(cfg.probe.head, resolve=True)
    head.update(embedding_dim=network.embedding_dim, num_classes=data.num_classes)
    spec = {"_target_": "conkd.models.Probe", "network": backbone["model"], "head": head}
    return Probe(network, build(head, "probe.head")), spec


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit or "unknown", "git.dirty": str(dirty).lower()}


def run_tags(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None) -> dict[str, str]:
    tags = {"stage": cfg.stage, "command": shlex.join(sys.argv)}
    tags.update(git_state(Path(cfg.paths.root_dir)))
    if hydra_cfg:
        tags["overrides"] = " ".join(hydra_cfg.get("overrides", []))
        if hydra_cfg.get("sweep_dir"):
            tags["sweep.id"] = str(hydra_cfg["sweep_dir"])
            trial = cfg.get("optuna", {}).get("trial")
            tags["sweep.trial"] = str(trial if trial is not None else hydra_cfg.get("job_num"))
    for k, v in (cfg.mlflow.get("tags") or {}).items():
        tags[k] = str(v)
    return tags


def run_name(cfg: DictConfig) -> str:
    """Readable default run name, e.g. ``resnet18<-resnet101 lsd+supcon lion``."""
    optimizer = cfg.optimizer._target_.rsplit(".", 1)[-1].lower()
    arch = cfg.model.get("arch", "?")
    who = {"teacher": f"teacher {arch}", "student": f"{arch}<-{cfg.teacher.arch}"}.get(
        cfg.stage, f"probe {Path(str(cfg.probe.checkpoint)).parent.parent.name}"
    )
    if cfg.stage == "student" and not cfg.teacher_ckpt:
        who = arch
    return f"{who} {cfg.loss.name} {optimizer}"


def run(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None = None) -> float:
    """Train, validate, test; returns ``cfg.objective`` of the best epoch (for sweeps).

    ``hydra_cfg`` carries the job's overrides and output dir when run under Hydra.
    """
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    out_dir = Path(cfg.paths.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if (ckpt_dir / "best.pt").exists() or (ckpt_dir / "last.pt").exists():
        raise ConKDError(
            f"{ckpt_dir} already holds checkpoints of an earlier run; choose another "
            "hydra.run.dir so they are not overwritten"
        )

    tracking_uri, artifact_location = resolve_store(cfg.paths.root_dir, cfg.mlflow.tracking_uri)
    if cfg.mlflow.enabled:
        prepare_store(tracking_uri)

    objective = Objective(build(cfg.loss.terms, "loss"))
    if objective.needs_teacher and cfg.stage != "student":
        raise ConKDError(f"loss={cfg.loss.name} distils from a teacher; use it in stage=student")
    if objective.needs_teacher and not cfg.teacher_ckpt:
        raise ConKDError(
            f"loss={cfg.loss.name} distils from a teacher: set teacher_ckpt=PATH to a checkpoint "
            "written by `python train.py experiment=teacher`"
        )

    data: DataModule = build(cfg.dataset, "dataset", seed=cfg.seed)
    model, spec = build_model(cfg, data)
    teacher, teacher_tags = None, {}
    if objective.needs_teacher:
        teacher, teacher_tags = load_teacher(cfg, data, device, tracking_uri)
    missing = objective.inputs - {"logits", "embedding"}
    if missing and getattr(model, "projector", None) is None:
        raise ConKDError(
            f"loss={cfg.loss.name} reads the projection, but the model has none; "
            "set model.projection_dim (e.g. 128)"
        )
    model = model.to(device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = build(cfg.optimizer, "optimizer")(params)
    except (ValueError, AssertionError) as err:
        raise ConKDError(f"invalid optimizer config: {err or 'assertion failed'}") from err
    steps_per_epoch = len(data.train) // data.batch_size
    if cfg.trainer.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.trainer.max_steps_per_epoch)
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = build(cfg.scheduler, "scheduler")(
            optimizer, total_steps=steps_per_epoch * cfg.trainer.epochs
        )

    tags = {**run_tags(cfg, hydra_cfg), **teacher_tags}
    tracker = Tracker(
        enabled=cfg.mlflow.enabled,
        tracking_uri=tracking_uri,
        experiment_name=cfg.mlflow.experiment_name,
        run_name=cfg.mlflow.run_name or run_name(cfg),
        artifact_location=artifact_location,
        parent_run_id=sweep_parent_run_id(hydra_cfg and hydra_cfg.get("sweep_dir")),
        tags=tags,
    )
    with tracker:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        tracker.log_params(flatten(resolved))
        tracker.log_params({f"model.{k}": v for k, v in model_summary(model).items()})
        tracker.log_params({f"data.{k}": v for k, v in data.describe().items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        log.info(
            "stage=%s model=%s teacher=%s loss=%s optimizer=%s device=%s data=%s",
            cfg.stage,
            spec.get("arch", "probe"),
            teacher_tags.get("teacher"),
            cfg.loss.name,
            cfg.optimizer._target_,
            device,
            data.describe(),
        )

        history: list[dict[str, float]] = []
        extra = {
            "classes": data.classes,
            "stage": cfg.stage,
            "config": resolved,
            "run_id": tracker.run_id,
        }

        reporter = reporter_from_hydra(cfg, hydra_cfg and hydra_cfg.get("sweeper"))

        def on_epoch_end(epoch: int, metrics: Mapping[str, float], is_best: bool) -> bool:
            history.append(dict(metrics))
            tracker.log_metrics(metrics, step=epoch)
            ckpt_io.save_checkpoint(
                ckpt_dir / "last.pt", model, spec, epoch=epoch, metrics=dict(metrics), **extra
            )
            if is_best:
                ckpt_io.save_checkpoint(
                    ckpt_dir / "best.pt", model, spec, epoch=epoch, metrics=dict(metrics), **extra
                )
            return reporter is not None and reporter.report(metrics[cfg.objective], epoch)

        best = fit(
            model,
            teacher,
            objective,
            data.train_loader,
            data.eval_loader("val"),
            optimizer,
            scheduler,
            device,
            cfg.trainer.epochs,
            data.num_classes,
            monitor=cfg.objective,
            mode=cfg.objective_mode,
            on_epoch_end=on_epoch_end,
            precision=cfg.trainer.precision,
            channels_last=cfg.trainer.channels_last,
            max_steps=cfg.trainer.max_steps_per_epoch,
            grad_clip=cfg.trainer.grad_clip,
            progress=cfg.trainer.progress,
            log=log.info,
        )

        # Test the best checkpoint, not the last epoch's weights.
        model.load_state_dict(ckpt_io.load_checkpoint(ckpt_dir / "best.pt")["state_dict"])
        test, confusion = evaluate(
            model,
            data.eval_loader("test"),
            device,
            data.num_classes,
            precision=cfg.trainer.precision,
            channels_last=cfg.trainer.channels_last,
            prefix="test",
            progress=cfg.trainer.progress,
        )
        value = float(best[cfg.objective])
        summary = {
            **test,
            "best/epoch": best["epoch"],
            f"best/{cfg.objective}": value,
            "objective": value,
        }
        if reporter is not None and reporter.pruned:
            tracker.set_tags({"pruned": "true"})
        tracker.log_metrics(summary, step=cfg.trainer.epochs)
        (out_dir / "metrics.json").write_text(
            json.dumps(
                {
                    "stage": cfg.stage,
                    "run_id": tracker.run_id,
                    "run_name": tracker.run_name,
                    **summary,
                },
                indent=2,
            )
        )
        (out_dir / "per_class.txt").write_text(plots.per_class_table(confusion, data.classes))
        plots.learning_curves(history, out_dir / "learning_curves.png")
        plots.confusion_matrix(
            confusion,
            data.classes,
            out_dir / "confusion_matrix.png",
            f"test confusion, top-1 {test['test/top1']:.2f}%",
        )
        for name in (
            "config.yaml",
            "metrics.json",
            "per_class.txt",
            "learning_curves.png",
            "confusion_matrix.png",
        ):
            tracker.log_artifact(out_dir / name)
        tracker.log_artifact(out_dir / ".hydra", "hydra")
        register = cfg.mlflow.register if cfg.stage == "teacher" else None
        if cfg.mlflow.log_checkpoint or register:
            tracker.log_artifact(ckpt_dir / "best.pt", "checkpoints")
        if cfg.mlflow.log_model or register:
            version = log_model(
                tracker, model.cpu(), register and register.name, register and register.alias
            )
            if version:
                log.info(
                    "registered models:/%s@%s (version %s)", register.name, register.alias, version
                )
        log.info(
            "done: best val top1 %.2f (epoch %d), test top1 %.2f top5 %.2f; checkpoints in %s",
            best["val/top1"],
            best["epoch"] + 1,
            test["test/top1"],
            test["test/top5"],
            ckpt_dir,
        )
    return value
