"""Real servers for the tests: PostgreSQL on 127.0.0.1 (binaries from the ``pgserver`` wheel), an
``mlflow server`` and ``optuna-dashboard``, both from the project's one environment (``.venv``,
the one running the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW, DASHBOARD = BIN / "mlflow", BIN / "optuna-dashboard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres(base: Path, databases: tuple[str, ...] = ("optuna", "mlflow")) -> Iterator[str]:
    """A PostgreSQL server listening on 127.0.0.1 with ``databases``; yields ``user@host:port``.

    ``pgserver`` initialises the data folder (as a separate system user when run as root, which
    PostgreSQL requires); the server is then restarted on a TCP port and stopped at the end.
    """
    import pgserver
    from pgserver._commands import pg_ctl

    pgdata = base / "pg"
    server = pgserver.get_server(pgdata, cleanup_mode=None)  # initdb + start on a socket
    for name in databases:
        server.psql(f"CREATE DATABASE {name};")
    user = server.system_user
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    port = free_port()
    options = f"-h 127.0.0.1 -p {port} -k {pgdata}"
    pg_ctl(["-w", "-o", options, "-l", str(pgdata / "tcp.log"), "start"], pgdata=pgdata,
           user=user, timeout=60)  # fmt: skip
    try:
        yield f"postgres@127.0.0.1:{port}"
    finally:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)


@contextmanager
def serving(cmd: list[str], url: str, ready: str, log: Path, what: str) -> Iterator[str]:
    """Run ``cmd`` (a server) in its own session until ``url + ready`` answers 200; yields
    ``url``, stops the server at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}{ready}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[str]:
    """``mlflow server`` on a free port with ``backend_uri`` as its store; yields its URL."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(MLFLOW), "server", "--backend-store-uri", backend_uri,
        "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with serving(cmd, f"http://127.0.0.1:{port}", "/health", log, "mlflow server") as url:
        yield url


@contextmanager
def optuna_dashboard(storage: str, log: Path) -> Iterator[str]:
    """``optuna-dashboard`` on a free port of 127.0.0.1 (as ``make dashboard`` starts it)."""
    port = free_port()
    cmd = [str(DASHBOARD), storage, "--host", "127.0.0.1", "--port", str(port)]
    with serving(cmd, f"http://127.0.0.1:{port}", "/api/studies", log, "optuna-dashboard") as url:
        yield url
