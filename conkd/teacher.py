"""The frozen teacher: which checkpoint (a path, a registry URI, or the dataset's registered
teacher), checked against the run, and turned into the loop's teacher function: the cache of its
outputs per augmented view (:mod:`conkd.teacher_cache`, built now if missing) or the online
network. The run's config reaches this module as plain :class:`TeacherSettings` (filled by
:mod:`conkd.run`); the cache's key comes from :func:`cache_fields`, whose config part is what
:mod:`conkd.provenance` tags as changing the teacher's outputs.

Teachers are registered under the *identity* of their dataset (``conkd-teacher-<identity>``,
e.g. ``conkd-teacher-digits`` or ``conkd-teacher-imagenette-1a2b3c4d`` for a class-folder tree),
so ``teacher_ckpt=auto`` finds the teacher trained on the same data and never one of another
dataset that merely has as many classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from conkd import checkpoint as ckpt_io
from conkd.engine import TeacherFn, online_teacher
from conkd.errors import ConKDError
from conkd.loaders import keep_resident
from conkd.teacher_cache import TeacherCache, state_dict_digest
from conkd.tracking import fetch_registered_checkpoint

if TYPE_CHECKING:
    from conkd.data import DataModule

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


@dataclass(frozen=True)
class CachePolicy:
    """``teacher_cache.*``: whether the teacher is served from its cache, and where caches live."""

    enabled: bool | str  # True, False or "auto": on while the cache fits max_gb
    directory: Path
    max_gb: float
    resident: bool | str = "auto"  # in device memory (conkd.loaders.keep_resident)

    def use(self, size_gb: float) -> bool:
        """Whether a cache of ``size_gb`` serves the teacher (auto: only while it fits)."""
        if self.enabled == "auto":
            if size_gb > self.max_gb:
                log.info(
                    "teacher cache off: it would take %.1f GB > teacher_cache.max_gb=%s",
                    size_gb,
                    self.max_gb,
                )
            return size_gb <= self.max_gb
        if isinstance(self.enabled, bool):
            return self.enabled
        raise ConKDError(f"teacher_cache.enabled must be auto, true or false, got {self.enabled!r}")


@dataclass(frozen=True)
class TeacherSettings:
    """What a run asks of its teacher, as plain values (:mod:`conkd.run` reads the config)."""

    checkpoint: str  # teacher_ckpt: a path, models:/NAME@ALIAS or auto
    spec: Mapping[str, Any]  # the model the run expects (model@teacher, the data's classes)
    tracking_uri: str | None  # the registry of models:/ and auto; None with MLflow off
    download_dir: Path  # where a registered checkpoint is fetched to
    hint: str  # the command that trains a missing teacher (for error messages)
    cache: CachePolicy
    epochs: int
    max_steps: int | None
    precision: str
    channels_last: bool
    progress: bool
    world: int = 1  # torchrun processes (a mixed batch's partners are within a rank's share)
    #: The config values the teacher's outputs depend on as they are
    #: (:func:`conkd.provenance.teacher_values` of the resolved config).
    key_values: Mapping[str, Any] = field(default_factory=dict)


class ServedTeacher(NamedTuple):
    """The loop's teacher function, the run's teacher tags and the cache's setup metrics."""

    fn: TeacherFn
    tags: dict[str, str]
    metrics: dict[str, float]


def teacher_function(
    settings: TeacherSettings, data: DataModule, outputs: Sequence[str], device: torch.device
) -> ServedTeacher:
    """The loop's teacher for ``outputs``: the cache of its outputs per augmented view (built
    now if missing; the network is then never loaded again) or the online frozen network."""
    found = resolve_checkpoint(
        settings.checkpoint,
        data.identity,
        settings.tracking_uri,
        settings.download_dir,
        settings.hint,
    )
    check_teacher(found, dict(settings.spec), data.classes, settings.hint)
    log.info("teacher: %s%s", found.source, " (teacher_ckpt=auto)" if found.auto else "")
    memory = torch.channels_last if settings.channels_last else torch.contiguous_format

    def network() -> nn.Module:
        return build_teacher(found).to(device, memory_format=memory)

    outputs = list(outputs)
    size_gb = estimate_cache_bytes(settings, data, outputs) / 1e9
    if not settings.cache.use(size_gb):
        return ServedTeacher(online_teacher(network()), {**found.tags, "teacher.cache": "off"}, {})
    if data.mixer is not None and settings.world > 1:
        # each rank mixes its share of the batch with partners from that share: the whole
        # batches a cache is built from pair other images
        raise ConKDError(
            "dataset.mix under torchrun needs the online teacher: set teacher_cache.enabled=false"
        )
    fields = cache_fields(found, data, outputs, settings.key_values)

    def build(directory: Path) -> TeacherCache:
        loaders = data.loaders(device)  # whole batches: the cache serves every rank
        return TeacherCache.build(
            directory, network(), loaders.train, loaders.eval("val"),
            epochs=settings.epochs, max_steps=settings.max_steps, outputs=outputs,
            n_train=len(data.train), n_val=len(data.val), device=device,
            precision=settings.precision, channels_last=settings.channels_last, fields=fields,
            progress=settings.progress, mix=data.mixer,
        )  # fmt: skip

    cache, built = TeacherCache.ensure(settings.cache.directory, fields, build)
    if keep_resident(settings.cache.resident, device, cache.size_bytes):
        cache.to_device(device)
    what = f"built in {cache.build_seconds:.1f} s" if built else "reused"
    log.info("teacher cache: %s (%s, %.1f MB)", cache.directory, what, cache.size_bytes / 2**20)
    tags = {**found.tags, "teacher.cache": str(cache.directory), "teacher.cache_built": str(built)}
    metrics = {"teacher_cache/size_mb": cache.size_bytes / 2**20}
    if built:
        metrics["teacher_cache/build_s"] = cache.build_seconds
    return ServedTeacher(cache, tags, metrics)


def cache_fields(
    found: TeacherSource, data: DataModule, outputs: Sequence[str], key_values: Mapping[str, Any]
) -> dict[str, Any]:
    """Everything the cached teacher outputs depend on (the cache's key): the weights and the
    model they were saved with, the data's fingerprint and view pipeline, the outputs, and the
    config values :mod:`conkd.provenance` tags ``TEACHER`` (seed, augmentation, batch size,
    epochs, steps per epoch, precision, memory format)."""
    return {
        "teacher_weights": state_dict_digest(found.checkpoint["state_dict"]),
        "teacher_model": found.checkpoint["model"],
        "data": data.fingerprint()["digest"],
        "pipeline": data.pipeline(),
        "outputs": list(outputs),
        "config": dict(key_values),
    }


def estimate_cache_bytes(settings: TeacherSettings, data: DataModule, outputs: list[str]) -> int:
    """fp16 bytes of a cache: one row per (epoch, sample seen) and validation sample."""
    dims = {"logits": data.num_classes, "projection": settings.spec.get("projection_dim") or 128}
    width = sum(dims.get(o, 2048) for o in outputs)  # embeddings: at most a ResNet-50's 2048
    seen = len(data.train)
    if settings.max_steps:
        seen = min(seen, settings.max_steps * data.batch_size)
    return 2 * width * (settings.epochs * seen + len(data.val))
