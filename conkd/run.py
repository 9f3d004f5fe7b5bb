"""One training run from a composed Hydra config: the only module that reads the config.

A run reads as a table of contents: :func:`setup` validates the config and builds every object
with :func:`hydra.utils.instantiate` into :class:`Parts`; :func:`conkd.engine.fit` trains them
with callbacks (MLflow metrics, checkpoints, the sweep's pruner); :func:`finish` tests the best
checkpoint, writes plots and artifacts and registers teachers. Returns the objective for sweeps.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from conkd import builders, checks, distributed, plots, resume, views
from conkd import checkpoint as ckpt_io
from conkd.callbacks import (
    Callback,
    CheckpointCallback,
    HeartbeatCallback,
    PruningCallback,
    SharedStop,
    TrackingCallback,
)
from conkd.checkpoint import LAST, Checkpointer, in_background
from conkd.data import DataModule
from conkd.engine import (
    Job,
    TrainState,
    evaluate,
    fit,
)
from conkd.loaders import Loaders
from conkd.models import model_summary
from conkd.nested import flatten
from conkd.optimizers import describe as describe_optimizer
from conkd.sweep import TrialReporter, reporter_from_hydra
from conkd.teacher import (
    AUTO,
    registry_name,
    teacher_function,
)
from conkd.tracking import (
    Tracker,
)

log = logging.getLogger("conkd")


@dataclass
class Parts:
    """What :func:`setup` builds from the config: plain objects, no config below this point."""

    job: Job
    data: DataModule
    loaders: Loaders
    spec: dict[str, Any]
    tracker: Tracker
    out_dir: Path
    reporter: TrialReporter | None
    teacher_tags: dict[str, str]
    setup_metrics: dict[str, float]
    resume_from: dict[str, Any] | None = None  # the checkpoint to continue, see conkd.resume
    ctx: distributed.Context = distributed.Context()  # torchrun rank / world

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def setup(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None) -> Parts:
    """Check the config, then build the parts in order: the process (torchrun rank, device),
    the output folder and the checkpoint to resume, the data, the networks and the teacher, the
    loop's job, the tracker and the sweep's reporter."""
    checks.check_config(cfg)
    builders.seed_everything(cfg.seed)
    ctx = distributed.from_env()
    device = distributed.setup(ctx, builders.resolve_device(cfg.trainer.device))
    builders.limit_gpu_memory(device, cfg.trainer.gpu_memory_fraction)
    builders.tune_convolutions(device, cfg.trainer.cudnn_benchmark)
    if not ctx.is_main:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the run
    # one output folder for all ranks: rank 0's (each rank's Hydra made its own)
    out_dir = Path(distributed.broadcast(str(cfg.paths.output_dir)))
    checkpoint, same_run = resume.find(str(cfg.resume), out_dir)
    store = builders.tracking_store(cfg)
    objective = builders.build_objective(cfg)
    data = builders.build_data(cfg)
    model, spec = builders.build_model(cfg, data, objective)
    teacher_fn, teacher_tags, cache_metrics = None, {}, {}
    if objective.needs_teacher:
        settings = builders.teacher_settings(cfg, data, store[0], hydra_cfg, ctx.world)
        teacher_fn, teacher_tags, cache_metrics = teacher_function(
            settings, data, objective.teacher_inputs, device
        )
    job = builders.build_job(cfg, data, model, objective, teacher_fn, device, ctx)
    if checkpoint is not None:
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        resume.check_same_run(checkpoint, resolved, teacher_tags)
    continued = checkpoint.get("run_id") if same_run and checkpoint else None
    tracker = builders.build_tracker(cfg, hydra_cfg, store, ctx, device, teacher_tags,
                                     objective.needs_teacher, continued, out_dir)  # fmt: skip
    reporter = reporter_from_hydra(cfg, hydra_cfg and hydra_cfg.get("sweeper"))
    return Parts(
        job, data, data.loaders(device, ctx.rank, ctx.world), spec, tracker, out_dir,
        reporter if ctx.is_main else None, teacher_tags, cache_metrics, checkpoint, ctx,
    )  # fmt: skip


def record_start(cfg: DictConfig, parts: Parts) -> dict[str, Any]:
    """Params, dataset input and ``config.yaml`` of a started run; returns the resolved config."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(resolved, dict)
    tracker, data = parts.tracker, parts.data
    if parts.reporter is not None:
        parts.reporter.record_checkpoint(parts.ckpt_dir / LAST)
    if not tracker.resumed:  # a continued run has them (and MLflow params are immutable)
        tracker.log_params(flatten(resolved))
        net = distributed.unwrap(parts.job.model)
        tracker.log_params({f"model.{k}": v for k, v in model_summary(net).items()})
        tracker.log_params({f"data.{k}": v for k, v in data.describe().items()})
        tracker.log_dataset(data.fingerprint())
        tracker.log_metrics(parts.setup_metrics)
    if parts.ctx.is_main:
        parts.out_dir.mkdir(parents=True, exist_ok=True)
        (parts.out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    log.info(
        "stage=%s model=%s teacher=%s loss=%s optimizer=%s device=%s data=%s",
        cfg.stage,
        parts.spec.get("arch", "probe"),
        parts.teacher_tags.get("teacher"),
        cfg.loss.name,
        describe_optimizer(parts.job.optimizer),
        parts.job.device,
        data.describe(),
    )
    return resolved


def callbacks(cfg: DictConfig, parts: Parts, resolved: dict[str, Any]) -> list[Callback]:
    """Work around the loop (:mod:`conkd.callbacks`), in order: the heartbeat, the sweep's
    pruner (its decision is saved), checkpoints, then metrics to the tracker (a resumed run logs
    any epoch a kill cut off). Under torchrun these run on rank 0, and every rank then learns
    whether the pruner stopped."""
    job, reporter = parts.job, parts.reporter
    if not parts.ctx.is_main:
        return [SharedStop()]
    extra = {
        "classes": parts.data.classes,
        "stage": str(cfg.stage),
        "config": resolved,
        "run_id": parts.tracker.run_id,
        "teacher_tags": parts.teacher_tags,
        "views": views.VERSION,
    }
    model = distributed.unwrap(job.model)
    background = in_background(cfg.trainer.checkpoint_background, job.device)
    writer = Checkpointer(parts.ckpt_dir, model, parts.spec, job.optimizer, job.scheduler, extra,
                          job.average, background)  # fmt: skip
    return [
        HeartbeatCallback(parts.tracker, reporter),
        *([PruningCallback(reporter)] if reporter is not None else []),
        CheckpointCallback(writer, every_steps=cfg.trainer.checkpoint_every_steps),
        TrackingCallback(parts.tracker),
        *([SharedStop()] if parts.ctx.enabled else []),
    ]


def start_state(parts: Parts, cbs: list[Callback]) -> TrainState:
    """A fresh state, or the resumed one with weights, optimizer, scheduler and RNG restored;
    every callback's ``on_resume`` then catches up (metrics a kill cut off, the pruner's curve)."""
    ckpt = parts.resume_from
    if ckpt is None:
        return TrainState()
    job = parts.job
    ckpt_io.restore(ckpt, distributed.unwrap(job.model), job.optimizer, job.scheduler, job.average)
    state = TrainState.from_state_dict(ckpt["train_state"])
    source_best = Path(ckpt["path"]).parent / "best.pt"
    own_best = parts.ckpt_dir / "best.pt"
    if parts.ctx.is_main and source_best.exists() and not own_best.exists():
        # resume=PATH: the inherited best epoch may stay the best; its weights come along
        own_best.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_best, own_best)
    log.info(
        "resuming from %s: epoch %d/%d, batch %d, step %d",
        ckpt["path"],
        state.epoch + 1,
        job.options.epochs,
        state.batch,
        state.step,
    )
    for cb in cbs:
        cb.on_resume(state)
    return state


def test_best(cfg: DictConfig, parts: Parts) -> tuple[dict[str, float], Any]:
    """Test the best checkpoint, not the last epoch's weights."""
    model, opts = distributed.unwrap(parts.job.model), parts.job.options
    best = ckpt_io.load_checkpoint(parts.ckpt_dir / "best.pt")
    model.load_state_dict(best["state_dict"])
    return evaluate(
        model,
        parts.loaders.eval("test"),
        parts.job.device,
        opts.num_classes,
        precision=opts.precision,
        channels_last=opts.channels_last,
        prefix="test",
        progress=opts.progress,
    )


def finish(cfg: DictConfig, parts: Parts, state: TrainState) -> float:
    """Test, write the summary, plots and artifacts, register teachers; returns the objective.

    A pruned sweep trial is not tested: the sweep has already ruled it out, and testing its
    best checkpoint would cost as much as an epoch of a 40-step trial. Under torchrun every
    rank tests its share; rank 0 writes and logs.
    """
    tracker, out_dir, best = parts.tracker, parts.out_dir, state.best
    pruned = distributed.broadcast(parts.reporter is not None and parts.reporter.pruned)
    value = float(best[cfg.objective])
    summary = {"best/epoch": best["epoch"], f"best/{cfg.objective}": value, "objective": value}
    if pruned:
        tracker.set_tags({"pruned": "true"})
        confusion = None
    else:
        test, confusion = test_best(cfg, parts)
        summary = {**test, **summary}
    if not parts.ctx.is_main:
        return value
    tracker.log_metrics(summary, step=cfg.trainer.epochs)
    meta = {"stage": str(cfg.stage), "run_id": tracker.run_id, "run_name": tracker.run_name}
    (out_dir / "metrics.json").write_text(json.dumps({**meta, **summary}, indent=2))
    plots.learning_curves(state.history, out_dir / "learning_curves.png")
    if confusion is not None:
        classes = parts.data.classes
        (out_dir / "per_class.txt").write_text(plots.per_class_table(confusion, classes))
        title = f"test confusion, top-1 {summary['test/top1']:.2f}%"
        plots.confusion_matrix(confusion, classes, out_dir / "confusion_matrix.png", title)
    for name in ARTIFACTS:
        if (out_dir / name).exists():
            tracker.log_artifact(out_dir / name)
    tracker.log_artifact(out_dir / ".hydra", "hydra")
    publish_model(cfg, parts)
    tested = (
        "pruned, not tested"
        if pruned
        else f"test top1 {summary['test/top1']:.2f} top5 {summary['test/top5']:.2f}"
    )
    log.info(
        "done: best val top1 %.2f (epoch %d), %s; checkpoints in %s",
        best["val/top1"],
        best["epoch"] + 1,
        tested,
        parts.ckpt_dir,
    )
    return value


ARTIFACTS = (
    "config.yaml",
    "metrics.json",
    "per_class.txt",
    "learning_curves.png",
    "confusion_matrix.png",
)


def publish_model(cfg: DictConfig, parts: Parts) -> None:
    """Best checkpoint and network to MLflow; a teacher is registered under its dataset."""
    register = cfg.mlflow.register if cfg.stage == "teacher" else None
    name = alias = None
    if register:
        name = register.name
        if name in (None, AUTO):
            name = registry_name(parts.data.identity)
        alias = register.alias
    if cfg.mlflow.log_checkpoint or register:
        parts.tracker.log_artifact(parts.ckpt_dir / "best.pt", "checkpoints")
    if (cfg.mlflow.log_model or register) and parts.tracker.offline:
        log.warning("MLflow is away: the model is not logged or registered (best.pt is in %s)",
                    parts.ckpt_dir)  # fmt: skip
    elif cfg.mlflow.log_model or register:
        size = int(cfg.dataset.image_size)
        model = distributed.unwrap(parts.job.model).cpu()
        version = parts.tracker.log_model(model, (3, size, size), name, alias)
        if version:
            log.info("registered models:/%s@%s (version %s)", name, alias, version)


def run(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None = None) -> float:
    """Train, validate, test; returns ``cfg.objective`` of the best epoch (for sweeps).

    ``hydra_cfg`` carries the job's overrides and output dir when run under Hydra.
    """
    parts = setup(cfg, hydra_cfg)
    try:
        return fit_and_finish(cfg, parts)
    finally:
        if parts.ctx.enabled:
            distributed.teardown()


def fit_and_finish(cfg: DictConfig, parts: Parts) -> float:
    """Inside the MLflow run: record the start, fit (or resume) with callbacks, finish."""
    with parts.tracker:
        resolved = record_start(cfg, parts)
        cbs = callbacks(cfg, parts, resolved)
        state = fit(
            parts.job,
            parts.loaders.train,
            parts.loaders.eval("val"),
            start_state(parts, cbs),
            cbs,
            log=log.info,
        )
        return finish(cfg, parts, state)
