"""Hydra callback: one MLflow parent run per multirun, with the sweep's summary and plots.

Jobs find the parent through a file in the sweep folder (works for in-process and joblib
launchers alike) and nest their runs under it. An Optuna sweep that is re-run to resume its study
reuses the parent run of that study, so the children of all attempts sit under one parent.
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

from conkd.tracking import (
    PARENT_RUN_FILE,
    get_or_create_experiment,
    log_params_batched,
    prepare_store,
    resolve_store,
    with_retry,
)

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
    from conkd.teacher import varying_cache_fields

    varied = varying_cache_fields(swept_keys(config))
    if varied and config.get("teacher_cache", {}).get("enabled") is not False:
        log.warning(
            "teacher cache: this sweep varies %s, which the cached teacher outputs depend on; "
            "each value builds its own cache",
            ", ".join(varied),
        )


class MLflowSweepCallback(Callback):
    """Creates the parent run before any job starts and fills in the summary at the end."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        warn_cache_key_sweep(config)
        if not config.mlflow.enabled:
            return
        import mlflow

        uri, artifacts = resolve_store(config.paths.root_dir, config.mlflow.tracking_uri)
        prepare_store(uri)  # once, in the parent: parallel jobs must not race to create the DB
        self.client = mlflow.MlflowClient(uri)
        exp_id = get_or_create_experiment(self.client, config.mlflow.experiment_name, artifacts)
        sweeper = config.hydra.sweeper
        study, storage = sweeper.get("study_name"), sweeper.get("storage")
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)

        if study and storage:
            found = self._study_parents(exp_id, study)
            if found:
                self.run_id = found[0].info.run_id
                with_retry(self.client.update_run, self.run_id, status="RUNNING")
                self._close_interrupted_children(exp_id)
                log.info("MLflow: resuming sweep parent run %s (study %s)", self.run_id, study)
        if self.run_id is None:
            self.run_id = self._create_parent(config, exp_id, sweep_dir)
            if study and storage:
                self.run_id = self._settle_parent(exp_id, study, self.run_id)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.run_id)
        atexit.register(self._close, "FAILED")

    def _study_parents(self, exp_id: str, study: str) -> list[Any]:
        """The study's parent runs, oldest first (run id breaks a tie)."""
        runs = with_retry(
            self.client.search_runs,
            [exp_id],
            filter_string=f"tags.`sweep.study` = '{study}' and tags.`sweep.parent` = 'true'",
            max_results=100,
        )
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _settle_parent(self, exp_id: str, study: str, own: str) -> str:
        """Workers of one study started together may each have created a parent: every one of
        them adopts the oldest and deletes its own, so all trials nest under one run."""
        oldest = self._study_parents(exp_id, study)[0].info.run_id
        if oldest != own:
            with_retry(self.client.delete_run, own)
            log.info("MLflow: another worker created sweep parent %s first; using it", oldest)
        return oldest

    def _create_parent(self, config: DictConfig, exp_id: str, sweep_dir: Path) -> str:
        """A new parent run with the sweep's command, overrides and search space."""
        sweeper = config.hydra.sweeper
        study, storage = sweeper.get("study_name"), sweeper.get("storage")
        tags = {
            "sweep.parent": "true",
            "sweep.id": str(sweep_dir),
            "command": shlex.join(sys.argv),
            "overrides": " ".join(config.hydra.overrides.task),
            "sweeper": str(sweeper.get("_target_", "")),
        }
        if study:
            from conkd.sweep import describe_storage

            tags.update({"sweep.study": study, "sweep.storage": describe_storage(storage)})
        run = with_retry(
            self.client.create_run, exp_id, run_name=f"sweep {study or sweep_dir.name}", tags=tags
        )
        (sweep_dir / PARENT_RUN_FILE).write_text(run.info.run_id)  # before anything can fail
        params = {
            f"override.{o.split('=', 1)[0]}": o.split("=", 1)[-1]
            for o in config.hydra.overrides.task
        }
        params.update({f"search.{k}": v for k, v in (sweeper.get("params") or {}).items()})
        for key in ("n_trials", "n_jobs", "direction", "max_failure_rate"):
            if key in sweeper:
                params[f"sweeper.{key}"] = sweeper[key]
        log_params_batched(self.client, run.info.run_id, params)
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        from conkd.sweep import summarize_sweep

        try:
            summarize_sweep(self.client, self.run_id, config, Path(config.hydra.sweep.dir))
        finally:
            self._close("FINISHED")

    def _close_interrupted_children(self, exp_id: str) -> None:
        """Child runs still RUNNING whose process is gone (the interruption killed them): mark
        them KILLED. Children of live processes (other workers of the study) stay."""
        from conkd.runs import close, stale_runs

        stale = stale_runs(self.client, [exp_id], parent_run_id=self.run_id)
        close(self.client, stale)
        for run, why in stale:
            log.info("MLflow: closed interrupted trial run %s as KILLED (%s)", run.info.run_id, why)

    def _close(self, status: str) -> None:
        """End the parent run once; at interpreter exit without on_multirun_end it is FAILED."""
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        with_retry(self.client.set_terminated, run_id, status=status)
