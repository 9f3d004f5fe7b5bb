"""What each config key changes: the one table that resume, the teacher cache and sweeps read.

Every key of ``conf/train.yaml`` (dotted, e.g. ``dataset.augment.scale_min``) is tagged, by its
longest matching prefix in :data:`TABLE`, with an :class:`Effect`:

* ``OPERATIONAL``: never changes a number (where files go, logging, progress bars, workers);
  a run may resume under another value (:mod:`conkd.resume`);
* ``RESULT``: changes what the run computes, not what the frozen teacher outputs;
* ``TEACHER``: changes the teacher's outputs on the student's views; its raw value is part of the
  teacher cache's key (:func:`teacher_values`);
* ``TEACHER_DIGEST``: changes the teacher's outputs too, but enters the key through something
  derived from it: ``teacher_ckpt`` through the weights digest and the checkpoint's model, the
  data's files and split through the data fingerprint, image and decode sizes through
  :meth:`conkd.data.DataModule.pipeline`. Its raw value stays out of the key, so two spellings
  of one thing (two paths to one checkpoint) share a cache.

Derived from it: the keys resume ignores (the operational ones), the cache key's raw config
values (the ``TEACHER`` ones) and the sweep warning (swept keys of either teacher kind split the
cache, :func:`varying_cache_fields`). A key the table does not tag counts as ``RESULT`` (a run
never resumes across it); ``tests/test_provenance.py`` fails on any untagged key of the shipped
configs, so a new key is tagged when it is added.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any


class Effect(enum.Enum):
    """What changing a config key changes (ordered from least to most, see :func:`effect`)."""

    OPERATIONAL = 0
    RESULT = 1
    TEACHER_DIGEST = 2
    TEACHER = 3

    @property
    def changes_teacher(self) -> bool:
        """Whether the teacher's outputs (and so the cache they are stored in) change."""
        return self in (Effect.TEACHER, Effect.TEACHER_DIGEST)


OPERATIONAL, RESULT = Effect.OPERATIONAL, Effect.RESULT
TEACHER, TEACHER_DIGEST = Effect.TEACHER, Effect.TEACHER_DIGEST

#: Dotted key prefix -> (effect, why). The longest prefix that matches whole components wins.
TABLE: dict[str, tuple[Effect, str]] = {
    # the run itself
    "stage": (RESULT, "teacher, student or probe training"),
    "objective": (RESULT, "picks the best checkpoint, which is tested"),
    "objective_mode": (RESULT, "picks the best checkpoint, which is tested"),
    "seed": (TEACHER, "seeds the views (crops, flips) the teacher sees, and the student"),
    "resume": (OPERATIONAL, "which checkpoint to continue, not what is computed"),
    "optuna": (OPERATIONAL, "the sweeper's trial number"),
    "paths": (OPERATIONAL, "where files go"),
    "mlflow": (OPERATIONAL, "what is logged where"),
    "hydra": (OPERATIONAL, "Hydra's own settings (run folders, launcher, sweeper)"),
    "model": (RESULT, "the trained network"),
    "loss": (RESULT, "the objective"),
    "optimizer": (RESULT, "the optimizer"),
    "scheduler": (RESULT, "the learning-rate schedule"),
    "probe": (RESULT, "the probed checkpoint and the head"),
    # the teacher
    "teacher_ckpt": (TEACHER_DIGEST, "the weights digest and the checkpoint's model spec"),
    "teacher": (TEACHER_DIGEST, "must match teacher_ckpt, whose model spec is in the key"),
    "teacher_cache.enabled": (RESULT, "the cache serves float16-rounded teacher outputs"),
    "teacher_cache.dir": (OPERATIONAL, "where caches go"),
    "teacher_cache.max_gb": (OPERATIONAL, "whether an auto cache is worth its disk"),
    "teacher_cache.resident": (OPERATIONAL, "where the cached rows live; the same rows"),
    # the loop
    "trainer.epochs": (TEACHER, "the epochs of views the cache holds"),
    "trainer.max_steps_per_epoch": (TEACHER, "which batches of an epoch are seen"),
    "trainer.precision": (TEACHER, "the teacher's autocast"),
    "trainer.channels_last": (TEACHER, "the teacher's memory format (other kernels)"),
    "trainer.device": (RESULT, "other kernels; a cache built on one device serves another"),
    "trainer.compile": (RESULT, "other kernels for the trained network"),
    "trainer.compile_mode": (RESULT, "other kernels for the trained network"),
    "trainer.optimizer_kernel": (RESULT, "other kernels for the updates"),
    "trainer.gpu_memory_fraction": (OPERATIONAL, "a cap on this process's GPU memory"),
    "trainer.cudnn_benchmark": (
        OPERATIONAL,
        "which cuDNN kernels run; GPU runs differ in rounding anyway",
    ),
    "trainer.grad_clip": (RESULT, "the updates"),
    "trainer.ema_decay": (RESULT, "the weights validated, tested and kept"),
    "trainer.decay_norms_and_biases": (RESULT, "the updates"),
    "trainer.progress": (OPERATIONAL, "progress bars"),
    "trainer.sync_every_steps": (OPERATIONAL, "how often the host reads the losses"),
    "trainer.checkpoint_every_steps": (OPERATIONAL, "how often last.pt is written"),
    "trainer.checkpoint_background": (OPERATIONAL, "which thread writes the same checkpoints"),
    # the data
    "dataset._target_": (TEACHER_DIGEST, "the data module: its fingerprint and view pipeline"),
    "dataset.name": (OPERATIONAL, "a label (MLflow experiment, logs)"),
    "dataset.root": (TEACHER_DIGEST, "the data fingerprint (files and labels)"),
    "dataset.source": (TEACHER_DIGEST, "the data fingerprint (files and labels)"),
    "dataset.source.download": (OPERATIONAL, "fetches what is missing; the files are the same"),
    "dataset.source.verify": (OPERATIONAL, "checks files before training"),
    "dataset.val_fraction": (TEACHER_DIGEST, "the data fingerprint (the drawn split)"),
    "dataset.split_seed": (TEACHER_DIGEST, "the data fingerprint (the drawn split)"),
    "dataset.image_size": (TEACHER_DIGEST, "the view pipeline"),
    "dataset.batch_size": (TEACHER, "which views share a batch, and how many batches"),
    "dataset.eval_batch_size": (RESULT, "validation batches (evaluation numerics)"),
    "dataset.augment": (TEACHER, "the views"),
    "dataset.mix": (TEACHER, "the mixed batches both networks see"),
    "dataset.num_workers": (OPERATIONAL, "loader processes; views are seeded per sample"),
    "dataset.pin_memory": (OPERATIONAL, "host memory pinning"),
    "dataset.decode.enabled": (TEACHER_DIGEST, "the view pipeline (decoded or PIL)"),
    "dataset.decode.size": (TEACHER_DIGEST, "the view pipeline (decoded side length)"),
    "dataset.decode.dir": (OPERATIONAL, "where decoded arrays go"),
    "dataset.decode.workers": (OPERATIONAL, "decoding processes"),
    "dataset.decode.progress": (OPERATIONAL, "progress bars"),
    "dataset.decode.resident": (OPERATIONAL, "where the decoded rows live; the same rows"),
    "dataset.decode.verify": (OPERATIONAL, "checksums on open"),
}


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def tag(key: str) -> Effect | None:
    """The table's effect for ``key`` by its longest matching prefix; None when untagged."""
    best = max((p for p in TABLE if _matches(key, p)), key=len, default=None)
    return None if best is None else TABLE[best][0]


def config_key(override: str) -> str:
    """The config key a command-line override name sets: ``+dataset.x`` -> ``dataset.x``, a
    group choice ``model@teacher`` -> ``teacher`` (the node it fills), ``dataset`` as is."""
    name = override.lstrip("+~").replace("/", ".")  # hydra/launcher: a group path
    return name.split("@", 1)[1] if "@" in name else name


def effect(key: str) -> Effect:
    """What changing ``key`` (a leaf, a node or a group choice such as ``model@teacher``)
    changes: its tag, or for a node the most that any key inside it changes (``dataset=...``
    swaps the augmentation too); ``RESULT`` for an untagged key, so resume never crosses it."""
    key = config_key(key)
    found = [e for p, (e, _) in TABLE.items() if p.startswith(key + ".")]
    own = tag(key)
    if own is not None:
        found.append(own)
    return max(found, key=lambda e: e.value) if found else RESULT


def untagged(keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` the table does not tag (for the test that keeps it complete)."""
    return sorted(k for k in keys if tag(k) is None)


def teacher_values(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The ``TEACHER`` entries of a flattened resolved config (``{"seed": 0, ...}``): the raw
    values that the teacher cache's key holds."""
    return {k: flat[k] for k in sorted(flat) if effect(k) is TEACHER}


def operational(key: str) -> bool:
    """Whether ``key`` never changes a number (resume may cross it)."""
    return effect(key) is OPERATIONAL


def varying_cache_fields(swept: Iterable[str]) -> list[str]:
    """Those of the swept override names whose values change the teacher's outputs: each value
    then builds (and fills the disk with) its own teacher cache."""
    return sorted({k.lstrip("+~") for k in swept if effect(k).changes_teacher})
