"""MLflow runs whose process died: list them, close them, send what they could not.

A killed process (SIGKILL, OOM, a lost node) cannot end its MLflow run, which then shows as
RUNNING forever. Every ConKD run tags its host, pid and a per-epoch heartbeat, so:

    python -m conkd.runs list                   # RUNNING runs, each marked live or stale
    python -m conkd.runs close-stale [--dry-run] [--older-than HOURS]   # stale ones -> KILLED
    python -m conkd.runs replay outputs/.../mlflow_pending.json         # metrics a run kept

A run is stale when its process is gone: on this host, its pid is not alive; on another host,
its last heartbeat (or its start) is older than ``--older-than`` hours. Resuming a run
(``resume=auto``) continues it instead; close only what will not be resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from conkd.tracking import HEARTBEAT_TAG, HOST_TAG, PID_TAG, resolve_store, with_retry


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


#: A process on another host is presumed gone after this long without a heartbeat.
STALE_AFTER_S = 6 * 3600


def process_gone(
    host: str | None,
    pid: str | int | None,
    last_sign: float,
    now: float,
    older_than_s: float = STALE_AFTER_S,
    this_host: str | None = None,
) -> str | None:
    """Why the process that owns a run or trial is gone, or None while it may be alive: on this
    host its pid is checked; elsewhere its last sign of life (heartbeat, or start) must be
    younger than ``older_than_s``."""
    this_host = this_host or socket.gethostname()
    if host == this_host and str(pid or "").isdigit():
        return None if pid_alive(int(pid)) else f"pid {pid} is not running on {host}"
    age = now - last_sign
    if age > older_than_s:
        return f"no heartbeat from {host or 'an unknown host'} for {age / 3600:.1f} h"
    return None


def staleness(run: Any, now: float, older_than_s: float, host: str) -> str | None:
    """Why ``run`` (RUNNING) has no live process, or None when it may still be alive."""
    tags = run.data.tags
    beat = float(tags.get(HEARTBEAT_TAG) or run.info.start_time / 1000)
    return process_gone(tags.get(HOST_TAG), tags.get(PID_TAG), beat, now, older_than_s, host)


def running_runs(client: Any, experiment_ids: list[str] | None = None) -> list[Any]:
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


def close(client: Any, runs: list[tuple[Any, str]]) -> None:
    """Mark runs KILLED, recording why as the ``killed_reason`` tag."""
    for run, reason in runs:
        with_retry(client.set_tag, run.info.run_id, "killed_reason", reason[:5000])
        with_retry(client.set_terminated, run.info.run_id, status="KILLED")


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
    for path, artifact_path in data.get("artifacts", []):
        upload = client.log_artifacts if Path(path).is_dir() else client.log_artifact
        with_retry(upload, data["run_id"], path, artifact_path)
    if data.get("status"):  # the end the run could not record while the store was away
        with_retry(client.set_terminated, data["run_id"], status=data["status"])
    return len(data["batches"])


def main(argv: list[str] | None = None) -> int:
    import mlflow

    ap = argparse.ArgumentParser(
        prog="python -m conkd.runs",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or mlruns/")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="RUNNING runs, live or stale")
    close_p = sub.add_parser("close-stale", help="mark stale RUNNING runs KILLED")
    for p in (sub.choices["list"], close_p):
        p.add_argument("--older-than", type=float, default=6.0, help="hours (other hosts)")
    close_p.add_argument("--dry-run", action="store_true")
    replay_p = sub.add_parser("replay", help="send a run's saved mlflow_pending.json")
    replay_p.add_argument("file", type=Path)
    args = ap.parse_args(argv)

    root = os.environ.get("CONKD_ROOT", str(Path(__file__).resolve().parents[1]))
    uri, _ = resolve_store(root, args.tracking_uri)
    client = mlflow.MlflowClient(uri)
    if args.command == "replay":
        print(f"sent {replay(client, args.file)} batches to {uri}")
        return 0
    older = args.older_than * 3600
    if args.command == "list":
        stale = {r.info.run_id: why for r, why in stale_runs(client, older_than_s=older)}
        runs = running_runs(client)
        for r in runs:
            state = f"stale: {stale[r.info.run_id]}" if r.info.run_id in stale else "live"
            print(f"{r.info.run_id}  {r.info.run_name or '-':<40}  {state}")
        print(f"{len(runs)} RUNNING, {len(stale)} stale ({uri})")
        return 0
    stale = stale_runs(client, older_than_s=older)
    if not args.dry_run:
        close(client, stale)
    for r, why in stale:
        print(f"{'would close' if args.dry_run else 'closed'} {r.info.run_id} ({why})")
    print(f"{len(stale)} stale runs {'found' if args.dry_run else 'marked KILLED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
