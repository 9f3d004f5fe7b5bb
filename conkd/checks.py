"""Config checks that need no data or model, so bad input fails in milliseconds.

:func:`check_config` checks a composed config before anything is built. The nodes handed to
constructors as they are (dataset, optimizer) have no schema, so their numbers are checked by
name against :data:`RANGES`; the constructors that take those numbers (``DataModule``) call
:func:`check_range` with the same names, so a rule and its message are written once whether the
value comes from the command line or from Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from conkd.errors import ConKDError

STAGES = ("teacher", "student", "probe")


@dataclass(frozen=True)
class Range:
    """A number's bounds: ``low`` (exclusive when ``open_low``) and an exclusive ``below``."""

    low: float | None = None
    open_low: bool = False
    below: float | None = None

    def allows(self, value: float) -> bool:
        above_low = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return above_low and (self.below is None or value < self.below)

    def __str__(self) -> str:
        if self.below is not None:
            return f"in ({self.low}, {self.below})"
        return f"{'>' if self.open_low else '>='} {self.low}"


#: The optimizer kernels :func:`conkd.optimizers.fast_optimizer` chooses among.
KERNELS = ("auto", "fused", "plain")
#: ``torch.compile``'s modes (``trainer.compile_mode``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Numbers of the untyped nodes, by config key.
RANGES: dict[str, Range] = {
    "optimizer.lr": Range(0, open_low=True),
    "optimizer.weight_decay": Range(),  # any number
    "dataset.batch_size": Range(2),  # BatchNorm and SupCon need two samples
    "dataset.image_size": Range(8),  # the smallest side the backbones take
    "dataset.val_fraction": Range(0, open_low=True, below=1),
    "trainer.sync_every_steps": Range(1),
}


def check_range(name: str, value: Any) -> None:
    """Raise a :class:`ConKDError` naming ``name`` unless ``value`` is a number within its
    rule in :data:`RANGES`, e.g. ``check_range("dataset.batch_size", 1)``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConKDError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    rule = RANGES[name]
    if not rule.allows(value):
        raise ConKDError(f"{name} must be {rule}, got {value}")


def check_loss(loss: DictConfig) -> None:
    """Temperatures are positive, weights (and ``alpha``) non-negative, by their names."""
    for key, value in loss.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if str(key).endswith("temperature") and not value > 0:
            raise ConKDError(f"loss.{key} must be > 0, got {value}")
        if (key == "alpha" or str(key).endswith("weight")) and not value >= 0:
            raise ConKDError(f"loss.{key} must be >= 0, got {value}")


def check_config(cfg: DictConfig) -> None:
    """Check a composed train config: choices, the loss's numbers, :data:`RANGES`, epochs and
    precision (``trainer.precision=32`` may arrive as an int; it means "32")."""
    if cfg.stage not in STAGES:
        raise ConKDError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    check_loss(cfg.loss)
    for name in RANGES:
        value = OmegaConf.select(cfg, name)
        if value is not None:
            check_range(name, value)
    if cfg.objective_mode not in ("max", "min"):
        raise ConKDError(f"objective_mode must be max or min, got {cfg.objective_mode!r}")
    if cfg.trainer.epochs < 1:
        raise ConKDError(f"trainer.epochs must be >= 1, got {cfg.trainer.epochs}")
    decay = cfg.trainer.get("ema_decay")
    if decay is not None and not 0 < decay < 1:
        raise ConKDError(f"trainer.ema_decay must be in (0, 1) or null, got {decay}")
    if cfg.trainer.compile_mode not in COMPILE_MODES:
        raise ConKDError(
            f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}, got "
            f"{cfg.trainer.compile_mode!r}"
        )
    if cfg.trainer.optimizer_kernel not in KERNELS:
        raise ConKDError(
            f"trainer.optimizer_kernel must be one of {', '.join(KERNELS)}, got "
            f"{cfg.trainer.optimizer_kernel!r}"
        )
    if cfg.trainer.checkpoint_background not in ("auto", True, False):
        raise ConKDError(
            "trainer.checkpoint_background must be auto, true or false, got "
            f"{cfg.trainer.checkpoint_background!r}"
        )
    if str(cfg.trainer.precision) not in ("32", "bf16"):
        raise ConKDError(f"trainer.precision must be 32 or bf16, got {cfg.trainer.precision!r}")
