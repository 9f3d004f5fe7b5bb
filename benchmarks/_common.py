"""Shared by the benchmark scripts: the project root on ``sys.path``, their flags, config
composition and the overrides they share, the timing of a training epoch, and runs of
``train.py`` (single runs and ``conkd_lion`` sweeps) in child processes."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CONKD_ROOT", str(ROOT))

#: Default ``--data``: Imagenette's class folders next to the checkout.
DATA = str(ROOT.parent / "shared" / "data" / "imagenette")
#: Default ``--cache-dir``: decoded arrays kept across sittings, so decoding is never timed.
CACHE_DIR = str(Path(tempfile.gettempdir()) / "conkd-bench-cache")
#: Help of the flags that mean the same in every script.
_HELP = {"keep": "keep the working folder"}

#: No progress bars and no MLflow: a timed run does nothing but train.
QUIET = ["trainer.progress=false", "mlflow.enabled=false"]
#: A ResNet-101 teacher of 2 steps: its accuracy does not matter for timing, its checkpoint does.
QUICK_TEACHER = ["experiment=teacher", "trainer.epochs=1", "trainer.max_steps_per_epoch=2"]


def parser(doc: str, **flags: Any) -> argparse.ArgumentParser:
    """The script's argument parser: ``doc`` (its docstring) shown as written, then one
    ``--flag-name`` per keyword, in order. A keyword's value is the flag's default (an int
    makes the flag take ints, ``False`` makes it a switch), or ``(default, help)``, or a dict
    of ``add_argument`` keywords."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    for name, spec in flags.items():
        if not isinstance(spec, dict):
            default, text = spec if isinstance(spec, tuple) else (spec, _HELP.get(name))
            spec = {"default": default, "help": text}
            if default is False:
                spec = {"action": "store_true", "help": text}
            elif isinstance(default, int):
                spec["type"] = int
        ap.add_argument("--" + name.replace("_", "-"), **spec)
    return ap


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


def dated_dir(base: str | Path) -> Path:
    """A new folder under ``base`` named by the time now, for results kept after the script."""
    out = Path(base) / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True)
    return out


def compose(overrides: list[str]):
    """``conf/train.yaml`` composed with ``overrides``, as ``python train.py`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf")):
        return hydra_compose("train", overrides=overrides)


def dataset_overrides(
    root: str | Path,
    image_size: int,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    *,
    workers: int | None = None,
    verify: bool = False,
) -> list[str]:
    """``dataset=imagefolder`` on the class folders at ``root`` at ``image_size`` px (and
    ``batch_size``, ``workers`` loader workers), decoded once into ``cache_dir``/decoded. The
    files are trusted as the benchmark found them (no header check of each) unless ``verify``
    (the config's own setting)."""
    out = ["dataset=imagefolder", f"dataset.root={Path(root)}"]
    if not verify:
        out.append("dataset.source.verify=false")
    out.append(f"dataset.image_size={image_size}")
    if batch_size is not None:
        out.append(f"dataset.batch_size={batch_size}")
    if workers is not None:
        out.append(f"dataset.num_workers={workers}")
    if cache_dir is not None:
        out.append(f"dataset.decode.dir={cache_dir}/decoded")
    return out


def tiny_overrides(data: Path, work: Path, epochs: int, steps: int) -> list[str]:
    """A short run on a generated image folder ``data`` (32 px, batch 8, no loader workers, a
    fifth held out for validation, no ImageNet stem) of ``epochs`` x ``steps`` steps, with its
    caches and its MLflow store (SQLite) under ``work``."""
    return [
        *dataset_overrides(data, 32, 8, workers=0, verify=True),
        "dataset.val_fraction=0.2",
        "model.small_stem=false",
        f"trainer.epochs={epochs}",
        f"trainer.max_steps_per_epoch={steps}",
        "trainer.progress=false",
        f"paths.cache_dir={work / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
    ]


def train_teacher(common: list[str], out_dir: str | Path) -> str:
    """Trains :data:`QUICK_TEACHER` on ``common`` in this process, into ``out_dir``; returns
    the ``teacher_ckpt=`` override naming its checkpoint."""
    from conkd.run import run

    run(compose([*common, *QUICK_TEACHER, f"paths.output_dir={out_dir}"]))
    return f"teacher_ckpt={out_dir}/checkpoints/best.pt"


def setup_parts(overrides: list[str]):
    """The project's run parts (``conkd.run.setup``) for the composed ``overrides``."""
    from conkd.run import setup

    return setup(compose(overrides), None)


def epoch_rate(parts, epoch: int, steps: int, count_loader: bool = False) -> tuple[float, dict]:
    """Images/s of epoch ``epoch`` (``steps`` steps) of ``parts`` (:func:`setup_parts`) through
    ``conkd.engine.train_one_epoch``, and the epoch's metrics. The clock starts once the
    epoch's loader is made, or before it with ``count_loader``; on CUDA it waits for the GPU."""
    import torch

    from conkd.engine import TrainState, train_one_epoch

    cuda = parts.job.device.type == "cuda"
    loader = None if count_loader else parts.loaders.train(epoch)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    if loader is None:
        loader = parts.loaders.train(epoch)
    metrics = train_one_epoch(parts.job, loader, epoch, TrainState())
    if cuda:
        torch.cuda.synchronize()
    return steps * parts.data.batch_size / (time.perf_counter() - start), metrics


def abba(names: Iterable[str], rounds: int) -> Iterator[tuple[int, str]]:
    """``(round, name)`` for ``rounds`` rounds over ``names``, every other round in reverse
    (A B, B A, ...): neither machine noise nor going first favours a side."""
    names = list(names)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            yield r, name


def cache_metas(cache_dir: Path) -> list[dict]:
    """The ``meta.json`` (build time, epochs, sizes) of each teacher cache in ``cache_dir``."""
    return [json.loads(m.read_text()) for m in cache_dir.glob("*/meta.json")]


def train_cmd(*overrides: str, torchrun: int | None = None) -> list[str]:
    """``python train.py overrides``; with ``torchrun`` under torchrun, that many processes
    (gloo on the CPU, NCCL on GPUs)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return [sys.executable, *(launcher if torchrun else []), str(ROOT / "train.py"), *overrides]


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a ``train.py`` child: this one, ``CONKD_ROOT`` this checkout, plus
    ``extra``, without ``HYDRA_FULL_ERROR`` (a failing run says ``error: ...``, no traceback)."""
    env = {**os.environ, "CONKD_ROOT": str(ROOT), **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def timed_train(*overrides: str) -> float:
    """Runs ``train.py overrides`` (printing the command, failing if it does); its wall seconds."""
    cmd = train_cmd(*overrides)
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def sweep_teacher(ckpt: str | None, common: list[str], out: Path, *schedule: str) -> str:
    """``ckpt``, or (when None) a ResNet-101 teacher trained on ``common`` for ``schedule``
    into ``out``/teacher: its checkpoint's path."""
    if ckpt is not None:
        return ckpt
    timed_train(
        "experiment=teacher",
        *common,
        *schedule,
        "mlflow.register=null",
        f"hydra.run.dir={out / 'teacher'}",
    )
    return str(out / "teacher" / "checkpoints" / "best.pt")


def study_stats(name: str, storage: str) -> dict[str, Any]:
    """Trials, epochs consumed, trials pruned and best value of the Optuna study ``name``."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    return {
        "trials": len(study.trials),
        "epochs": sum(len(t.intermediate_values) for t in study.trials),
        "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
        "best": max(t.value for t in done) if done else float("nan"),
        "study": study,
    }


def lion_sweep(out: Path, name: str, trials: int, *overrides: str) -> dict[str, Any]:
    """``train.py -m hparams_search=conkd_lion overrides``: ``trials`` trials as study ``name``
    in ``out``/optuna.db (the sampler seeded as configured), sweep folder ``out``/``name``;
    :func:`study_stats` and ``wall_s``."""
    storage = f"sqlite:///{out / 'optuna.db'}"
    wall = timed_train(
        "-m",
        "hparams_search=conkd_lion",
        *overrides,
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweep.dir={out / name}",
    )
    return {"wall_s": wall, **study_stats(name, storage)}
