"""Tracking: every call ConKD makes to MLflow, behind one tracker interface.

* :class:`Tracker` (:mod:`~conkd.tracking.base`) is the interface a run logs through, and itself
  the tracker that records nothing; :class:`MLflowTracker` (:mod:`~conkd.tracking.mlflow_run`)
  records one job's MLflow run (resume, status, offline buffer). ``conkd.run`` picks one from
  the config (``mlflow.enabled``, :func:`make_tracker`), so no other code asks whether
  tracking is on.
* :mod:`~conkd.tracking.store`: where the store is, that it answers, retries, params, keys.
* :mod:`~conkd.tracking.models`: networks logged (``pt2``), registered and fetched by URI.
* :mod:`~conkd.tracking.pending`: what a run could not send, saved and replayed.
* :mod:`~conkd.tracking.stale`: RUNNING runs whose process is gone (run maintenance).
* :mod:`~conkd.tracking.sweep_parent`: a sweep's parent run, its children and its summary.

The store's location and the failure modes are described in :mod:`~conkd.tracking.store`.
"""

from typing import Any

from conkd.tracking.base import Tracker
from conkd.tracking.mlflow_run import MLflowTracker
from conkd.tracking.models import (
    export_signature,
    fetch_registered_checkpoint,
    log_network,
    parse_model_uri,
    pt2_options,
)
from conkd.tracking.pending import replay
from conkd.tracking.stale import mark_killed, running_runs, stale_runs
from conkd.tracking.store import (
    INSERT_RACE,
    LOCKED,
    default_store,
    get_or_create_experiment,
    log_params_batched,
    open_client,
    prepare_store,
    resolve_store,
    safe_key,
    with_retry,
)
from conkd.tracking.sweep_parent import PARENT_RUN_FILE, SweepParent, sweep_parent_run_id


def make_tracker(enabled: bool, run_name: str | None = None, **mlflow: Any) -> Tracker:
    """The run's tracker: an :class:`MLflowTracker` built with the ``mlflow`` keyword arguments
    when ``enabled``, else the :class:`Tracker` that records nothing (the run keeps its name)."""
    if enabled:
        return MLflowTracker(run_name=run_name, **mlflow)
    return Tracker(run_name=run_name)


__all__ = [
    "INSERT_RACE",
    "LOCKED",
    "MLflowTracker",
    "PARENT_RUN_FILE",
    "SweepParent",
    "Tracker",
    "default_store",
    "export_signature",
    "fetch_registered_checkpoint",
    "get_or_create_experiment",
    "log_network",
    "log_params_batched",
    "make_tracker",
    "mark_killed",
    "open_client",
    "parse_model_uri",
    "prepare_store",
    "pt2_options",
    "replay",
    "resolve_store",
    "running_runs",
    "safe_key",
    "stale_runs",
    "sweep_parent_run_id",
    "with_retry",
]
