"""Shared by the benchmark scripts: the project root on ``sys.path`` and config composition."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CONKD_ROOT", str(ROOT))


def compose(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides``, as ``python train.py`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf")):
        return hydra_compose("train", overrides=overrides)


def missing_dataset(data: str | Path) -> bool:
    """True (and says so) when ``data`` is not a class-folder dataset: the benchmark skips."""
    if (Path(data) / "train").is_dir():
        return False
    print(f"skipped: no class-folder dataset at {data} (pass --data)")
    return True


def scratch_dir(prefix: str, keep: bool = False) -> Path:
    """A temporary working folder for a benchmark's runs, removed when the script exits
    (checkpoints and MLflow stores take GBs) unless ``keep`` (``--keep``), which prints it."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    if keep:
        atexit.register(print, f"working folder kept: {work}")
    else:
        atexit.register(shutil.rmtree, work, True)
    return work
