"""Typed schema of ``conf/train.yaml``, checked by Hydra when it composes a run.

``train.yaml`` extends :class:`TrainConf` (first entry of its defaults list), so a wrong type or
an unknown choice fails at compose time, before anything is built, with the key named:
``loss.alpha=abc`` -> "Value 'abc' of type 'str' could not be converted to Float ... full_key:
loss.alpha". The nodes handed to ``hydra.utils.instantiate`` as they are (dataset, model,
optimizer, scheduler) stay untyped (``Any``): their keys are the constructors' arguments.
:func:`conkd.checks.check_config` checks the numeric ones that bad input usually hits (optimizer
lr and weight decay, dataset batch and image size, validation fraction) by name. Importing this
module registers the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Optional[...] below, not `X | None`: OmegaConf reads the annotations at runtime.


class Choice(str, Enum):
    """A config choice that is also its plain string (``cfg.stage == "teacher"``, f-strings,
    JSON), as ``enum.StrEnum`` (Python 3.11+) would be."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Stage(Choice):
    teacher = "teacher"
    student = "student"
    probe = "probe"


class Mode(Choice):
    max = "max"
    min = "min"


@dataclass
class TrainerConf:
    epochs: int = 10
    max_steps_per_epoch: Optional[int] = None  # noqa: UP045
    device: str = "auto"
    precision: str = "32"  # 32 | bf16 (`trainer.precision=32` arrives as an int: checked in run)
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead | max-autotune
    optimizer_kernel: str = "auto"  # auto | fused | plain (conkd.optimizers.KERNELS)
    gpu_memory_fraction: Optional[float] = None  # noqa: UP045
    cudnn_benchmark: bool = True
    grad_clip: Optional[float] = None  # noqa: UP045
    ema_decay: Optional[float] = None  # noqa: UP045
    decay_norms_and_biases: bool = True
    checkpoint_every_steps: Optional[int] = None  # noqa: UP045
    checkpoint_background: Any = "auto"  # auto | true | false (conkd.checkpoint.in_background)
    progress: bool = True
    sync_every_steps: int = 50


@dataclass
class LossConf:
    """Every loss config's scalar knobs; those a loss does not use stay null."""

    name: str = MISSING
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    kd_weight: Optional[float] = None  # noqa: UP045
    kd_temperature: Optional[float] = None  # noqa: UP045
    alpha: Optional[float] = None  # noqa: UP045
    supcon_temperature: Optional[float] = None  # noqa: UP045
    terms: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherCacheConf:
    enabled: Any = "auto"  # auto | true | false
    dir: str = MISSING
    max_gb: float = 4.0
    resident: Any = "auto"  # auto | true | false


@dataclass
class MlflowConf:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # noqa: UP045
    experiment_name: str = MISSING
    run_name: Optional[str] = None  # noqa: UP045
    log_checkpoint: bool = True
    log_model: bool = True
    register: Any = None
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptunaConf:
    trial: Optional[int] = None  # noqa: UP045


@dataclass
class ProbeConf:
    checkpoint: Optional[str] = None  # noqa: UP045
    head: Any = None


@dataclass
class TrainConf:
    stage: Stage = Stage.student
    teacher_ckpt: Optional[str] = "auto"  # noqa: UP045
    seed: int = 0
    objective: str = "val/top1"
    objective_mode: Mode = Mode.max
    resume: str = "auto"
    teacher_cache: TeacherCacheConf = field(default_factory=TeacherCacheConf)
    optuna: OptunaConf = field(default_factory=OptunaConf)
    probe: ProbeConf = field(default_factory=ProbeConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    loss: LossConf = field(default_factory=LossConf)
    dataset: Any = MISSING
    model: Any = MISSING
    teacher: Any = None
    optimizer: Any = MISSING
    scheduler: Any = None
    paths: Any = MISSING


ConfigStore.instance().store(name="train_schema", node=TrainConf, provider="conkd")
