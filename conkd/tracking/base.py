"""The tracker interface, which is also the tracker that records nothing."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: An image's ``(channels, height, width)``.
Shape = tuple[int, int, int]


@dataclass(eq=False)
class Tracker:
    """Where a run's params, metrics, tags, artifacts and model go.

    This class is the interface and the no-op tracker at once: every method does nothing, so a
    run with ``mlflow.enabled=false`` (or a torchrun rank other than 0) logs to the console only
    and no caller checks whether tracking is on. :class:`~conkd.tracking.MLflowTracker` records
    to MLflow. Use as a context manager around the run.
    """

    run_name: str | None = field(default=None, kw_only=True)
    #: The store's id of the run (None: no run was made).
    run_id: str | None = field(default=None, init=False)
    #: Whether this continues an earlier run (which holds the params already).
    resumed: bool = field(default=False, init=False)
    #: Whether the store stopped answering (what is sent meanwhile is kept for later).
    offline: bool = field(default=False, init=False)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params (immutable in a run: log them once)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics at ``step``."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags (values are stored as strings)."""

    def log_dataset(self, fingerprint: Mapping[str, Any], context: str = "training") -> None:
        """The run's data as a dataset input (``DataModule.fingerprint()``)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a folder, if it exists."""

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which the run holds metric ``key``."""
        return set()

    def log_model(
        self, model: Any, shape: Shape, register_name: str | None = None, alias: str | None = None
    ) -> str | None:
        """Log the network, traced on images of ``shape`` (and register it under
        ``register_name`` with ``alias``); returns the registered version, if any."""
        return None

    @contextmanager
    def active(self) -> Iterator[None]:
        """The run as the tracking library's current run, for libraries that log into it."""
        yield
