"""MLflow tracking: one run per training job, nested under a parent run in sweeps.

The default store is ``<project>/mlruns/``: a SQLite database (``mlflow.db``) plus an
``artifacts/`` folder, addressed by absolute URIs so runs started from any working directory land
in the same place. ``MLFLOW_TRACKING_URI`` or ``mlflow.tracking_uri`` point elsewhere (a tracking
server such as ``http://127.0.0.1:5000``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from conkd.errors import ConKDError

log = logging.getLogger("conkd")

# MLflow limits (mlflow.utils.validation): params per batch and value length.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 5000
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
    import mlflow
    from filelock import FileLock

    def probe() -> None:
        client = mlflow.MlflowClient(tracking_uri)
        with_retry(client.search_experiments, max_results=1)

    try:
        if tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(db) + ".lock", timeout=300):
                probe()
        elif tracking_uri.startswith(("http://", "https://")):
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"):
                probe()
        else:
            probe()
    except Exception as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise ConKDError(
            f"cannot reach the MLflow tracking store {tracking_uri} ({type(err).__name__}: "
            f"{first}); start the server, fix mlflow.tracking_uri / MLFLOW_TRACKING_URI, "
            "or set mlflow.enabled=false"
        ) from err


@contextmanager
def _env(**values: str) -> Iterator[None]:
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


def safe_key(key: str) -> str:
    """An MLflow-valid param/metric key: ``model@teacher`` -> ``model:teacher``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key.replace("@", ":"))


def log_params_batched(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in MLflow-sized batches with valid keys and truncated values."""
    from mlflow.entities import Param

    items = [Param(safe_key(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        with_retry(client.log_batch, run_id, params=items[i : i + _PARAMS_PER_BATCH])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: Experiment tag that makes the MLflow 3 UI open the model-training view, not the GenAI one.
_KIND_TAG, _KIND = "mlflow.experimentKind", "custom_model_development"


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                name, artifact_location=artifact_location, tags={_KIND_TAG: _KIND}
            )
            return exp_id
        except Exception:  # another process created it first
            exp = with_retry(client.get_experiment_by_name, name)
            if exp is None:
                raise
    if _KIND_TAG not in exp.tags:
        with_retry(client.set_experiment_tag, exp.experiment_id, _KIND_TAG, _KIND)
    return exp.experiment_id


#: Tags a run carries so stale runs (their process gone) can be told from live ones.
HOST_TAG, PID_TAG, HEARTBEAT_TAG = "conkd.host", "conkd.pid", "conkd.heartbeat"


class Tracker:
    """A thin, failure-safe wrapper around one MLflow run.

    Use as a context manager: the run ends FINISHED on success, FAILED (with the error message as
    the ``error`` tag) on an exception and KILLED on Ctrl-C, so a crash never leaves it open.
    With ``enabled=False`` every method is a no-op and the run is only logged to the console.
    Call :func:`prepare_store` first (``run`` does so at startup, before loading data).

    ``resume_run_id`` continues that run (a resumed training run) instead of creating one. The
    run carries its host, pid and a per-epoch heartbeat (``python -m conkd.runs`` lists runs whose
    process is gone). If the store stops answering mid-run, metrics and tags are kept in memory,
    a warning is printed, and they are sent when it answers again (each later call retries);
    whatever is still unsent at the end goes to ``pending_file`` with a warning.
    """

    def __init__(
        self,
        enabled: bool,
        tracking_uri: str,
        experiment_name: str,
        run_name: str | None = None,
        artifact_location: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        pending_file: Path | None = None,
    ) -> None:
        self.enabled = enabled
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.resume_run_id = resume_run_id
        self.pending_file = pending_file
        self.pending: list[dict[str, Any]] = []  # log_batch kwargs the store did not take
        self.pending_artifacts: list[tuple[str, str | None]] = []  # (path, artifact_path)
        self.client: Any = None
        self.run_id: str | None = None
        self.resumed = False
        self.offline = False  # the store stopped answering; batches are pending

    def __enter__(self) -> Tracker:
        if not self.enabled:
            return self
        import mlflow

        # The caller ran prepare_store() at startup (before data loading), not here again.
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.resumed = self.resume_run_id is not None and self._reopen(self.resume_run_id)
        if not self.resumed:
            exp_id = with_retry(
                get_or_create_experiment, self.client, self.experiment_name, self.artifact_location
            )
            tags = {k: str(v)[:_MAX_TAG_LEN] for k, v in self.tags.items()}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            run = with_retry(self.client.create_run, exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
        # a continued run gets this run's tags too: ones a newer version adds (conkd.device)
        # would otherwise be missing from every run that started before it
        again = self.tags if self.resumed else {}
        self.set_tags({**again, HOST_TAG: socket.gethostname(), PID_TAG: os.getpid()})
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
        if not self.enabled or self.run_id is None:
            return
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:_MAX_TAG_LEN]})
        self._flush()
        if (self.pending or self.pending_artifacts) and self.pending_file is not None:
            self._write_pending(status)
            return  # the store is away: `conkd.runs replay` sends the batches, then the status
        try:
            with _env(**_QUICK_HTTP) if self.tracking_uri.startswith("http") else nullcontext():
                with_retry(self.client.set_terminated, self.run_id, status=status)
        except Exception as err:
            log.warning("MLflow run %s could not be marked %s: %s", self.run_id, status, err)

    # --- logging -----------------------------------------------------------------------------

    def _send(self, **batch: Any) -> None:
        """``log_batch`` now, or keep it for later when the store does not answer."""
        self.pending.append(batch)
        self._flush()

    def _flush(self) -> None:
        """Send what is pending, oldest first; stop at the first failure (with one warning)."""
        while self.pending:
            try:
                with _env(**_QUICK_HTTP) if self.tracking_uri.startswith("http") else nullcontext():
                    with_retry(self.client.log_batch, self.run_id, **self.pending[0])
            except Exception as err:
                if not self.offline:
                    first = (str(err).splitlines() or [""])[0][:200]
                    log.warning(
                        "MLflow store %s does not answer (%s): training goes on, metrics are "
                        "kept and sent when it is back",
                        self.tracking_uri,
                        first,
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
        """Unsent metrics and tags to a JSON file (``python -m conkd.runs replay FILE``)."""
        import json

        if self.pending_file is None:
            log.warning("MLflow: %d unsent log batches are lost", len(self.pending))
            return
        rows = [
            {
                "run_id": self.run_id,
                "metrics": [(m.key, m.value, m.timestamp, m.step) for m in b.get("metrics", [])],
                "params": [(p.key, p.value) for p in b.get("params", [])],
                "tags": [(t.key, t.value) for t in b.get("tags", [])],
            }
            for b in self.pending
        ]
        self.pending_file.parent.mkdir(parents=True, exist_ok=True)
        self.pending_file.write_text(
            json.dumps(
                {
                    "tracking_uri": self.tracking_uri,
                    "run_id": self.run_id,
                    "status": status,
                    "batches": rows,
                    "artifacts": self.pending_artifacts,
                }
            )
        )
        log.warning(
            "MLflow: %d log batches and %d artifacts could not be sent; saved to %s (send them "
            "with `python -m conkd.runs replay %s`)",
            len(self.pending),
            len(self.pending_artifacts),
            self.pending_file,
            self.pending_file,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            log_params_batched(self.client, self.run_id, params)

    def log_metrics(
        self,
        metrics: Mapping[str, float],
        step: int | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Metrics at ``step`` (and ``tags``) in as few ``log_batch`` calls as MLflow allows."""
        if not self.enabled:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        items = [Metric(safe_key(k), float(v), now, step or 0) for k, v in metrics.items()]
        extra = [RunTag(safe_key(k), str(v)[:_MAX_TAG_LEN]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(items), 1), 1000):
            self._send(metrics=items[i : i + 1000], tags=extra if i == 0 else [])

    def log_dataset(self, fingerprint: Mapping[str, Any], context: str = "training") -> None:
        """Record the run's data as an MLflow dataset input (the runs table's Dataset column):
        name, source, a digest of its file list and split, and sizes as the profile."""
        if not self.enabled:
            return
        import json

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

    def on_epoch_end(self, state: Any, metrics: Mapping[str, float], is_best: bool) -> None:
        """Training callback: the epoch's metrics at ``step=epoch``, and a heartbeat."""
        self.log_metrics(metrics, step=state.epoch - 1, tags={HEARTBEAT_TAG: int(time.time())})

    def on_resume(self, state: Any) -> None:
        """Log the finished epochs of a resumed state the run does not have yet (all of them in
        a new run; in a continued run, those whose logging a kill cut off)."""
        if not self.enabled or not state.history:
            return
        key = safe_key(next(iter(state.history[0])))
        logged = {m.step for m in with_retry(self.client.get_metric_history, self.run_id, key)}
        for epoch, metrics in enumerate(state.history):
            if epoch not in logged:
                self.log_metrics(metrics, step=epoch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(safe_key(k), str(v)[:_MAX_TAG_LEN]) for k, v in tags.items()]
        self._send(tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        p = Path(path)
        if not p.exists():
            return
        item = (str(p.resolve()), artifact_path)
        if self.offline:  # do not wait on a store that is away: upload on replay
            self.pending_artifacts.append(item)
            return
        upload = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        try:
            with _env(**_QUICK_HTTP) if self.tracking_uri.startswith("http") else nullcontext():
                with_retry(upload, self.run_id, str(p), artifact_path)
        except Exception as err:
            first = (str(err).splitlines() or [""])[0][:200]
            log.warning("MLflow: artifact %s not uploaded (%s); kept for replay", p, first)
            self.offline = True
            self.pending_artifacts.append(item)

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


# --- models: logging, registry, teachers by URI ------------------------------------------------


def export_signature(model: Any, example: Any) -> Any:
    """The MLflow signature of a network for the ``pt2`` format: one float image batch in (the
    batch dimension free), its named outputs (``logits``, ``embedding``, ``projection``; a
    ``None`` output is left out) out. MLflow infers signatures only for one output tensor."""
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    with torch.no_grad():
        out = model(example)
    f32 = np.dtype(np.float32)
    outputs = [
        TensorSpec(f32, (-1, *v.shape[1:]), name) for name, v in out.items() if v is not None
    ]
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, *example.shape[1:]))]), outputs=Schema(outputs)
    )


def pt2_options(model: Any, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """``mlflow.pytorch.log_model`` arguments for the ``pt2`` format: ``model`` (in eval mode)
    traced on a batch of two ``input_shape`` images, the batch size left free."""
    import torch

    example = torch.zeros(2, *input_shape)
    return {
        "serialization_format": "pt2",
        "input_example": example.numpy(),
        "signature": export_signature(model, example),
        # the pyfunc server's check wants one output tensor; the network returns a dict
        "validate_serving_input": False,
    }


def _log_network(
    model: Any, input_shape: tuple[int, int, int], common: dict[str, Any]
) -> tuple[Any, str]:
    """Log ``model`` as ``pt2``; one that ``torch.export`` cannot trace as pickle, warned."""
    import mlflow

    try:
        options = pt2_options(model, input_shape)
        return with_retry(mlflow.pytorch.log_model, model, **options, **common), "pt2"
    except Exception as err:  # torch.export could not trace this network
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        log.warning("MLflow: the network did not export (%s); logged as pickle", first)
        info = with_retry(mlflow.pytorch.log_model, model, serialization_format="pickle", **common)
        return info, "pickle"


def log_model(
    tracker: Tracker,
    model: Any,
    input_shape: tuple[int, int, int],
    register_name: str | None = None,
    alias: str | None = None,
) -> str | None:
    """Log ``model`` with ``mlflow.pytorch`` and, for teachers, register it under
    ``register_name`` with ``alias``. Returns the registered version, if any.

    The network is exported with ``torch.export`` (MLflow's ``pt2`` format: a graph and its
    weights, no pickle, so loading it runs no code), in eval mode, traced on a batch of two
    ``input_shape`` images with the batch size left free. A network that does not export is
    logged in the pickle format instead, with a warning naming why (tag ``model_format``).
    ``mlflow.pytorch.load_model`` gives back the network's dict of outputs either way.
    """
    if not tracker.enabled:
        return None
    import torch
    import torchvision

    import conkd

    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    common = {
        "name": "model",
        "code_paths": [str(Path(conkd.__file__).parent)],
        "pip_requirements": requirements,
        "registered_model_name": register_name,
    }
    was_training = model.training
    model.eval()
    try:
        with tracker.active():
            info, fmt = _log_network(model, input_shape, common)
    finally:
        model.train(was_training)
    # MLflow 3 keeps models outside runs:/
    tracker.set_tags({"model_uri": info.model_uri, "model_format": fmt})
    version = getattr(info, "registered_model_version", None)
    if register_name and version is not None and alias:
        with_retry(tracker.client.set_registered_model_alias, register_name, alias, str(version))
    return None if version is None else str(version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/3`` -> (NAME, None, "3")."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, alias, None
    name, _, version = body.rpartition("/")
    if not name or not version:
        raise ConKDError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/N")
    return name, None, version


def fetch_registered_checkpoint(uri: str, tracking_uri: str, dest: Path) -> tuple[Path, str]:
    """Download the checkpoint behind a registered model version; returns (path, source run id).

    The registry points at the run that logged the model; that run's ``checkpoints/best.pt``
    carries the architecture spec, so the teacher is validated exactly like a local checkpoint.
    """
    import mlflow

    name, alias, version = parse_model_uri(uri)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        if alias:
            mv = with_retry(client.get_model_version_by_alias, name, alias)
        else:
            mv = with_retry(client.get_model_version, name, version)
    except Exception as err:
        raise ConKDError(
            f"teacher {uri} is not in the model registry of {tracking_uri} "
            f"({str(err).splitlines()[0][:160]}); train one with `python train.py "
            "experiment=teacher` or pass a checkpoint path"
        ) from err
    dest.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path="checkpoints/best.pt",
            dst_path=str(dest),
            tracking_uri=tracking_uri,
        )
    except Exception as err:
        raise ConKDError(
            f"{uri} (run {mv.run_id}) has no checkpoints/best.pt artifact; "
            "register teachers from runs with mlflow.log_checkpoint=true"
        ) from err
    return Path(local), mv.run_id


# --- sweeps --------------------------------------------------------------------------------------

PARENT_RUN_FILE = "mlflow_parent_run_id"


def sweep_parent_run_id(sweep_dir: str | Path | None) -> str | None:
    """The parent run a sweep's callback created, read from the sweep folder."""
    if not sweep_dir:
        return None
    path = Path(sweep_dir) / PARENT_RUN_FILE
    return path.read_text().strip() if path.is_file() else None
