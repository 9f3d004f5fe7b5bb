"""The frozen teacher: which checkpoint (a path, a registry URI, or the dataset's registered
teacher), checked against the run, and turned into the loop's teacher function.

Teachers are registered under the *identity* of their dataset (``conkd-teacher-<identity>``,
e.g. ``conkd-teacher-digits`` or ``conkd-teacher-imagenette-1a2b3c4d`` for a class-folder tree),
so ``teacher_ckpt=auto`` finds the teacher trained on the same data and never one of another
dataset that merely has as many classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from conkd import checkpoint as ckpt_io
from conkd.errors import ConKDError
from conkd.tracking import fetch_registered_checkpoint

log = logging.getLogger("conkd")

#: ``teacher_ckpt`` value that picks the registered teacher of the run's dataset.
AUTO = "auto"
#: Registry alias that ``teacher_ckpt=auto`` reads and teacher runs set by default.
DEFAULT_ALIAS = "current"


def registry_name(identity: str) -> str:
    """The registered-model name of the teacher of dataset ``identity``."""
    return f"conkd-teacher-{identity}"


@dataclass
class TeacherSource:
    """Where a teacher came from: the user's value, the resolved source and the run's tags."""

    requested: str
    source: str
    checkpoint: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def auto(self) -> bool:
        return self.requested == AUTO


def resolve_checkpoint(
    teacher_ckpt: str,
    identity: str,
    tracking_uri: str | None,
    download_dir: Path,
    train_hint: str,
) -> TeacherSource:
    """Read the teacher checkpoint named by ``teacher_ckpt``: a path, ``models:/NAME@ALIAS`` /
    ``models:/NAME/N``, or ``auto`` (``models:/conkd-teacher-<identity>@current``).

    ``train_hint`` is the command that trains the missing teacher, for the error message.
    """
    requested = str(teacher_ckpt)
    source = requested
    if requested == AUTO:
        if tracking_uri is None:
            raise ConKDError(
                "teacher_ckpt=auto looks up the dataset's teacher in the MLflow registry, but "
                "mlflow.enabled=false; set teacher_ckpt=PATH to a teacher's checkpoints/best.pt"
            )
        source = f"models:/{registry_name(identity)}@{DEFAULT_ALIAS}"
    tags = {"teacher": source}
    path = source
    if source.startswith("models:/"):
        try:
            fetched, run_id = fetch_registered_checkpoint(source, tracking_uri or "", download_dir)
        except ConKDError as err:
            if requested != AUTO:
                raise
            raise ConKDError(
                f"no teacher is registered for dataset {identity!r} ({source}); train one "
                f"first: `{train_hint}`, or set teacher_ckpt=PATH"
            ) from err
        path = str(fetched)
        tags["teacher.run_id"] = run_id
    ckpt = ckpt_io.load_checkpoint(path)
    if ckpt.get("run_id"):
        tags.setdefault("teacher.run_id", ckpt["run_id"])
    if requested == AUTO:
        tags["teacher.auto"] = "true"
    return TeacherSource(requested, source, ckpt, tags)


def check_teacher(
    found: TeacherSource, expected: dict[str, Any], classes: list[str], train_hint: str
) -> None:
    """The teacher checkpoint's architecture, class count and class names match this run."""
    hint = "choose the matching model@teacher or checkpoint"
    if found.auto:
        hint = f"train a matching teacher: {train_hint}"
    ckpt_io.check_compatible(found.checkpoint, expected, classes, "teacher", found.source, hint)


def build_teacher(found: TeacherSource) -> nn.Module:
    """The teacher network with its weights, frozen by the caller (checked beforehand)."""
    model = ckpt_io.instantiate_model(found.checkpoint["model"], "teacher model")
    try:
        model.load_state_dict(found.checkpoint["state_dict"])
    except RuntimeError as err:
        raise ConKDError(
            f"teacher checkpoint {found.source} does not fit its model: {err}"
        ) from err
    return model


#: Config keys (and prefixes) that determine the cached teacher outputs (see
#: :func:`conkd.run.teacher_function`); a sweep that varies one builds a cache per value.
CACHE_KEY_FIELDS = (
    "seed",
    "teacher_ckpt",
    "teacher.",
    "model@teacher",
    "dataset",
    "trainer.epochs",
    "trainer.max_steps_per_epoch",
    "trainer.precision",
    "trainer.channels_last",
)
#: Dataset keys that do not change a single teacher output.
_NOT_KEY_FIELDS = ("dataset.num_workers", "dataset.eval_batch_size", "dataset.pin_memory")


def varying_cache_fields(swept: list[str]) -> list[str]:
    """Those of the swept config keys that are part of the teacher cache's key."""

    def is_key(name: str) -> bool:
        if name.startswith(_NOT_KEY_FIELDS) or name.startswith("dataset.decode.dir"):
            return False
        return any(
            name == f
            or name.startswith(f if f.endswith(".") else f + ".")
            or (f.endswith(".") and name.startswith(f))
            for f in CACHE_KEY_FIELDS
        ) or name in ("dataset",)

    return sorted({k.lstrip("+~") for k in swept if is_key(k.lstrip("+~"))})
