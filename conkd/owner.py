"""Who owns a run or a trial, and whether that process is gone: one record for both stores.

A killed process (SIGKILL, OOM, a lost node) cannot end what it was doing: its MLflow run stays
RUNNING and its Optuna trial stays RUNNING. Both therefore carry the same :class:`Owner` record
(host, pid, last heartbeat) under their own key names, :data:`RUN_TAGS` (MLflow tags
``conkd.host`` ...) and :data:`TRIAL_ATTRS` (Optuna user attributes ``conkd:host`` ...), both
made from the one list :data:`FIELDS`; existing stores hold these exact keys. One rule,
:meth:`Owner.gone`, tells from a record whether its process is gone, for run maintenance
(:mod:`conkd.maintenance`) and for the sweeper's orphaned trials alike.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A process on another host is presumed gone after this long without a heartbeat.
STALE_AFTER_S = 6 * 3600


@dataclass(frozen=True)
class Owner:
    """The process that owns a run or a trial: its host, its pid and its last sign of life
    (``heartbeat``, whole seconds since the epoch). A field a store does not hold is None."""

    host: str | None = None
    pid: int | None = None
    heartbeat: int | None = None

    @classmethod
    def here(cls) -> Owner:
        """This process, alive now."""
        return cls(socket.gethostname(), os.getpid(), int(time.time()))

    @classmethod
    def read(cls, marks: Mapping[str, Any], keys: OwnerKeys) -> Owner:
        """The record a store holds under ``keys`` (tags or user attributes, any value type)."""
        pid, beat = marks.get(keys.pid), marks.get(keys.heartbeat)
        return cls(
            host=marks.get(keys.host),
            pid=int(pid) if str(pid or "").isdigit() else None,
            heartbeat=int(float(beat)) if beat else None,
        )

    def marks(self, keys: OwnerKeys, *fields: str) -> dict[str, Any]:
        """This record under a store's key names; ``fields`` picks some (e.g. the heartbeat)."""
        return {
            getattr(keys, f): getattr(self, f)
            for f in fields or FIELDS
            if getattr(self, f) is not None
        }

    def gone(
        self,
        started: float,
        now: float,
        older_than_s: float = STALE_AFTER_S,
        this_host: str | None = None,
    ) -> str | None:
        """Why this process is gone, or None while it may be alive. On this host its pid tells
        at once; elsewhere its last sign of life (the heartbeat, or ``started``) must be younger
        than ``older_than_s``: a pid on another machine says nothing here."""
        this_host = this_host or socket.gethostname()
        if self.host == this_host and self.pid is not None:
            return None if pid_alive(self.pid) else f"pid {self.pid} is not running on {self.host}"
        age = now - (self.heartbeat or started)
        if age > older_than_s:
            return f"no heartbeat from {self.host or 'an unknown host'} for {age / 3600:.1f} h"
        return None


#: The record's fields, in order: every store's key names are made from this one list.
FIELDS = tuple(f.name for f in dataclasses.fields(Owner))


@dataclass(frozen=True)
class OwnerKeys:
    """One store's key name for each field of :class:`Owner`."""

    host: str
    pid: str
    heartbeat: str

    @classmethod
    def prefixed(cls, prefix: str) -> OwnerKeys:
        return cls(**{f: prefix + f for f in FIELDS})


#: MLflow run tags ``conkd.host``, ``conkd.pid``, ``conkd.heartbeat``.
RUN_TAGS = OwnerKeys.prefixed("conkd.")
#: Optuna trial user attributes ``conkd:host``, ``conkd:pid``, ``conkd:heartbeat``.
TRIAL_ATTRS = OwnerKeys.prefixed("conkd:")


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
