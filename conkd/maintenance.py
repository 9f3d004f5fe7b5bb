"""Run maintenance: MLflow runs whose process died (list them, close them), and what runs could
not send (replay it).

A killed process (SIGKILL, OOM, a lost node) cannot end its MLflow run, which then shows as
RUNNING forever. Every ConKD run carries its owner record (host, pid, per-epoch heartbeat), so:

    python -m conkd.maintenance list                   # RUNNING runs, each marked live or stale
    python -m conkd.maintenance close-stale [--dry-run] [--older-than HOURS]   # stale -> KILLED
    python -m conkd.maintenance replay outputs/.../mlflow_pending.json   # metrics a run kept

A run is stale when its process is gone: on this host, its pid is not alive; on another host,
its last heartbeat (or its start) is older than ``--older-than`` hours. Resuming a run
(``resume=auto``) continues it instead; close only what will not be resumed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from conkd.owner import STALE_AFTER_S
from conkd.tracking import (
    mark_killed,
    open_client,
    replay,
    resolve_store,
    running_runs,
    stale_runs,
)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m conkd.maintenance",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or mlruns/")
    sub = ap.add_subparsers(dest="command", required=True)
    list_p = sub.add_parser("list", help="RUNNING runs, live or stale")
    close_p = sub.add_parser("close-stale", help="mark stale RUNNING runs KILLED")
    for p in (list_p, close_p):
        p.add_argument(
            "--older-than", type=float, default=STALE_AFTER_S / 3600, help="hours (other hosts)"
        )
    close_p.add_argument("--dry-run", action="store_true")
    replay_p = sub.add_parser("replay", help="send a run's saved mlflow_pending.json")
    replay_p.add_argument("file", type=Path)
    return ap


def list_runs(client: Any, older_than_s: float, uri: str) -> None:
    """Print every RUNNING run, live or stale (and why)."""
    stale = {r.info.run_id: why for r, why in stale_runs(client, older_than_s=older_than_s)}
    runs = running_runs(client)
    for r in runs:
        state = f"stale: {stale[r.info.run_id]}" if r.info.run_id in stale else "live"
        print(f"{r.info.run_id}  {r.info.run_name or '-':<40}  {state}")
    print(f"{len(runs)} RUNNING, {len(stale)} stale ({uri})")


def close_stale(client: Any, older_than_s: float, dry_run: bool) -> None:
    """Mark the stale RUNNING runs KILLED (with ``dry_run`` only say which)."""
    stale = stale_runs(client, older_than_s=older_than_s)
    if not dry_run:
        mark_killed(client, stale)
    for r, why in stale:
        print(f"{'would close' if dry_run else 'closed'} {r.info.run_id} ({why})")
    print(f"{len(stale)} stale runs {'found' if dry_run else 'marked KILLED'}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = os.environ.get("CONKD_ROOT", str(Path(__file__).resolve().parents[1]))
    uri, _ = resolve_store(root, args.tracking_uri)
    client = open_client(uri)
    if args.command == "replay":
        print(f"sent {replay(client, args.file)} batches to {uri}")
    elif args.command == "list":
        list_runs(client, args.older_than * 3600, uri)
    else:
        close_stale(client, args.older_than * 3600, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
