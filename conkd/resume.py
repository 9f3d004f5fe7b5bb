"""Resume: find a run's last good checkpoint and check it belongs to the same run.

``resume=auto`` (the default) continues a run whose output folder holds a resumable
``checkpoints/last.pt``: same MLflow run, same data position, same RNG states, so on the CPU the
result is bit-identical to an uninterrupted run. ``resume=never`` refuses such a folder.
``resume=PATH`` (a run folder, its ``checkpoints/`` or a ``last.pt``) starts this run from
another run's checkpoint, in a new MLflow run (the sweeper uses it for re-queued trials).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conkd.checkpoint import LAST, PREVIOUS, latest_resumable
from conkd.errors import ConKDError
from conkd.nested import flatten
from conkd.provenance import operational
from conkd.views import VERSION as VIEWS

AUTO, NEVER = "auto", "never"

#: Teacher tags that name the teacher itself (not how its outputs are served).
TEACHER_KEYS = ("teacher", "teacher.run_id")


def _checkpoint_dir(path: Path) -> Path:
    if path.is_file() or path.name in (LAST, PREVIOUS):
        return path.parent
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def find(mode: str, out_dir: Path) -> tuple[dict[str, Any] | None, bool]:
    """The checkpoint to resume from and whether it is this folder's own run (continue its
    MLflow run) or another's (``resume=PATH``); ``(None, False)`` for a fresh start."""
    ckpt_dir = out_dir / "checkpoints"
    held = [n for n in ("best.pt", LAST, PREVIOUS) if (ckpt_dir / n).exists()]
    if (out_dir / "metrics.json").exists() and held:
        raise ConKDError(
            f"{out_dir} holds a finished run (metrics.json); choose another hydra.run.dir"
        )
    if mode == NEVER:
        if held:
            raise ConKDError(
                f"{ckpt_dir} already holds checkpoints of an earlier run; choose another "
                "hydra.run.dir, or resume=auto to continue that run"
            )
        return None, False
    if mode == AUTO:
        ckpt = latest_resumable(ckpt_dir) if held else None
        if held and ckpt is None:
            raise ConKDError(
                f"{ckpt_dir} holds checkpoints but none to resume from (no readable last.pt "
                "with a training state); choose another hydra.run.dir"
            )
        return ckpt, ckpt is not None
    if held:
        raise ConKDError(
            f"resume={mode}: this run's folder {ckpt_dir} already holds checkpoints; "
            "choose another hydra.run.dir"
        )
    source = _checkpoint_dir(Path(mode).expanduser())
    ckpt = latest_resumable(source)
    if ckpt is None:
        raise ConKDError(
            f"resume={mode}: no resumable checkpoint in {source}; resume takes auto, never, or "
            "a run folder / its last.pt"
        )
    return ckpt, False


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs and changes what the run computes
    (all but the operational keys of :data:`conkd.provenance.TABLE`)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if not operational(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def check_same_run(
    ckpt: Mapping[str, Any],
    config: Mapping[str, Any],
    teacher_tags: Mapping[str, str],
    views: int = VIEWS,
) -> None:
    """Refuse to continue a checkpoint under another config, another teacher or another
    definition of the augmented views (:data:`conkd.views.VERSION`): the result would be
    neither run."""
    if ckpt.get("views") != views:
        raise ConKDError(
            f"cannot resume from {ckpt['path']}: it was written by a ConKD whose augmented views "
            f"differ (view definition {ckpt.get('views')!r}, now {views}); start the run anew "
            "in another hydra.run.dir (resume=never)"
        )
    changes = config_changes(ckpt.get("config") or {}, config)
    if changes:
        shown = "; ".join(changes[:5]) + (
            f" (+{len(changes) - 5} more)" if len(changes) > 5 else ""
        )
        raise ConKDError(
            f"cannot resume from {ckpt['path']}: it was written with other settings ({shown}); "
            "re-run with the same overrides, or choose another hydra.run.dir (resume=never)"
        )
    stored = ckpt.get("teacher_tags") or {}
    for key in TEACHER_KEYS:
        if stored.get(key) != teacher_tags.get(key):
            raise ConKDError(
                f"cannot resume from {ckpt['path']}: it distilled from {key}="
                f"{stored.get(key)!r}, this run would use {teacher_tags.get(key)!r}; pass "
                f"teacher_ckpt={stored.get('teacher')} to continue it"
            )
