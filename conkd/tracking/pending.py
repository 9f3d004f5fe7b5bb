"""What a run could not send while its store was away: the pending file, written and replayed.

The file (``<output>/mlflow_pending.json``) holds the unsent ``log_batch`` calls, the artifacts
not uploaded and the run's final status, so ``python -m conkd.maintenance replay FILE`` can send
them, in order, once the store answers again. Its format is defined here only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conkd.tracking.store import with_retry

REPLAY_COMMAND = "python -m conkd.maintenance replay"


def write_pending(
    path: Path,
    tracking_uri: str,
    run_id: str | None,
    status: str,
    batches: list[dict[str, Any]],
    artifacts: list[tuple[str, str | None]],
) -> None:
    """Save unsent batches (``log_batch`` keyword arguments of MLflow entities), artifacts
    ``(path, artifact_path)`` and the run's final ``status`` as JSON."""
    rows = [
        {
            "run_id": run_id,
            "metrics": [(m.key, m.value, m.timestamp, m.step) for m in b.get("metrics", [])],
            "params": [(p.key, p.value) for p in b.get("params", [])],
            "tags": [(t.key, t.value) for t in b.get("tags", [])],
        }
        for b in batches
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "status": status,
        "batches": rows,
        "artifacts": artifacts,
    }
    path.write_text(json.dumps(data))


def replay(client: Any, path: Path) -> int:
    """Send the batches and artifacts a run saved when its store did not answer, then its final
    status; returns how many batches."""
    from mlflow.entities import Metric, Param, RunTag

    data = json.loads(path.read_text())
    for b in data["batches"]:
        with_retry(
            client.log_batch,
            b["run_id"],
            metrics=[Metric(*m) for m in b["metrics"]],
            params=[Param(*p) for p in b["params"]],
            tags=[RunTag(*t) for t in b["tags"]],
        )
    for file, artifact_path in data.get("artifacts", []):
        upload = client.log_artifacts if Path(file).is_dir() else client.log_artifact
        with_retry(upload, data["run_id"], file, artifact_path)
    if data.get("status"):  # the end the run could not record while the store was away
        with_retry(client.set_terminated, data["run_id"], status=data["status"])
    return len(data["batches"])
