"""MLflow runs left RUNNING by a process that died: found by their owner record, closed KILLED.

Resuming a run (``resume=auto``) continues it instead; close only what will not be resumed.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from conkd.owner import RUN_TAGS, STALE_AFTER_S, Owner
from conkd.tracking.store import MAX_TAG_LEN, with_retry


def staleness(run: Any, now: float, older_than_s: float, host: str) -> str | None:
    """Why ``run`` (RUNNING) has no live process, or None when it may still be alive."""
    owner = Owner.read(run.data.tags, RUN_TAGS)
    return owner.gone(run.info.start_time / 1000, now, older_than_s, host)


def running_runs(client: Any, experiment_ids: list[str] | None = None) -> list[Any]:
    """The RUNNING runs of ``experiment_ids`` (default: every experiment)."""
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    return with_retry(
        client.search_runs,
        experiment_ids,
        filter_string="attributes.status = 'RUNNING'",
        max_results=5000,
    )


def stale_runs(
    client: Any,
    experiment_ids: list[str] | None = None,
    older_than_s: float = STALE_AFTER_S,
    parent_run_id: str | None = None,
) -> list[tuple[Any, str]]:
    """``(run, reason)`` for every RUNNING run (child of ``parent_run_id`` if given) whose
    process is gone."""
    now, host = time.time(), socket.gethostname()
    out = []
    for run in running_runs(client, experiment_ids):
        if parent_run_id and run.data.tags.get("mlflow.parentRunId") != parent_run_id:
            continue
        reason = staleness(run, now, older_than_s, host)
        if reason:
            out.append((run, reason))
    return out


def mark_killed(client: Any, runs: list[tuple[Any, str]]) -> None:
    """Mark ``(run, reason)`` runs KILLED, recording why as the ``killed_reason`` tag."""
    for run, reason in runs:
        with_retry(client.set_tag, run.info.run_id, "killed_reason", reason[:MAX_TAG_LEN])
        with_retry(client.set_terminated, run.info.run_id, status="KILLED")
