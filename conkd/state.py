"""Where training stands: the one object the loop, its callbacks and checkpoints share.

Its own module so that the loop (:mod:`conkd.engine`) and its callbacks (:mod:`conkd.callbacks`)
both use it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where training stands, everything a checkpoint needs to continue exactly.

    ``epoch`` is the epoch in progress (or next), ``batch`` the batches of it already trained on
    and ``sums`` / ``seen`` their sample-weighted loss terms; ``step`` counts optimizer steps,
    ``best`` holds the best epoch's metrics and ``history`` every finished epoch's. A fresh state
    starts at epoch 0, batch 0.
    """

    epoch: int = 0
    step: int = 0
    batch: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    best: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
