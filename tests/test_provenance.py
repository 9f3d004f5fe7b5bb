"""The provenance table: every shipped config key is tagged, group choices resolve, and what
resume, the teacher-cache key and the sweep warning derive from it."""

from __future__ import annotations

import itertools

import pytest
from omegaconf import OmegaConf

from conkd.nested import flatten
from conkd.provenance import (
    OPERATIONAL,
    RESULT,
    TEACHER,
    TEACHER_DIGEST,
    effect,
    tag,
    teacher_values,
    untagged,
    varying_cache_fields,
)
from conkd.resume import config_changes
from tests.conftest import ROOT


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


def compositions() -> list[list[str]]:
    """train.yaml with each dataset and each experiment (or none), and each option of the other
    groups on the defaults: together every key the shipped configs can hold."""
    runs = [
        [f"dataset={d}", *([f"experiment={e}"] if e else [])]
        for d, e in itertools.product(options("dataset"), [None, *options("experiment")])
    ]
    for group in ("model", "loss", "optimizer", "scheduler", "hparams_search"):
        runs += [[f"{group}={name}"] for name in options(group)]
    return runs


def test_every_config_key_is_tagged(compose_cfg) -> None:
    keys: set[str] = set()
    for overrides in compositions():
        cfg = compose_cfg(overrides)
        keys |= set(flatten(OmegaConf.to_container(cfg, resolve=False)))
    assert len(keys) > 100  # the composition really reached the groups
    assert untagged(keys) == [], "tag these keys in conkd/provenance.py TABLE"


def test_longest_prefix_wins_and_group_choices_resolve() -> None:
    assert tag("dataset.source.root") is TEACHER_DIGEST
    assert tag("dataset.source.verify") is OPERATIONAL  # longer than dataset.source
    assert tag("dataset.sourcery") is None  # prefixes match whole components only
    assert tag("nothing.like.this") is None and effect("nothing.like.this") is RESULT
    # a group choice (or any node) changes the most of what it holds
    assert effect("dataset") is TEACHER  # dataset=... swaps the augmentation too
    assert effect("dataset.decode") is TEACHER_DIGEST
    assert effect("model@teacher") is TEACHER_DIGEST  # the `teacher` node
    assert effect("loss") is RESULT and effect("model") is RESULT
    assert effect("+dataset.decode.workers") is OPERATIONAL


def test_sweep_warning_follows_the_teacher_tags() -> None:
    swept = [
        "dataset.decode.workers",
        "dataset.decode.verify",
        "dataset.source.verify",
        "dataset.source.download",
        "dataset.num_workers",
        "dataset.eval_batch_size",
        "loss.alpha",
        "optimizer.lr",
        "+dataset.augment.scale_min",
        "teacher_ckpt",
        "dataset",
        "model@teacher",
        "trainer.epochs",
    ]
    assert varying_cache_fields(swept) == [
        "dataset",
        "dataset.augment.scale_min",
        "model@teacher",
        "teacher_ckpt",
        "trainer.epochs",
    ]


def test_cache_key_holds_the_raw_teacher_values(compose_cfg) -> None:
    for name in options("dataset"):
        cfg = compose_cfg([f"dataset={name}"])
        values = teacher_values(flatten(OmegaConf.to_container(cfg, resolve=False)))
        augment = {k for k in values if k.startswith("dataset.augment.")}
        assert augment == {f"dataset.augment.{k}" for k in cfg.dataset.augment}
        mix = {k for k in values if k.startswith("dataset.mix.")}
        assert mix == {f"dataset.mix.{k}" for k in cfg.dataset.mix}  # what both networks see
        assert set(values) - augment - mix == {
            "seed",
            "dataset.batch_size",
            "trainer.epochs",
            "trainer.max_steps_per_epoch",
            "trainer.precision",
            "trainer.channels_last",
        }


@pytest.mark.parametrize(
    "key",
    [
        "resume",
        "paths.output_dir",
        "mlflow.experiment_name",
        "optuna.trial",
        "trainer.progress",
        "trainer.checkpoint_every_steps",
        "trainer.checkpoint_background",
        "teacher_cache.dir",
        "teacher_cache.max_gb",
        "dataset.num_workers",
        "dataset.decode.dir",
        "dataset.decode.workers",
        "dataset.decode.progress",
        "dataset.decode.verify",
        "dataset.source.download",
        "dataset.source.verify",
    ],
)
def test_resume_crosses_operational_keys(key: str) -> None:
    assert config_changes({key: 1}, {key: 2}) == []


@pytest.mark.parametrize(
    "key",
    [
        "seed",
        "stage",
        "optimizer.lr",
        "loss.alpha",
        "model.arch",
        "teacher.arch",
        "teacher_ckpt",
        "teacher_cache.enabled",
        "trainer.epochs",
        "trainer.device",
        "dataset.root",
        "dataset.source.size",
        "dataset.augment.flip",
        "dataset.eval_batch_size",
        "dataset.decode.enabled",
        "never.tagged",
    ],
)
def test_resume_refuses_keys_that_change_a_number(key: str) -> None:
    assert config_changes({key: 1}, {key: 2}) == [f"{key}: 1 -> 2"]
