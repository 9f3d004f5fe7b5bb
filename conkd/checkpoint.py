"""Checkpoints: self-describing, written atomically, validated on load, resumable.

A checkpoint stores the model's constructor as a ``_target_`` dict, so any command can rebuild the
network with :func:`hydra.utils.instantiate` without the run's config. ``last.pt`` also holds
what an exact resume needs: optimizer, scheduler, every RNG state, the training state (epoch,
batch within it, running sums, best, history) and the MLflow run id. Writes go to a temporary
file, are fsync'd and renamed; the previous ``last.pt`` is kept as ``last.prev.pt``, so a kill at
any point, a truncated file or a full disk leaves a good checkpoint to resume from.
"""

from __future__ import annotations

import copy
import errno
import logging
import random
import signal
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from conkd import store
from conkd.devices import copies_done, download
from conkd.errors import ConKDError
from conkd.targets import CHECKPOINT_TARGETS, build

log = logging.getLogger("conkd")

#: The resumable checkpoint and the one before it.
LAST, PREVIOUS = "last.pt", "last.prev.pt"


@contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it.

    A KeyboardInterrupt raised inside ``torch.save`` would cut the write and leave ``.tmp``
    behind. While the block runs, SIGINT is only recorded (a signal mask would not do: the signal
    goes to any thread that leaves it unblocked); the recorded signal is re-delivered to the
    previous handler when the block ends. Python runs signal handlers in the main thread only, so
    elsewhere (and where the handler was not set from Python) this is a no-op.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is None
    ):
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(*caught[0])
    elif caught and previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


def save_checkpoint(
    path: Path, model: nn.Module, spec: dict[str, Any], keep_previous: bool = False, **extra: Any
) -> None:
    """Write ``path`` so that a crash or a full disk never leaves it half-written.

    The bytes go to ``path.tmp``, are fsync'd, and the file is renamed over ``path`` (then the
    folder is fsync'd). With ``keep_previous`` the old ``path`` first becomes ``last.prev.pt``.
    A failed write (e.g. ENOSPC) removes the temporary file and raises a :class:`ConKDError`;
    the existing checkpoints are untouched. Ctrl-C during the write takes effect after it.
    """
    with ctrl_c_deferred():
        write_content(path, checkpoint_content(model, spec, extra), keep_previous)


def checkpoint_content(model: nn.Module, spec: dict[str, Any], extra: Mapping) -> dict[str, Any]:
    """What a checkpoint file holds: the model's spec and weights, then ``extra``."""
    return {"model": spec, "state_dict": model.state_dict(), **extra}


def write_content(path: Path, content: dict[str, Any], keep_previous: bool) -> None:
    """``content`` as ``path``, atomically (:func:`conkd.store.write_atomic`); a failed write
    is a :class:`ConKDError` that says the previous checkpoint is intact."""
    keep_as = path.with_name(PREVIOUS) if keep_previous else None
    try:
        store.write_atomic(path, lambda tmp: torch.save(content, tmp), keep_as=keep_as)
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "the disk is full" if full else str(err)
        raise ConKDError(
            f"could not write checkpoint {path}: {why}. The previous checkpoint is intact; "
            "free space and re-run the same command to resume from it"
        ) from err


class HostCopy:
    """A checkpoint's content with every tensor copied to host memory
    (:func:`conkd.devices.download`), so training may change the originals while the copy is
    written. The buffers are kept for the next copy of the same checkpoint: the training thread
    then neither waits for the device nor allocates (and page-faults) hundreds of MiB each time.
    """

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []

    def take(self, content: Any) -> tuple[Any, list[torch.cuda.Event]]:
        """The copy, and the events a reader waits for before reading it (queued CUDA copies).
        Containers are copied too (a state dict's ``_metadata`` kept), other leaves deep-copied:
        the history list, say, grows while the copy is written."""
        old, self.buffers = iter(self.buffers), []
        copies: dict[int, Tensor] = {}  # a tensor met twice is copied once
        devices: set[torch.device] = set()

        def walk(x: Any) -> Any:
            if isinstance(x, Tensor):
                if id(x) not in copies:
                    copies[id(x)] = download(x, next(old, None))
                    self.buffers.append(copies[id(x)])
                    devices.add(x.device)
                return copies[id(x)]
            if isinstance(x, dict):
                out = copy.copy(x)  # same type and attributes (OrderedDict._metadata)
                for k, v in x.items():
                    out[k] = walk(v)
                return out
            if type(x) in (list, tuple):
                return type(x)(walk(v) for v in x)
            return copy.deepcopy(x)

        return walk(content), copies_done(devices)


class BackgroundWriter:
    """Writes checkpoints in one thread while training goes on.

    The training thread only takes a :class:`HostCopy` (queued device-to-host copies into kept
    buffers) and returns; the thread waits for the copies, then writes the file as
    :func:`write_content` does (atomically, fsync'd). Writes run in the order given. A
    checkpoint waits only for the previous write of the same name (whose buffers it reuses), so
    ``best.pt`` and ``last.pt`` of one epoch are both queued. Once a write fails, the writes
    queued after it are not made: a ``last.pt`` must never name a best epoch whose ``best.pt``
    failed. The error is raised at the next write, at :meth:`flush` or at :meth:`close`.

    torch.save needs the GIL for each of a checkpoint's tensors (thousands, for a ResNet-101 with
    AdamW and an EMA); while a thread writes, torch's ops in the training thread release the GIL
    as they dispatch, so the training thread loses little (``benchmarks/checkpoint_write.py``).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conkd-checkpoint")
        self._copies: dict[str, HostCopy] = {}
        self._pending: dict[str, Future] = {}
        self._failed: BaseException | None = None  # the first failed write's error

    def write(self, path: Path, content: dict[str, Any], keep_previous: bool) -> None:
        """Queue ``content`` as ``path``; returns once it is copied to host memory."""
        for name, future in list(self._pending.items()):
            if future.done() or name == path.name:  # the same name: its buffers are reused
                del self._pending[name]
                future.result()  # raises that write's error
        if self._failed is not None:
            raise self._failed
        copied, events = self._copies.setdefault(path.name, HostCopy()).take(content)
        self._pending[path.name] = self._pool.submit(
            self._write, path, copied, events, keep_previous
        )

    def _write(
        self, path: Path, content: dict[str, Any], events: list, keep_previous: bool
    ) -> None:
        if self._failed is not None:  # an earlier write failed: leave the files as they are
            raise ConKDError(f"{path} was not written: {self._failed}")
        try:
            for event in events:
                event.synchronize()
            write_content(path, content, keep_previous)
        except BaseException as err:
            self._failed = err
            raise

    def flush(self, raise_errors: bool = True) -> None:
        """Wait for the writes in flight. The first failed one's error is raised (the others
        logged), or with ``raise_errors`` false (training already ends with another error) all
        are logged."""
        pending, self._pending = list(self._pending.values()), {}
        errors = []
        for future in pending:
            try:
                future.result()
            except Exception as err:
                errors.append(err)
        for err in errors[1:] if raise_errors else errors:
            log.error("%s", err)
        if errors and raise_errors:
            raise errors[0]

    def close(self, raise_errors: bool = True) -> None:
        """:meth:`flush`, then end the thread and free the host buffers."""
        try:
            self.flush(raise_errors)
        finally:
            self._pool.shutdown()
            self._copies.clear()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain types only)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConKDError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of many kinds
        raise ConKDError(f"checkpoint {p} is not a readable ConKD checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "state_dict" not in ckpt:
        raise ConKDError(f"{p} is not a ConKD checkpoint (no model spec / state_dict)")
    return ckpt


def latest_resumable(directory: Path) -> dict[str, Any] | None:
    """The newest readable resume checkpoint in ``directory``: ``last.pt``, or ``last.prev.pt``
    when ``last.pt`` is missing (killed between the two renames), truncated or corrupt (which is
    reported). None when there is none."""
    for name in (LAST, PREVIOUS):
        path = directory / name
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
        except ConKDError as err:
            log.warning("%s; trying the checkpoint before it", err)
            continue
        if "train_state" in ckpt:
            ckpt["path"] = str(path)
            return ckpt
        log.warning("%s has no training state (written before resumable checkpoints)", path)
    return None


def rng_state() -> dict[str, Any]:
    """Every global RNG a training step may draw from (dropout, samplers), as tensors and
    plain types so ``weights_only`` loading accepts them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def instantiate_model(spec: Mapping[str, Any], what: str = "model") -> nn.Module:
    """Build the network a checkpoint's spec describes (only :data:`CHECKPOINT_TARGETS`)."""
    return build(dict(spec), f"{what} spec", targets=CHECKPOINT_TARGETS)


def build_from_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights."""
    model = instantiate_model(ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def check_compatible(
    ckpt: Mapping[str, Any],
    expected: Mapping[str, Any],
    classes: list[str],
    what: str,
    path: str,
    hint: str = "choose the matching model or checkpoint",
) -> None:
    """Raise a clear error when a checkpoint's architecture, class count or class *names* differ
    from this run's: two datasets with ten classes each are still different tasks."""
    spec = ckpt["model"]
    for key in ("arch", "num_classes"):
        if spec.get(key) != expected.get(key):
            raise ConKDError(
                f"{what} checkpoint {path} was built with {key}={spec.get(key)!r}, but this run "
                f"expects {key}={expected.get(key)!r}; {hint}"
            )
    stored = ckpt.get("classes")
    if stored is not None and list(stored) != list(classes):
        differ = [f"{a!r}!={b!r}" for a, b in zip(stored, classes) if a != b][:3]
        raise ConKDError(
            f"{what} checkpoint {path} was trained on other classes than this dataset's "
            f"({', '.join(differ)}); {hint}"
        )


def in_background(want: bool | str, device: torch.device) -> bool:
    """Whether a run on ``device`` writes its checkpoints in a :class:`BackgroundWriter`
    (``want``: True, False or ``"auto"``: on a CUDA device). On a CPU the training thread and
    the writer share the same cores, and background writes were measured no faster there
    (``benchmarks/checkpoint_write.py`` on 2 cores: wall-time ratios from 0.89 to 1.20 over
    runs, no consistent gain); beside a GPU the training thread only queues the device-to-host
    copies and goes on filling the GPU's queue."""
    return bool(want) if want != "auto" else device.type == "cuda"


@dataclass(eq=False)
class Checkpointer:
    """Writes a run's checkpoints: the resumable ``last.pt`` and ``best.pt`` (weights and
    metrics); :class:`conkd.callbacks.CheckpointCallback` says when.

    ``extra`` is stored in every checkpoint (classes, stage, resolved config, MLflow run id), so
    ``eval.py`` and students can use a checkpoint without the run's config. With a weight
    average (``average``, :mod:`conkd.averaging`) ``best.pt`` holds the averaged weights (the
    ones validated, so students and the teacher cache distil from them) and ``last.pt`` both.
    With ``background`` the files are written by a :class:`BackgroundWriter` while training
    goes on; :meth:`close` waits for them.
    """

    directory: Path
    model: nn.Module
    spec: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    average: nn.Module | None = None
    background: bool = False

    def __post_init__(self) -> None:
        self._writer = BackgroundWriter() if self.background else None

    def save_last(self, state: Any, **info: Any) -> None:
        """Everything an exact resume needs, as ``last.pt`` (the previous one kept)."""
        self._save(
            LAST,
            self.model,
            keep_previous=True,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            rng=rng_state(),
            train_state=state.state_dict(),
            average=self.average.state_dict() if self.average is not None else None,
            **info,
        )

    def save_best(self, **info: Any) -> None:
        """The weights of a new best epoch (the average's, when kept), as ``best.pt``, with
        ``info`` (epoch, metrics)."""
        model = self.model if self.average is None else self.average.module
        self._save("best.pt", model, keep_previous=False, **info)

    def _save(self, name: str, model: nn.Module, keep_previous: bool, **info: Any) -> None:
        path = self.directory / name
        if self._writer is None:
            save_checkpoint(path, model, self.spec, keep_previous, **info, **self.extra)
        else:
            content = checkpoint_content(model, self.spec, {**info, **self.extra})
            self._writer.write(path, content, keep_previous)

    def flush(self) -> None:
        """Wait for the checkpoints still being written (a failed write raises)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the checkpoints still being written and end the writer's thread (see
        :meth:`BackgroundWriter.flush`)."""
        if self._writer is not None:
            self._writer.close(raise_errors)


def restore(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    average: nn.Module | None = None,
) -> None:
    """Load a resume checkpoint's weights, weight average, optimizer, scheduler and RNG states
    in place."""
    model.load_state_dict(ckpt["state_dict"])
    if average is not None:
        if ckpt.get("average") is None:
            raise ConKDError(f"{ckpt.get('path', 'the checkpoint')} keeps no weight average")
        average.load_state_dict(ckpt["average"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
