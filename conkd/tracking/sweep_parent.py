"""A sweep's MLflow parent run: created once per multirun (or study), its trials nested under it.

Jobs find the parent through a file in the sweep folder (:data:`PARENT_RUN_FILE`; works for
in-process and joblib launchers alike). An Optuna sweep that is re-run to resume its study
reuses the parent run of that study, so the children of all attempts sit under one parent; of
workers that start together and each create one, all settle on the oldest.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conkd.tracking.stale import mark_killed, stale_runs
from conkd.tracking.store import (
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    get_or_create_experiment,
    log_params_batched,
    open_client,
    prepare_store,
    safe_key,
    with_retry,
)

log = logging.getLogger("conkd")

#: The file in the sweep folder that holds the parent run's id.
PARENT_RUN_FILE = "mlflow_parent_run_id"


def sweep_parent_run_id(sweep_dir: str | Path | None) -> str | None:
    """The parent run a sweep's callback created, read from the sweep folder."""
    if not sweep_dir:
        return None
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None


@dataclass(eq=False)
class SweepParent:
    """The parent run of a sweep in experiment ``experiment_id`` (``run_id`` once there is one)."""

    client: Any
    experiment_id: str
    run_id: str | None = None

    @classmethod
    def open(
        cls, tracking_uri: str, experiment_name: str, artifact_location: str | None
    ) -> SweepParent:
        """The sweep's experiment, its store prepared once here in the sweep's own process
        (parallel jobs must not race to create the database)."""
        prepare_store(tracking_uri)
        client = open_client(tracking_uri)
        return cls(client, get_or_create_experiment(client, experiment_name, artifact_location))

    def study_parents(self, study: str) -> list[Any]:
        """The study's parent runs, oldest first (run id breaks a tie)."""
        runs = with_retry(
            self.client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.`sweep.study` = '{study}' and tags.`sweep.parent` = 'true'",
            max_results=100,
        )
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def continue_study(self, study: str) -> bool:
        """Reuse the study's parent run (RUNNING again; children whose process the interruption
        killed are closed KILLED); False when the study has none."""
        found = self.study_parents(study)
        if not found:
            return False
        self.run_id = found[0].info.run_id
        with_retry(self.client.update_run, self.run_id, status="RUNNING")
        self._close_interrupted_children()
        log.info("MLflow: resuming sweep parent run %s (study %s)", self.run_id, study)
        return True

    def create(
        self, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any], sweep_dir: Path
    ) -> None:
        """A new parent run with ``tags`` and ``params``; its id goes to the sweep folder at
        once, before anything can fail."""
        run = with_retry(self.client.create_run, self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.publish(sweep_dir)
        log_params_batched(self.client, self.run_id, params)

    def settle(self, study: str, own: str) -> str:
        """Workers of one study started together may each have created a parent: every one of
        them adopts the oldest and deletes its own, so all trials nest under one run."""
        oldest = self.study_parents(study)[0].info.run_id
        if oldest != own:
            with_retry(self.client.delete_run, own)
            log.info("MLflow: another worker created sweep parent %s first; using it", oldest)
        return oldest

    def publish(self, sweep_dir: Path) -> None:
        """Tell the sweep's jobs which run to nest under (:func:`sweep_parent_run_id`)."""
        assert self.run_id is not None
        (sweep_dir / PARENT_RUN_FILE).write_text(self.run_id)

    def _close_interrupted_children(self) -> None:
        """Child runs still RUNNING whose process is gone (the interruption killed them): mark
        them KILLED. Children of live processes (other workers of the study) stay."""
        stale = stale_runs(self.client, [self.experiment_id], parent_run_id=self.run_id)
        mark_killed(self.client, stale)
        for run, why in stale:
            log.info("MLflow: closed interrupted trial run %s as KILLED (%s)", run.info.run_id, why)

    def children(self) -> list[Any]:
        """The parent's child runs (the sweep's trials, every attempt)."""
        return with_retry(
            self.client.search_runs,
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'",
            max_results=5000,
        )

    def record_summary(
        self,
        metrics: Mapping[str, float],
        params: Mapping[str, Any],
        tags: Mapping[str, Any],
        files: list[Path],
    ) -> None:
        """The sweep's summary on the parent run; ``files`` that exist go under ``sweep/``.
        Params are immutable: a resumed sweep keeps the first ones, while tags stay current."""
        from mlflow.entities import Metric, Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        batch = {
            "metrics": [Metric(safe_key(k), v, 0, 0) for k, v in metrics.items()],
            "params": [
                Param(safe_key(k), str(v)[:MAX_PARAM_LEN])
                for k, v in params.items()
                if safe_key(k) not in existing
            ],
            "tags": [RunTag(safe_key(k), str(v)[:MAX_TAG_LEN]) for k, v in tags.items()],
        }
        with_retry(self.client.log_batch, self.run_id, **batch)
        for f in files:
            if f.is_file():
                with_retry(self.client.log_artifact, self.run_id, str(f), "sweep")

    def close(self, status: str) -> None:
        """End the parent run once (later calls do nothing)."""
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        with_retry(self.client.set_terminated, run_id, status=status)
