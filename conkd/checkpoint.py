"""Checkpoints: self-describing, written atomically, validated on load.

A checkpoint stores the model's constructor as a ``_target_`` dict, so any command can rebuild the
network with :func:`hydra.utils.instantiate` without the run's config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
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


def build_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights."""
    model = instantiate(ckpt["model"], _convert_="all")
    model.load_state_dict(ckpt["state_dict"])
    return model


def check_compatible(spec: dict[str, Any], expected: dict[str, Any], what: str, path: str) -> None:
    """Raise a clear error when a checkpoint's architecture or class count differs from config."""
    for key in ("arch", "num_classes"):
        if spec.get(key) != expected.get(key):
            raise ConKDError(
                f"{what} checkpoint {path} was built with {key}={spec.get(key)!r}, but this run "
                f"expects {key}={expected.get(key)!r}; choose the matching model or checkpoint"
            )
