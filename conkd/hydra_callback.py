"""The Hydra callback of every multirun: a sweep's start and end, around all of its jobs.

At the start it says when the sweep varies what the teacher cache is keyed by, and makes (or,
for a resumed Optuna study, reuses) the MLflow parent run its jobs nest under
(:class:`~conkd.tracking.SweepParent`). At the end it writes the sweep's summary, plots and
re-run command (:func:`conkd.sweep.summarize_sweep`) and ends the parent run. Configured in
``conf/hydra/default.yaml``.
"""

from __future__ import annotations

import atexit
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from conkd.tracking import SweepParent, resolve_store

log = logging.getLogger("conkd")


def swept_keys(config: DictConfig) -> list[str]:
    """Config keys a multirun varies: the sweeper's search space and comma-list overrides."""
    keys = list((config.hydra.sweeper.get("params") or {}).keys())
    for o in config.hydra.overrides.task:
        key, _, value = o.partition("=")
        if "," in value or value.startswith(("choice(", "range(", "interval(", "tag(", "glob(")):
            keys.append(key)
    return keys


def warn_cache_key_sweep(config: DictConfig) -> None:
    """Say in one line when the sweep varies what the teacher cache is keyed by: each value
    then computes its own teacher outputs instead of sharing one cache."""
    from conkd.provenance import varying_cache_fields

    varied = varying_cache_fields(swept_keys(config))
    if varied and config.get("teacher_cache", {}).get("enabled") is not False:
        log.warning(
            "teacher cache: this sweep varies %s, which the cached teacher outputs depend on; "
            "each value builds its own cache",
            ", ".join(varied),
        )


def parent_tags(config: DictConfig, sweep_dir: Path) -> dict[str, str]:
    """The parent run's tags: the sweep's folder, command, overrides, sweeper and study."""
    sweeper = config.hydra.sweeper
    study = sweeper.get("study_name")
    tags = {
        "sweep.parent": "true",
        "sweep.id": str(sweep_dir),
        "command": shlex.join(sys.argv),
        "overrides": " ".join(config.hydra.overrides.task),
        "sweeper": str(sweeper.get("_target_", "")),
    }
    if study:
        from conkd.sweep import describe_storage

        tags.update(
            {"sweep.study": study, "sweep.storage": describe_storage(sweeper.get("storage"))}
        )
    return tags


def parent_params(config: DictConfig) -> dict[str, Any]:
    """The parent run's params: the overrides, the search space and the sweeper's budget."""
    sweeper = config.hydra.sweeper
    params: dict[str, Any] = {
        f"override.{o.split('=', 1)[0]}": o.split("=", 1)[-1] for o in config.hydra.overrides.task
    }
    params.update({f"search.{k}": v for k, v in (sweeper.get("params") or {}).items()})
    for key in ("n_trials", "n_jobs", "direction", "max_failure_rate"):
        if key in sweeper:
            params[f"sweeper.{key}"] = sweeper[key]
    return params


class SweepCallback(Callback):
    """Creates the parent run before any job starts and fills in the summary at the end."""

    def __init__(self) -> None:
        self.parent: SweepParent | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        warn_cache_key_sweep(config)
        if not config.mlflow.enabled:
            return
        uri, artifacts = resolve_store(config.paths.root_dir, config.mlflow.tracking_uri)
        parent = SweepParent.open(uri, config.mlflow.experiment_name, artifacts)
        sweeper = config.hydra.sweeper
        study = sweeper.get("study_name") if sweeper.get("storage") else None
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not (study and parent.continue_study(study)):
            name = f"sweep {sweeper.get('study_name') or sweep_dir.name}"
            parent.create(name, parent_tags(config, sweep_dir), parent_params(config), sweep_dir)
            if study:
                assert parent.run_id is not None
                parent.run_id = parent.settle(study, parent.run_id)
        parent.publish(sweep_dir)
        self.parent = parent
        # at interpreter exit without on_multirun_end the parent run is FAILED
        atexit.register(parent.close, "FAILED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None or self.parent.run_id is None:
            return
        from conkd.sweep import summarize_sweep

        try:
            summarize_sweep(self.parent, config, Path(config.hydra.sweep.dir))
        finally:
            self.parent.close("FINISHED")
