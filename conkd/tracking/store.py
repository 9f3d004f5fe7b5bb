"""The MLflow store: where it is, that it answers, and calls that survive concurrent writers.

The default store is ``<project>/mlruns/``: a SQLite database (``mlflow.db``) plus an
``artifacts/`` folder, addressed by absolute URIs so runs started from any working directory land
in the same place. ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` point elsewhere (a tracking
server such as ``http://127.0.0.1:5000``).
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from conkd.errors import ConKDError

# MLflow limits (mlflow.utils.validation): params per batch and value length.
PARAMS_PER_BATCH = 100
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 5000
#: A tracking server that stops answering mid-run: fail fast, the batch is kept and resent.
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def default_store(root: str | Path) -> tuple[str, str]:
    """``(tracking_uri, artifact_location)`` of the project's own store under ``root/mlruns``."""
    base = Path(root).expanduser().resolve() / "mlruns"
    return f"sqlite:///{base / 'mlflow.db'}", (base / "artifacts").as_uri()


def resolve_store(root: str | Path, tracking_uri: str | None) -> tuple[str, str | None]:
    """Config beats ``MLFLOW_TRACKING_URI`` beats the project store. A server picks its own
    artifact location, so only the local store sets one."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return default_store(root)
    if uri.startswith("sqlite:///") or "://" not in uri:
        # A local database or folder: keep artifacts beside it, not in the working directory.
        db_path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        artifacts = (db_path.parent / "artifacts").as_uri()
        uri = f"sqlite:///{db_path}" if uri.startswith("sqlite:///") else str(db_path)
        return uri, artifacts
    return uri, None


def open_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` (MLflow is imported only when tracking is on)."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


#: Store errors that concurrent writers cause and a later try gets past: SQLite's lock.
LOCKED = ("database is locked",)
#: ... and MLflow's check-then-insert of shared rows (``log_inputs``: runs that record the same
#: dataset at the same moment both insert it; the loser's retry finds the row).
INSERT_RACE = (*LOCKED, "unique constraint", "duplicate key")


def with_retry(
    fn: Any, *args: Any, attempts: int = 8, transient: tuple[str, ...] = LOCKED, **kwargs: Any
) -> Any:
    """Call ``fn``, retrying errors whose message holds one of ``transient`` with backoff."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # MlflowException wraps sqlalchemy.OperationalError
            message = str(err).lower()
            if not any(t in message for t in transient) or attempt == attempts - 1:
                raise
            time.sleep(0.1 * 2**attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def prepare_store(tracking_uri: str) -> None:
    """Create the SQLite database (MLflow's migrations) once, and check that the store answers.

    Processes that create one database at the same time race in Alembic's migrations, so the
    first access holds a file lock beside the database; sweeps also call this in the parent
    before launching jobs. A tracking server gets one quick request (no retries, short timeout),
    so a wrong URL fails at startup rather than after the first epoch.
    """
    from filelock import FileLock

    def probe() -> None:
        with_retry(open_client(tracking_uri).search_experiments, max_results=1)

    try:
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(db) + ".lock", timeout=300):
                probe()
        elif tracking_uri.startswith(("http://", "https://")):
            with env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
                probe()
        else:
            probe()
    except Exception as err:
        raise ConKDError(
            f"cannot reach the MLflow tracking store {tracking_uri} ({type(err).__name__}: "
            f"{first_line(err)}); start the server, fix mlflow.tracking_uri / "
            "MLFLOW_TRACKING_URI, or set mlflow.enabled=false"
        ) from err


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, short enough for a warning."""
    return (str(err).splitlines() or [""])[0][:limit]


@contextmanager
def env(**values: str) -> Iterator[None]:
    """Environment variables set for the block (MLflow reads its HTTP settings from there)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def quick(tracking_uri: str) -> AbstractContextManager:
    """Calls within fail fast on a tracking server that is away (what they send is kept)."""
    return env(**_QUICK_HTTP) if tracking_uri.startswith("http") else nullcontext()


def safe_key(key: str) -> str:
    """An MLflow-valid param/metric key: ``model@teacher`` -> ``model:teacher``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key.replace("@", ":"))


def log_params_batched(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in MLflow-sized batches with valid keys and truncated values."""
    from mlflow.entities import Param

    items = [Param(safe_key(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        with_retry(client.log_batch, run_id, params=items[i : i + PARAMS_PER_BATCH])


#: Experiment tag that makes the MLflow 3 UI open the model-training view, not the GenAI one.
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    """The experiment's id; created (with the model-training view tag) if missing, by whichever
    of several processes starting together gets there first."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={_KIND_TAG: _KIND}
            )
        except Exception:  # another process created it first
            exp = with_retry(client.get_experiment_by_name, name)
            if exp is None:
                raise
    if _KIND_TAG not in exp.tags:
        with_retry(client.set_experiment_tag, exp.experiment_id, _KIND_TAG, _KIND)
    return exp.experiment_id
