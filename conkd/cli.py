"""Entry-point plumbing shared by train.py and eval.py: user-facing errors, not tracebacks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from conkd.errors import ConKDError, message


def exit_with(err: ConKDError) -> NoReturn:
    """Print ``error: <message>`` and exit 1; with ``HYDRA_FULL_ERROR=1``, raise (traceback)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"error: {message(err)}", file=sys.stderr)
    sys.exit(1)


def run_app(fn: Callable[[DictConfig, Any], Any], cfg: DictConfig) -> Any:
    """Call ``fn(cfg, hydra_cfg)``; a :class:`ConKDError` becomes one ``error:`` line and exit 1.

    In a multirun the error is re-raised instead, so the sweeper records the trial as failed and
    goes on. ``HYDRA_FULL_ERROR=1`` shows the traceback.
    """
    hydra_cfg = None
    multirun = False
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        hydra_cfg = {
            "overrides": list(hc.overrides.task),
            "output_dir": hc.runtime.output_dir,
            "job_num": hc.job.get("num"),
            "sweep_dir": hc.sweep.dir if multirun else None,
            "choices": OmegaConf.to_container(hc.runtime.choices),
            "sweeper": hc.sweeper if multirun else None,
        }
    try:
        return fn(cfg, hydra_cfg)
    except ConKDError as err:
        if multirun:
            raise
        exit_with(err)
    except KeyboardInterrupt:
        if multirun:
            raise
        print("interrupted (the MLflow run is marked KILLED)", file=sys.stderr)
        sys.exit(130)
