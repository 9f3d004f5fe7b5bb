"""Checkpoints: self-describing, written atomically, validated on load.

A checkpoint stores the model's constructor as a ``_target_`` dict, so any command can rebuild the
network with :func:`hydra.utils.instantiate` without the run's config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from conkd.errors import ConKDError


def save_checkpoint(path: Path, model: nn.Module, spec: dict[str, Any], **extra: Any) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": spec, "state_dict": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain types only)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConKDError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of many kinds
        raise ConKDError(f"checkpoint {p} is not a readable ConKD checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise ConKDError(f"{p} is not a ConKD checkpoint (no model spec / state_dict)")
    return ckpt


#: The only constructors a checkpoint may name: ``weights_only=True`` keeps pickles out, and
#: this keeps a crafted ``_target_`` (e.g. ``os.system``) from being called on load.
ALLOWED_TARGETS = ("conkd.models.",)


def _check_targets(node: Any, where: str) -> None:
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGETS):
            raise ConKDError(
                f"{where} names the constructor {target!r}; checkpoints may only build "
                f"{', '.join(t + '*' for t in ALLOWED_TARGETS)}"
            )
        for value in node.values():
            _check_targets(value, where)
    elif isinstance(node, list | tuple):
        for value in node:
            _check_targets(value, where)


def instantiate_model(spec: Mapping[str, Any], what: str = "model") -> nn.Module:
    """Build the network a checkpoint's spec describes (project model classes only)."""
    _check_targets(spec, f"{what} spec")
    try:
        return instantiate(dict(spec), _convert_="all")
    except InstantiationException as err:
        raise ConKDError(f"invalid {what} spec: {err.__cause__ or err}") from err


def build_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights."""
    model = instantiate_model(ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def check_compatible(
    ckpt: Mapping[str, Any],
    expected: Mapping[str, Any],
    classes: list[str],
    what: str,
    path: str,
    hint: str = "choose the matching model or checkpoint",
) -> None:
    """Raise a clear error when a checkpoint's architecture, class count or class *names* differ
    from this run's: two datasets with ten classes each are still different tasks."""
    spec = ckpt["model"]
    for key in ("arch", "num_classes"):
        if spec.get(key) != expected.get(key):
            raise ConKDError(
                f"{what} checkpoint {path} was built with {key}={spec.get(key)!r}, but this run "
                f"expects {key}={expected.get(key)!r}; {hint}"
            )
    stored = ckpt.get("classes")
    if stored is not None and list(stored) != list(classes):
        differ = [f"{a!r}!={b!r}" for a, b in zip(stored, classes) if a != b][:3]
        raise ConKDError(
            f"{what} checkpoint {path} was trained on other classes than this dataset's "
            f"({', '.join(differ)}); {hint}"
        )


class Checkpointer:
    """Training callback: ``last.pt`` after every epoch and ``best.pt`` on a new best.

    ``extra`` is stored in every checkpoint (classes, stage, resolved config, MLflow run id), so
    ``eval.py`` and students can use a checkpoint without the run's config.
    """

    def __init__(
        self, directory: Path, model: nn.Module, spec: dict[str, Any], **extra: Any
    ) -> None:
        self.directory = directory
        self.model = model
        self.spec = spec
        self.extra = extra

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float], is_best: bool) -> None:
        epoch = state.epoch - 1
        for name in ("last.pt", "best.pt") if is_best else ("last.pt",):
            save_checkpoint(
                self.directory / name,
                self.model,
                self.spec,
                epoch=epoch,
                metrics=dict(metrics),
                **self.extra,
            )
