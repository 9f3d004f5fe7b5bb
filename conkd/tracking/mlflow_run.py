"""One training job's MLflow run: created or continued, ended with its status, never lost."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conkd.owner import RUN_TAGS, Owner
from conkd.tracking.base import Shape, Tracker
from conkd.tracking.models import log_network
from conkd.tracking.pending import REPLAY_COMMAND, write_pending
from conkd.tracking.store import (
    INSERT_RACE,
    MAX_TAG_LEN,
    first_line,
    get_or_create_experiment,
    log_params_batched,
    open_client,
    quick,
    safe_key,
    with_retry,
)

log = logging.getLogger("conkd")

#: Metrics per ``log_batch`` call (MLflow's limit).
_METRICS_PER_BATCH = 1000


@dataclass(eq=False)
class MLflowTracker(Tracker):
    """A thin, failure-safe wrapper around one MLflow run.

    Use as a context manager: the run ends FINISHED on success, FAILED (with the error message as
    the ``error`` tag) on an exception and KILLED on Ctrl-C, so a crash never leaves it open.
    Call :func:`~conkd.tracking.prepare_store` first (``run`` does so at startup, before loading
    data).

    ``resume_run_id`` continues that run (a resumed training run) instead of creating one. The
    run carries its :class:`~conkd.owner.Owner` record (``python -m conkd.maintenance`` lists
    runs whose process is gone). If the store stops answering mid-run, metrics and tags are kept
    in memory, a warning is printed, and they are sent when it answers again (each later call
    retries); whatever is still unsent at the end goes to ``pending_file`` with a warning.
    """

    tracking_uri: str
    experiment_name: str
    artifact_location: str | None = None
    parent_run_id: str | None = None
    tags: Mapping[str, Any] = field(default_factory=dict)
    resume_run_id: str | None = None
    pending_file: Path | None = None
    #: ``log_batch`` keyword arguments the store did not take, oldest first.
    pending: list[dict[str, Any]] = field(default_factory=list, init=False)
    #: ``(path, artifact_path)`` of uploads the store did not take.
    pending_artifacts: list[tuple[str, str | None]] = field(default_factory=list, init=False)
    client: Any = field(default=None, init=False)

    def __enter__(self) -> MLflowTracker:
        # The caller ran prepare_store() at startup (before data loading), not here again.
        self.client = open_client(self.tracking_uri)
        self.resumed = self.resume_run_id is not None and self._reopen(self.resume_run_id)
        if not self.resumed:
            exp_id = with_retry(
                get_or_create_experiment, self.client, self.experiment_name, self.artifact_location
            )
            tags = {k: str(v)[:MAX_TAG_LEN] for k, v in self.tags.items()}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = with_retry(self.client.create_run, exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
        # a continued run gets this run's tags too: ones a newer version adds (conkd.device)
        # would otherwise be missing from every run that started before it
        again = self.tags if self.resumed else {}
        self.set_tags({**again, **Owner.here().marks(RUN_TAGS)})
        return self

    def _reopen(self, run_id: str) -> bool:
        """Continue ``run_id`` (marked RUNNING again); False when the store no longer has it."""
        try:
            run = with_retry(self.client.get_run, run_id)
        except Exception as err:
            log.warning("MLflow run %s cannot be continued (%s); starting a new one", run_id, err)
            return False
        if run.info.lifecycle_stage == "deleted":
            log.warning("MLflow run %s was deleted; starting a new one", run_id)
            return False
        with_retry(self.client.update_run, run_id, status="RUNNING")
        if "error" in run.data.tags:  # from the crash being recovered from
            with_retry(self.client.delete_tag, run_id, "error")
        self.run_id = run_id
        log.info("continuing MLflow run %s", run_id)
        return True

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.run_id is None:
            return
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:MAX_TAG_LEN]})
        self._flush()
        if (self.pending or self.pending_artifacts) and self.pending_file is not None:
            self._write_pending(status)
            return  # the store is away: `conkd.maintenance replay` sends the batches, the status
        try:
            with quick(self.tracking_uri):
                with_retry(self.client.set_terminated, self.run_id, status=status)
        except Exception as err:
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, status, err)

    # --- sending, or keeping for later ---------------------------------------------------------

    def _send(self, **batch: Any) -> None:
        """``log_batch`` now, or keep it for later when the store does not answer."""
        self.pending.append(batch)
        self._flush()

    def _flush(self) -> None:
        """Send what is pending, oldest first; stop at the first failure (with one warning)."""
        while self.pending:
            try:
                with quick(self.tracking_uri):
                    with_retry(self.client.log_batch, self.run_id, **self.pending[0])
            except Exception as err:
                if not self.offline:
                    log.warning(
                        "MLflow store %s does not answer (%s): training goes on, metrics are "
                        "kept and sent when it is back",
                        self.tracking_uri,
                        first_line(err),
                    )
                self.offline = True
                return
            self.pending.pop(0)
            if self.offline and not self.pending:
                log.warning(
                    "MLflow store %s answers again: pending metrics sent", self.tracking_uri
                )
                self.offline = False

    def _write_pending(self, status: str) -> None:
        """Unsent metrics, tags and artifacts and the final status to :attr:`pending_file`."""
        assert self.pending_file is not None
        write_pending(
            self.pending_file,
            self.tracking_uri,
            self.run_id,
            status,
            self.pending,
            self.pending_artifacts,
        )
        log.warning(
            "MLflow: %d log batches and %d artifacts could not be sent; saved to %s (send them "
            "with `%s %s`)",
            len(self.pending),
            len(self.pending_artifacts),
            self.pending_file,
            REPLAY_COMMAND,
            self.pending_file,
        )

    # --- the Tracker interface -----------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        log_params_batched(self.client, self.run_id, params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics at ``step`` in as few ``log_batch`` calls as MLflow allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(safe_key(k), float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self._send(metrics=items[i : i + _METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._send(tags=[RunTag(safe_key(k), str(v)[:MAX_TAG_LEN]) for k, v in tags.items()])

    def log_dataset(self, fingerprint: Mapping[str, Any], context: str = "training") -> None:
        """Record the run's data as an MLflow dataset input (the runs table's Dataset column):
        name, source, a digest of its file list and split, and sizes as the profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=str(fingerprint["identity"]),
            digest=str(fingerprint["digest"])[:36],
            source_type="local",
            source=json.dumps({"uri": str(fingerprint["source"])}),
            schema=json.dumps({"classes": list(fingerprint["classes"])}),
            profile=json.dumps(fingerprint["sizes"]),
        )
        tags = [InputTag(key="mlflow.data.context", value=context)]
        try:
            with_retry(
                self.client.log_inputs,
                self.run_id,
                datasets=[DatasetInput(dataset, tags)],
                attempts=4,
                transient=INSERT_RACE,
            )
        except Exception as err:  # a record of the data is not worth the training run
            log.warning("MLflow did not record the dataset input (%s); training goes on", err)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            return
        item = (str(p.resolve()), artifact_path)
        if self.offline:  # do not wait on a store that is away: upload on replay
            self.pending_artifacts.append(item)
            return
        upload = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        try:
            with quick(self.tracking_uri):
                with_retry(upload, self.run_id, str(p), artifact_path)
        except Exception as err:
            log.warning(
                "MLflow: artifact %s not uploaded (%s); kept for replay", p, first_line(err)
            )
            self.offline = True
            self.pending_artifacts.append(item)

    def logged_steps(self, key: str) -> set[int]:
        history = with_retry(self.client.get_metric_history, self.run_id, safe_key(key))
        return {m.step for m in history}

    def log_model(
        self, model: Any, shape: Shape, register_name: str | None = None, alias: str | None = None
    ) -> str | None:
        """Log the network with ``mlflow.pytorch`` (see :func:`~conkd.tracking.models.log_network`)
        and, for teachers, register it under ``register_name`` with ``alias``. Returns the
        registered version, if any; tags ``model_uri`` and ``model_format`` say what was logged.
        """
        with self.active():
            uri, fmt, version = log_network(model, shape, register_name)
        self.set_tags({"model_uri": uri, "model_format": fmt})  # MLflow 3 keeps models apart
        if register_name and version is not None and alias:
            with_retry(self.client.set_registered_model_alias, register_name, alias, version)
        return version

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this run the fluent API's active run (for ``mlflow.pytorch.log_model``)."""
        import mlflow

        # Not mlflow.get_tracking_uri(): with nothing set it returns MLflow's default
        # (sqlite:///mlflow.db in the working directory), and setting that back would export it
        # as MLFLOW_TRACKING_URI, sending every later run in this process (a sweep's next
        # trials) to that store. set_tracking_uri mirrors into the variable, and None unsets it.
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
                yield
        finally:
            mlflow.set_tracking_uri(previous)
