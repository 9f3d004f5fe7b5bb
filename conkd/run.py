"""One training run from a composed Hydra config: the only module that reads the config.

A run reads as a table of contents: :func:`setup` validates the config and builds every object
with :func:`hydra.utils.instantiate` into :class:`Parts`; :func:`conkd.engine.fit` trains them
with callbacks (MLflow metrics, checkpoints, the sweep's pruner); :func:`finish` tests the best
checkpoint, writes plots and artifacts and registers teachers. Returns the objective for sweeps.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conkd import checkpoint as ckpt_io
from conkd import distributed, plots, resume
from conkd.checkpoint import LAST, Checkpointer
from conkd.data import DataModule
from conkd.engine import (
    Callback,
    Job,
    Options,
    TeacherFn,
    TrainState,
    evaluate,
    fit,
    online_teacher,
)
from conkd.errors import ConKDError
from conkd.losses import Objective
from conkd.models import Probe, model_summary
from conkd.sweep import TrialReporter, reporter_from_hydra
from conkd.targets import build
from conkd.teacher import (
    AUTO,
    TeacherSource,
    build_teacher,
    check_teacher,
    registry_name,
    resolve_checkpoint,
)
from conkd.teacher_cache import TeacherCache, state_dict_digest
from conkd.tracking import (
    Tracker,
    flatten,
    log_model,
    prepare_store,
    resolve_store,
    sweep_parent_run_id,
)

log = logging.getLogger("conkd")

STAGES = ("teacher", "student", "probe")


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
    # Nodes passed to constructors as they are have no schema: check their numbers by name.
    for key, low in (
        ("optimizer.lr", 0),
        ("optimizer.weight_decay", None),
        ("dataset.batch_size", 2),
        ("dataset.image_size", 8),
    ):
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConKDError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
        if low is not None and not (value > low if low == 0 else value >= low):
            raise ConKDError(f"{key} must be {'> 0' if low == 0 else f'>= {low}'}, got {value}")
    if cfg.objective_mode not in ("max", "min"):
        raise ConKDError(f"objective_mode must be max or min, got {cfg.objective_mode!r}")
    if cfg.trainer.epochs < 1:
        raise ConKDError(f"trainer.epochs must be >= 1, got {cfg.trainer.epochs}")
    if str(cfg.trainer.precision) not in ("32", "bf16"):  # `trainer.precision=32` is an int
        raise ConKDError(f"trainer.precision must be 32 or bf16, got {cfg.trainer.precision!r}")


def model_spec(node: DictConfig, num_classes: int, image_size: int) -> dict[str, Any]:
    """The model's constructor as a plain ``_target_`` dict (stored in checkpoints)."""
    spec = OmegaConf.to_container(node, resolve=True)
    assert isinstance(spec, dict)
    spec.update(num_classes=num_classes, image_size=image_size)
    return spec


def build_model(cfg: DictConfig, data: DataModule) -> tuple[nn.Module, dict[str, Any]]:
    """The network this run trains, and its spec for the checkpoint."""
    if cfg.stage != "probe":
        spec = model_spec(cfg.model, data.num_classes, data.image_size)
        return build(spec, "model config"), spec
    if not cfg.probe.checkpoint:
        raise ConKDError(
            "stage=probe needs probe.checkpoint=PATH (a student or teacher checkpoint)"
        )
    backbone = ckpt_io.load_checkpoint(cfg.probe.checkpoint)
    network = ckpt_io.build_from_checkpoint(backbone)
    head = OmegaConf.to_container(cfg.probe.head, resolve=True)
    head.update(embedding_dim=network.embedding_dim, num_classes=data.num_classes)
    spec = {"_target_": "conkd.models.Probe", "network": backbone["model"], "head": head}
    return Probe(network, build(head, "probe.head config")), spec


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


def describe_device(device: torch.device, processes: int) -> str:
    """What ran the job, for comparing timings across runs: the GPU model or the CPU threads."""
    what = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    return what if processes == 1 else f"{processes} x {what}"


def run_tags(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None) -> dict[str, str]:
    tags = {"stage": str(cfg.stage), "command": shlex.join(sys.argv)}
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


def run_name(cfg: DictConfig, distils: bool = True) -> str:
    """Readable default run name, e.g. ``resnet18<-resnet101 lsd+supcon lion``."""
    optimizer = cfg.optimizer._target_.rsplit(".", 1)[-1].lower()
    arch = cfg.model.get("arch", "?")
    who = {"teacher": f"teacher {arch}", "student": f"{arch}<-{cfg.teacher.arch}"}.get(
        cfg.stage, f"probe {Path(str(cfg.probe.checkpoint)).parent.parent.name}"
    )
    if cfg.stage == "student" and not (distils and cfg.teacher_ckpt):
        who = arch
    return f"{who} {cfg.loss.name} {optimizer}"


@dataclass
class Parts:
    """What :func:`setup` builds from the config: plain objects, no config below this point."""

    job: Job
    data: DataModule
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


def teacher_hint(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None) -> str:
    """The command that trains a teacher for this run's data (for error messages)."""
    data = [o for o in (hydra_cfg or {}).get("overrides", []) if o.startswith("dataset")]
    return shlex.join(["python", "train.py", "experiment=teacher", *data])


def teacher_function(
    cfg: DictConfig,
    data: DataModule,
    objective: Objective,
    device: torch.device,
    tracking_uri: str,
    hint: str,
) -> tuple[TeacherFn, dict[str, str], dict[str, float]]:
    """The loop's teacher: the cache of its outputs per augmented view (built now if missing,
    the network is then never loaded again) or the online frozen network. Returns it with the
    run's teacher tags and the cache's size / build-time metrics."""
    found = resolve_checkpoint(
        cfg.teacher_ckpt,
        data.identity,
        tracking_uri if cfg.mlflow.enabled else None,
        Path(cfg.paths.output_dir) / "teacher",
        hint,
    )
    expected = model_spec(cfg.teacher, data.num_classes, data.image_size)
    check_teacher(found, expected, data.classes, hint)
    log.info("teacher: %s%s", found.source, " (teacher_ckpt=auto)" if found.auto else "")
    memory = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format

    def network() -> nn.Module:
        return build_teacher(found).to(device, memory_format=memory)

    outputs = objective.teacher_inputs
    fields = cache_fields(cfg, data, found, outputs)
    size_gb = estimate_cache_bytes(cfg, data, expected, outputs) / 1e9
    if not use_cache(cfg.teacher_cache.enabled, size_gb, cfg.teacher_cache.max_gb):
        return online_teacher(network()), {**found.tags, "teacher.cache": "off"}, {}
    cache, built = TeacherCache.ensure(
        Path(cfg.teacher_cache.dir),
        fields,
        lambda directory: TeacherCache.build(
            directory,
            network(),
            data.train_loader,
            data.eval_loader("val"),
            epochs=cfg.trainer.epochs,
            max_steps=cfg.trainer.max_steps_per_epoch,
            outputs=outputs,
            n_train=len(data.train),
            n_val=len(data.val),
            device=device,
            precision=str(cfg.trainer.precision),
            channels_last=cfg.trainer.channels_last,
            fields=fields,
            progress=cfg.trainer.progress,
        ),
    )
    what = f"built in {cache.build_seconds:.1f} s" if built else "reused"
    log.info("teacher cache: %s (%s, %.1f MB)", cache.directory, what, cache.size_bytes / 2**20)
    tags = {**found.tags, "teacher.cache": str(cache.directory), "teacher.cache_built": str(built)}
    metrics = {"teacher_cache/size_mb": cache.size_bytes / 2**20}
    if built:
        metrics["teacher_cache/build_s"] = cache.build_seconds
    return cache, tags, metrics


def cache_fields(
    cfg: DictConfig, data: DataModule, found: TeacherSource, outputs: list[str]
) -> dict[str, Any]:
    """Everything the cached teacher outputs depend on (the cache's key)."""
    return {
        "teacher_weights": state_dict_digest(found.checkpoint["state_dict"]),
        "teacher_model": found.checkpoint["model"],
        "data": data.fingerprint()["digest"],
        "pipeline": data.pipeline(),
        "augment": OmegaConf.to_container(cfg.dataset.augment, resolve=True),
        "batch_size": data.batch_size,
        "seed": cfg.seed,
        "epochs": cfg.trainer.epochs,
        "max_steps_per_epoch": cfg.trainer.max_steps_per_epoch,
        "precision": str(cfg.trainer.precision),
        "channels_last": cfg.trainer.channels_last,
        "outputs": outputs,
    }


def estimate_cache_bytes(
    cfg: DictConfig, data: DataModule, spec: Mapping[str, Any], outputs: list[str]
) -> int:
    """fp16 bytes of a cache: one row per (epoch, sample seen) and validation sample."""
    dims = {"logits": data.num_classes, "projection": spec.get("projection_dim") or 128}
    width = sum(dims.get(o, 2048) for o in outputs)  # embeddings: at most a ResNet-50's 2048
    seen = len(data.train)
    if cfg.trainer.max_steps_per_epoch:
        seen = min(seen, cfg.trainer.max_steps_per_epoch * data.batch_size)
    return 2 * width * (cfg.trainer.epochs * seen + len(data.val))


def use_cache(enabled: Any, size_gb: float, max_gb: float) -> bool:
    """``teacher_cache.enabled``: true, false, or auto (on while the cache fits ``max_gb``)."""
    if enabled == "auto":
        if size_gb > max_gb:
            log.info(
                "teacher cache off: it would take %.1f GB > teacher_cache.max_gb=%s",
                size_gb,
                max_gb,
            )
        return size_gb <= max_gb
    if isinstance(enabled, bool):
        return enabled
    raise ConKDError(f"teacher_cache.enabled must be auto, true or false, got {enabled!r}")


def build_objective(cfg: DictConfig) -> Objective:
    objective = Objective(build(cfg.loss.terms, "loss config"))
    if objective.needs_teacher and cfg.stage != "student":
        raise ConKDError(f"loss={cfg.loss.name} distils from a teacher; use it in stage=student")
    if objective.needs_teacher and not cfg.teacher_ckpt:
        raise ConKDError(
            f"loss={cfg.loss.name} distils from a teacher: set teacher_ckpt=auto (the dataset's "
            "registered teacher) or teacher_ckpt=PATH to a checkpoint written by "
            "`python train.py experiment=teacher`"
        )
    return objective


def build_optimization(
    cfg: DictConfig, model: nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = build(cfg.optimizer, "optimizer config")(params)
    except (ValueError, AssertionError) as err:
        raise ConKDError(f"invalid optimizer config: {err or 'assertion failed'}") from err
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = build(cfg.scheduler, "scheduler config")(
            optimizer, total_steps=steps_per_epoch * cfg.trainer.epochs
        )
    return optimizer, scheduler


def build_job(
    cfg: DictConfig,
    data: DataModule,
    model: nn.Module,
    objective: Objective,
    teacher_fn: TeacherFn | None,
    device: torch.device,
    ctx: distributed.Context,
) -> Job:
    """The network on its device (DDP under torchrun), optimizer, scheduler and loop options."""
    memory = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    unused_head = (
        getattr(model, "projector", None) is not None and "projection" not in objective.inputs
    )
    model = distributed.wrap(model.to(device, memory_format=memory), ctx, device, not unused_head)
    if cfg.trainer.compile:
        model.compile()  # in place: state_dict keys and checkpoints stay as without it
    steps_per_epoch = len(data.train) // data.batch_size
    if cfg.trainer.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.trainer.max_steps_per_epoch)
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch)
    options = Options(
        epochs=cfg.trainer.epochs,
        num_classes=data.num_classes,
        monitor=cfg.objective,
        mode=str(cfg.objective_mode),
        precision=str(cfg.trainer.precision),
        channels_last=cfg.trainer.channels_last,
        max_steps=cfg.trainer.max_steps_per_epoch,
        grad_clip=cfg.trainer.grad_clip,
        progress=cfg.trainer.progress and ctx.is_main,
    )
    return Job(model, objective, optimizer, scheduler, device, options, teacher_fn)


def shard(data: DataModule, ctx: distributed.Context) -> None:
    """Give each torchrun rank its share of every batch (after the teacher cache, which is
    built over whole batches)."""
    if data.batch_size % ctx.world:
        raise ConKDError(
            f"dataset.batch_size={data.batch_size} (the global batch) must be divisible by the "
            f"{ctx.world} processes"
        )
    data.rank, data.world = ctx.rank, ctx.world


def setup(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None) -> Parts:
    """Validate the config and build data, networks, teacher, optimizer and tracker."""
    validate(cfg)
    seed_everything(cfg.seed)
    ctx = distributed.from_env()
    device = distributed.setup(ctx, resolve_device(cfg.trainer.device))
    if not ctx.is_main:
        log.setLevel(logging.WARNING)  # rank 0 speaks for the run
    # one output folder for all ranks: rank 0's (each rank's Hydra made its own)
    out_dir = Path(distributed.broadcast(str(cfg.paths.output_dir)))
    checkpoint, same_run = resume.find(str(cfg.resume), out_dir)
    tracking_uri, artifact_location = resolve_store(cfg.paths.root_dir, cfg.mlflow.tracking_uri)
    if cfg.mlflow.enabled:
        prepare_store(tracking_uri)

    objective = build_objective(cfg)
    data: DataModule = build(cfg.dataset, "dataset config", seed=cfg.seed)
    data.device = device  # decode-once batches are augmented where the model trains
    data.prepare()
    model, spec = build_model(cfg, data)
    teacher_fn, teacher_tags, cache_metrics = None, {}, {}
    if objective.needs_teacher:
        hint = teacher_hint(cfg, hydra_cfg)
        teacher_fn, teacher_tags, cache_metrics = teacher_function(
            cfg, data, objective, device, tracking_uri, hint
        )
    if objective.inputs - {"logits", "embedding"} and getattr(model, "projector", None) is None:
        raise ConKDError(
            f"loss={cfg.loss.name} reads the projection, but the model has none; "
            "set model.projection_dim (e.g. 128)"
        )
    shard(data, ctx)
    job = build_job(cfg, data, model, objective, teacher_fn, device, ctx)
    if checkpoint is not None:
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        resume.check_same_run(checkpoint, resolved, teacher_tags)
    tracker = Tracker(
        enabled=cfg.mlflow.enabled and ctx.is_main,
        tracking_uri=tracking_uri,
        experiment_name=cfg.mlflow.experiment_name,
        run_name=cfg.mlflow.run_name or run_name(cfg, objective.needs_teacher),
        artifact_location=artifact_location,
        parent_run_id=sweep_parent_run_id(hydra_cfg and hydra_cfg.get("sweep_dir")),
        tags={
            **run_tags(cfg, hydra_cfg),
            "conkd.device": describe_device(device, ctx.world),
            **teacher_tags,
        },
        resume_run_id=checkpoint.get("run_id") if same_run and checkpoint else None,
        pending_file=out_dir / "mlflow_pending.json",
    )
    reporter = reporter_from_hydra(cfg, hydra_cfg and hydra_cfg.get("sweeper"))
    return Parts(
        job, data, spec, tracker, out_dir, reporter if ctx.is_main else None, teacher_tags,
        cache_metrics, checkpoint, ctx,
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
        cfg.optimizer._target_,
        parts.job.device,
        data.describe(),
    )
    return resolved


def callbacks(cfg: DictConfig, parts: Parts, resolved: dict[str, Any]) -> list[Callback]:
    """Per-epoch work around the loop, in order: the sweep's pruner (its decision is saved),
    checkpoints, then metrics to MLflow (a resumed run logs any epoch a kill cut off). Under
    torchrun these run on rank 0, and every rank then learns whether the pruner stopped."""
    job = parts.job
    if not parts.ctx.is_main:
        return [SharedStop()]
    checkpointer = Checkpointer(
        parts.ckpt_dir,
        distributed.unwrap(job.model),
        parts.spec,
        job.optimizer,
        job.scheduler,
        every_steps=cfg.trainer.checkpoint_every_steps,
        classes=parts.data.classes,
        stage=str(cfg.stage),
        config=resolved,
        run_id=parts.tracker.run_id,
        teacher_tags=parts.teacher_tags,
    )
    cbs: list[Callback] = [*([parts.reporter] if parts.reporter else []), checkpointer]
    return [*cbs, parts.tracker, *([SharedStop()] if parts.ctx.enabled else [])]


class SharedStop:
    """Training callback (last, on every rank under torchrun): rank 0's decision to stop
    (a pruned trial) for all ranks."""

    def on_epoch_end(self, state: TrainState, metrics: Any, is_best: bool) -> bool:
        return bool(distributed.broadcast(state.stopped_early))


def start_state(parts: Parts, cbs: list[Callback]) -> TrainState:
    """A fresh state, or the resumed one with weights, optimizer, scheduler and RNG restored;
    callbacks with ``on_resume`` then catch up (metrics a kill cut off, the pruner's curve)."""
    ckpt = parts.resume_from
    if ckpt is None:
        return TrainState()
    job = parts.job
    ckpt_io.restore(ckpt, distributed.unwrap(job.model), job.optimizer, job.scheduler)
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
        if hasattr(cb, "on_resume"):
            cb.on_resume(state)
    return state


def test_best(cfg: DictConfig, parts: Parts) -> tuple[dict[str, float], Any]:
    """Test the best checkpoint, not the last epoch's weights."""
    model, opts = distributed.unwrap(parts.job.model), parts.job.options
    best = ckpt_io.load_checkpoint(parts.ckpt_dir / "best.pt")
    model.load_state_dict(best["state_dict"])
    return evaluate(
        model,
        parts.data.eval_loader("test"),
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
        version = log_model(parts.tracker, model, (3, size, size), name, alias)
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
            parts.data.train_loader,
            parts.data.eval_loader("val"),
            start_state(parts, cbs),
            cbs,
            log=log.info,
        )
        return finish(cfg, parts, state)
