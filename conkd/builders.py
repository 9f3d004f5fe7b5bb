"""The parts of a run, built from the composed config: the config edge below :mod:`conkd.run`.

Each function reads the config nodes of one part and builds it with
:func:`conkd.targets.build` (``hydra.utils.instantiate`` within the execution whitelist): the
network and its checkpoint spec, the objective, the optimizer and scheduler, the loop's
:class:`conkd.engine.Job`, the teacher's settings, and what a run records about itself (tags,
name, device). Everything they return is plain objects; nothing below them reads the config.
"""

from __future__ import annotations

import random
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from conkd import checkpoint as ckpt_io
from conkd import distributed
from conkd.averaging import weight_average
from conkd.data import DataModule
from conkd.engine import Job, Options, TeacherFn
from conkd.errors import ConKDError
from conkd.losses import Objective
from conkd.models import Probe
from conkd.nested import flatten
from conkd.optimizers import fast_optimizer
from conkd.provenance import teacher_values
from conkd.targets import build
from conkd.teacher import CachePolicy, TeacherSettings
from conkd.tracking import Tracker, make_tracker, prepare_store, resolve_store, sweep_parent_run_id


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


def limit_gpu_memory(device: torch.device, fraction: float | None) -> None:
    """Cap this process's share of a CUDA device's memory (``trainer.gpu_memory_fraction``), so
    that several sweep workers can share one GPU: a worker past its share fails with an
    out-of-memory error instead of starving the others. Nothing on other devices."""
    if fraction is None:
        return
    if not 0.0 < fraction <= 1.0:
        raise ConKDError(f"trainer.gpu_memory_fraction must be in (0, 1] or null, got {fraction}")
    if device.type == "cuda":  # an index or None (the current device): torch refuses "cuda"
        torch.cuda.set_per_process_memory_fraction(float(fraction), device.index)


def tune_convolutions(device: torch.device, benchmark: bool) -> None:
    """``trainer.cudnn_benchmark``: on CUDA, cuDNN times its convolution algorithms for each new
    input shape and keeps the fastest. Training batches have one shape (``drop_last``), so that
    costs a few steps once per run; the chosen kernels may differ between runs, which GPU runs
    do not promise to repeat bit for bit anyway. Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = benchmark


def model_spec(node: DictConfig, num_classes: int, image_size: int) -> dict[str, Any]:
    """The model's constructor as a plain ``_target_`` dict (stored in checkpoints)."""
    spec = OmegaConf.to_container(node, resolve=True)
    assert isinstance(spec, dict)
    spec.update(num_classes=num_classes, image_size=image_size)
    return spec


def build_data(cfg: DictConfig) -> DataModule:
    """The run's data, its decoded arrays found or built now (with their time and size) rather
    than at the first batch."""
    data: DataModule = build(cfg.dataset, "dataset config", seed=cfg.seed)
    data.prepare()
    return data


def build_model(
    cfg: DictConfig, data: DataModule, objective: Objective
) -> tuple[nn.Module, dict[str, Any]]:
    """The network this run trains and its spec for the checkpoint; one without the projection
    head the objective reads is refused."""
    model, spec = _network(cfg, data)
    if objective.inputs - {"logits", "embedding"} and getattr(model, "projector", None) is None:
        raise ConKDError(
            f"loss={cfg.loss.name} reads the projection, but the model has none; "
            "set model.projection_dim (e.g. 128)"
        )
    return model, spec


def _network(cfg: DictConfig, data: DataModule) -> tuple[nn.Module, dict[str, Any]]:
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


def teacher_hint(cfg: DictConfig, hydra_cfg: Mapping[str, Any] | None) -> str:
    """The command that trains a teacher for this run's data (for error messages)."""
    data = [o for o in (hydra_cfg or {}).get("overrides", []) if o.startswith("dataset")]
    return shlex.join(["python", "train.py", "experiment=teacher", *data])


def teacher_settings(
    cfg: DictConfig,
    data: DataModule,
    tracking_uri: str,
    hydra_cfg: Mapping[str, Any] | None,
    world: int = 1,
) -> TeacherSettings:
    """What this run asks of its teacher (:func:`conkd.teacher.teacher_function`), read from
    the config: the checkpoint, the model it must be, the cache policy, the loop's numerics
    and the config values the cache is keyed by (:func:`conkd.provenance.teacher_values`)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(resolved, dict)
    return TeacherSettings(
        checkpoint=str(cfg.teacher_ckpt),
        spec=model_spec(cfg.teacher, data.num_classes, data.image_size),
        tracking_uri=tracking_uri if cfg.mlflow.enabled else None,
        download_dir=Path(cfg.paths.output_dir) / "teacher",
        hint=teacher_hint(cfg, hydra_cfg),
        cache=CachePolicy(
            cfg.teacher_cache.enabled,
            Path(cfg.teacher_cache.dir),
            cfg.teacher_cache.max_gb,
            cfg.teacher_cache.resident,
        ),
        epochs=cfg.trainer.epochs,
        max_steps=cfg.trainer.max_steps_per_epoch,
        precision=str(cfg.trainer.precision),
        channels_last=cfg.trainer.channels_last,
        progress=cfg.trainer.progress,
        world=world,
        key_values=teacher_values(flatten(resolved)),
    )


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
    cfg: DictConfig, model: nn.Module, steps_per_epoch: int, device: torch.device
) -> tuple[torch.optim.Optimizer, Any]:
    params = param_groups(model, cfg.trainer.decay_norms_and_biases)
    make = fast_optimizer(build(cfg.optimizer, "optimizer config"), device,
                          cfg.trainer.optimizer_kernel)  # fmt: skip
    try:
        optimizer = make(params)
    except (ValueError, AssertionError) as err:
        raise ConKDError(f"invalid optimizer config: {err or 'assertion failed'}") from err
    scheduler = None
    if cfg.scheduler is not None:
        scheduler = build(cfg.scheduler, "scheduler config")(
            optimizer, total_steps=steps_per_epoch * cfg.trainer.epochs
        )
    return optimizer, scheduler


def param_groups(model: nn.Module, decay_norms_and_biases: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one, or (``decay_norms_and_biases=false``)
    the weights apart from norm scales and biases, which get no weight decay ("Bag of Tricks",
    He et al. 2019; timm's ``param_groups_weight_decay``): decaying BatchNorm's gamma only
    fights the scale invariance it already has."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norms_and_biases:
        return [{"params": [p for _, p in trainable]}]
    flat = {n for n, p in trainable if p.ndim <= 1 or n.endswith(".bias")}
    weights = [p for n, p in trainable if n not in flat]
    return [{"params": weights}, {"params": [p for n, p in trainable if n in flat],
                                  "weight_decay": 0.0}]  # fmt: skip


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
    model = model.to(device, memory_format=memory)
    decay = cfg.trainer.ema_decay
    average = weight_average(model, decay) if decay is not None else None  # before compiling
    model = distributed.wrap(model, ctx, device, not unused_head)
    if cfg.trainer.compile:  # in place: state_dict keys and checkpoints stay as without it
        model.compile(mode=cfg.trainer.compile_mode)
    steps_per_epoch = len(data.train) // data.batch_size
    if cfg.trainer.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.trainer.max_steps_per_epoch)
    optimizer, scheduler = build_optimization(cfg, model, steps_per_epoch, device)
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
        sync_at=(cfg.trainer.sync_every_steps, *filter(None, [cfg.trainer.checkpoint_every_steps])),
    )
    return Job(model, objective, optimizer, scheduler, device, options, teacher_fn, data.mixer,
               average)  # fmt: skip


def tracking_store(cfg: DictConfig) -> tuple[str, str | None]:
    """The MLflow store's ``(tracking_uri, artifact_location)``, checked to answer (and a local
    database created) now, before any data is loaded, when tracking is on."""
    tracking_uri, artifact_location = resolve_store(cfg.paths.root_dir, cfg.mlflow.tracking_uri)
    if cfg.mlflow.enabled:
        prepare_store(tracking_uri)
    return tracking_uri, artifact_location


def build_tracker(
    cfg: DictConfig,
    hydra_cfg: Mapping[str, Any] | None,
    store: tuple[str, str | None],
    ctx: distributed.Context,
    device: torch.device,
    teacher_tags: Mapping[str, str],
    distils: bool,
    continue_run: str | None,
    out_dir: Path,
) -> Tracker:
    """The run's tracker: MLflow on rank 0 when ``mlflow.enabled`` (continuing the MLflow run
    ``continue_run`` of a resumed checkpoint), the one that records nothing otherwise."""
    return make_tracker(
        cfg.mlflow.enabled and ctx.is_main,
        tracking_uri=store[0],
        experiment_name=cfg.mlflow.experiment_name,
        run_name=cfg.mlflow.run_name or run_name(cfg, distils),
        artifact_location=store[1],
        parent_run_id=sweep_parent_run_id(hydra_cfg and hydra_cfg.get("sweep_dir")),
        tags={
            **run_tags(cfg, hydra_cfg),
            "conkd.device": describe_device(device, ctx.world),
            **teacher_tags,
        },
        resume_run_id=continue_run,
        pending_file=out_dir / "mlflow_pending.json",
    )
