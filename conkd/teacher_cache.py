"""Teacher-output cache with augmentation replay: the frozen teacher runs once, not per trial.

Why: in a KD sweep every trial distils from the same frozen teacher over the same augmented
views, because the view of sample ``i`` in epoch ``e`` is a pure function of ``(seed, e, i)``
(:func:`conkd.data.sample_seed`, :class:`conkd.data.EpochSampler`). Running a ResNet-101 forward
pass per student step per trial recomputes identical numbers; Fast Knowledge Distillation
(Shen & Xing, 2021) stores the teacher's soft labels per crop once and replays them. Here the
*whole* view is replayed (not only a crop box): the cache holds the teacher's outputs for
exactly the batches the student will see, so student and teacher stay on the same view, which
"a good teacher is patient and consistent" (Beyer et al., 2022) shows matters (one teacher output
per image while the student sees other crops is measurably worse). The cache is the loop's
teacher function, ``cache(x, epoch, index)``, in place of ``lambda x, epoch, index: teacher(x)``
(:func:`conkd.engine.online_teacher`); no teacher network is loaded when it is reused.

On disk, ``<root>/<cache_key(fields)>/`` holds, per cached output name (``logits``,
``projection``, ...):

* ``train_<name>.npy``: float16, ``(epochs, N_train, *D)``, row ``[e, i]`` = the teacher's output
  on the view of train sample ``i`` in epoch ``e``;
* ``val_<name>.npy``: float16, ``(N_val, *D)``, the un-augmented validation views;

plus ``filled.npy`` (bool ``(epochs, N_train)``: which ``(e, i)`` were computed, since with
``max_steps_per_epoch`` a student sees only part of each epoch; a lookup of an unfilled pair
raises instead of returning zeros) and ``meta.json``, written last, with the key fields, shapes,
byte sizes and sha256 of every array file, the build time and the total size.

Crash safety: a cache is built in a hidden sibling folder (``.<key>.building-*``), every file is
fsync'd, ``meta.json`` is written last and the folder is renamed into place in one atomic
``os.replace``; a killed build therefore leaves only a hidden folder that never looks complete
(:func:`ensure` removes it). :func:`ensure` builds under a :class:`filelock.FileLock`, so the
first trial of a sweep builds and parallel trials wait and reuse.

Checksum policy: :meth:`TeacherCache.open` verifies, on *every* open, that ``meta.json`` parses,
that every file exists with its recorded byte size, shape and dtype, and (``verify=True``, the
default) that each file's sha256 matches. sha256 runs at about 1.2 GB/s on one core of the
project machines, and the run caps caches at ``teacher_cache.max_gb`` (default 4), so a full check
costs at most a few seconds per trial against minutes of training, and it catches silent
corruption (a flipped byte keeps the size) that a size check cannot; ``verify=False`` keeps the
size, shape and dtype checks for callers that must open very large caches quickly.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from numpy.lib.format import open_memmap
from torch import Tensor, nn
from tqdm.auto import tqdm

from conkd.decoded import fsync_dir, fsync_file
from conkd.engine import autocast, to_device
from conkd.errors import ConKDError

log = logging.getLogger("conkd")

#: Bumped whenever the layout or meaning of the files changes; part of every key, so an old
#: cache is never read by new code (it gets a new folder instead).
FORMAT_VERSION = 1
META_FILE = "meta.json"
FILLED_FILE = "filled.npy"
#: Hex digits of the sha256 kept in folder names (80 bits: collisions are not a concern).
KEY_LENGTH = 20
_HASH_BLOCK = 1 << 23
_BUILDING = "building"
_STALE = "stale"


class TeacherCacheError(ConKDError):
    """A teacher cache cannot serve a request (e.g. an ``(epoch, i)`` it never computed)."""


class InvalidTeacherCache(TeacherCacheError):
    """A cache folder exists but must not be used: partial, truncated or corrupt."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, or TypeError.

    Unknown objects are refused rather than ``str()``-ed: a repr with a memory address would make
    the key differ between processes (no reuse), and a lossy repr could make two different
    configurations share one cache (wrong teacher outputs, silently).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON has no NaN / inf
            return {"__nonfinite_float__": repr(value)}
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cache key fields need string keys, got {k!r}")
            out[k] = _jsonable(v)
        return out
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)) or (
        isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray))
    ):
        return [_jsonable(v) for v in value]
    raise TypeError(
        f"cannot put {type(value).__name__} into a teacher-cache key; pass plain values "
        "(str, numbers, bools, lists, dicts), e.g. OmegaConf.to_container(cfg, resolve=True)"
    )


def canonical_json(fields: Mapping[str, Any]) -> str:
    """The canonical JSON of ``fields``: sorted keys, no whitespace, plain types only."""
    return json.dumps(
        _jsonable(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def cache_key(fields: Mapping[str, Any]) -> str:
    """Folder name of the cache for ``fields``: the first :data:`KEY_LENGTH` hex digits of the
    sha256 of their canonical JSON (with :data:`FORMAT_VERSION`).

    ``fields`` must hold everything the cached outputs depend on: the teacher weights'
    :func:`state_dict_digest`, the dataset fingerprint, the transform config, image size, seed,
    epochs, steps per epoch, batch size, precision, channels_last and the output names. Anything
    left out lets two runs that see different views share one cache.
    """
    text = canonical_json({"__teacher_cache_format__": FORMAT_VERSION, "fields": fields})
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:KEY_LENGTH]


def state_dict_digest(module: nn.Module | Mapping[str, Any]) -> str:
    """sha256 (hex) over a module's (or state dict's) sorted parameter / buffer names, shapes,
    dtypes and raw bytes: the teacher-weights field of a cache key.

    The bytes are hashed exactly (bf16 and fp16 included), so any retrained or fine-tuned teacher
    gets a new key, while the same weights loaded anywhere (CPU, GPU, another process) give the
    same digest.
    """
    state = module.state_dict() if isinstance(module, nn.Module) else module
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{name}:tensor:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif value is None or isinstance(value, (bool, int, float, str, bytes)):
            h.update(f"{name}:{type(value).__name__}:{value!r}\n".encode())
        else:
            raise TypeError(f"cannot digest state entry {name!r} of type {type(value).__name__}")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _train_file(output: str) -> str:
    return f"train_{output}.npy"


def _val_file(output: str) -> str:
    return f"val_{output}.npy"


def _positions(index: Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """Dataset positions as a 1-D int64 numpy array (from a tensor on any device, or a list)."""
    if isinstance(index, Tensor):
        index = index.detach().cpu().numpy()
    idx = np.asarray(index)
    if idx.dtype.kind not in "iu":
        raise TeacherCacheError(f"dataset positions must be integers, got dtype {idx.dtype}")
    return idx.astype(np.int64, copy=False).reshape(-1)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class TeacherCache:
    """A complete, verified cache opened read-only by memory map; call it like the teacher.

    ``cache(x, epoch, index)`` returns ``{name: float32 tensor on x.device}`` for each cached
    output: the teacher's outputs on the views of train samples ``index`` in ``epoch``, or on
    the validation samples ``index`` when ``epoch`` is None. Construct with :meth:`open`,
    :meth:`build` or :func:`ensure`; no teacher network is kept.

    Attributes: ``directory``, ``key`` (None when built without fields), ``meta`` (the parsed
    ``meta.json``), ``outputs``, ``epochs``, ``n_train``, ``n_val``, ``size_bytes`` (bytes of
    the array files; ``meta.json``, a few KB, is not counted) and ``build_seconds``.
    """

    def __init__(
        self,
        directory: Path,
        meta: dict[str, Any],
        train: dict[str, np.ndarray],
        val: dict[str, np.ndarray],
        filled: np.ndarray,
    ) -> None:
        self.directory = directory
        self.meta = meta
        self.train = train
        self.val = val
        self.filled = filled
        self.outputs: list[str] = list(meta["outputs"])
        self.key: str | None = meta.get("key")
        self.epochs = int(meta["epochs"])
        self.n_train = int(meta["n_train"])
        self.n_val = int(meta["n_val"])
        self.size_bytes = int(meta["size_bytes"])
        self.build_seconds = float(meta["build_seconds"])

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.directory)!r}, outputs={self.outputs}, epochs={self.epochs}, "
            f"n_train={self.n_train}, n_val={self.n_val}, size_bytes={self.size_bytes})"
        )

    # --- lookups -------------------------------------------------------------------------------

    def __call__(
        self, x: Tensor, epoch: int | None, index: Tensor | np.ndarray | Sequence[int]
    ) -> dict[str, Tensor]:
        """The cached outputs for batch ``x`` (used only for its device), as float32.

        Raises :class:`TeacherCacheError` for an epoch or position outside the cache and for a
        train ``(epoch, i)`` that was never computed: that means the run's loader differs from
        the one the cache was built for (a key field is missing), and zeros would silently train
        the student towards a wrong teacher.
        """
        idx = _positions(index)
        if epoch is None:
            self._check_range(idx, self.n_val, "validation")
            rows = {name: array[idx] for name, array in self.val.items()}
        else:
            epoch = int(epoch)
            if not 0 <= epoch < self.epochs:
                raise TeacherCacheError(
                    f"teacher cache {self.directory} holds epochs 0..{self.epochs - 1}, "
                    f"not epoch {epoch}: it was built for a shorter run"
                )
            self._check_range(idx, self.n_train, "train")
            missing = ~self.filled[epoch, idx]
            if missing.any():
                raise TeacherCacheError(
                    f"teacher cache {self.directory} has no outputs for epoch {epoch}, train "
                    f"samples {idx[missing][:8].tolist()}"
                    f"{' ...' if missing.sum() > 8 else ''}: the student's batches differ from "
                    "the ones it was built for (a cache-key field is missing: batch size, "
                    "max_steps_per_epoch, seed, data split?)"
                )
            rows = {name: array[epoch, idx] for name, array in self.train.items()}
        return {
            name: torch.from_numpy(np.asarray(row, dtype=np.float32)).to(x.device)
            for name, row in rows.items()
        }

    def _check_range(self, idx: np.ndarray, size: int, split: str) -> None:
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            bad = idx[(idx < 0) | (idx >= size)][:8].tolist()
            raise TeacherCacheError(
                f"teacher cache {self.directory} holds {size} {split} samples; positions {bad} "
                "are out of range (built for another dataset split?)"
            )

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str | os.PathLike[str], verify: bool = True) -> TeacherCache | None:
        """Open the complete cache in ``directory``.

        Returns None when ``directory`` does not exist (nothing was built). Raises
        :class:`InvalidTeacherCache` when it exists but must not be used: no readable
        ``meta.json`` (a build that never finished), another format version, a file missing or
        of the wrong byte size (truncated), a shape / dtype that disagrees with ``meta.json``,
        or, with ``verify`` (default), a sha256 mismatch (corrupt bytes). Raising rather than
        returning None keeps "build it" and "something is broken here" apart; :func:`ensure`
        rebuilds in both cases.
        """
        directory = Path(directory)
        if not directory.exists():
            return None
        if not directory.is_dir():
            raise InvalidTeacherCache(f"{directory} is not a folder")
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, ValueError) as err:
            raise InvalidTeacherCache(
                f"{directory} has no readable {META_FILE} ({err.__class__.__name__}): "
                "an unfinished or damaged build"
            ) from err
        try:
            return cls._open_checked(directory, meta, verify)
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as err:
            raise InvalidTeacherCache(
                f"{directory}: {META_FILE} or the arrays are malformed "
                f"({err.__class__.__name__}: {err})"
            ) from err

    @classmethod
    def _open_checked(cls, directory: Path, meta: dict[str, Any], verify: bool) -> TeacherCache:
        if meta.get("format_version") != FORMAT_VERSION:
            raise InvalidTeacherCache(
                f"{directory} has format {meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}"
            )
        outputs = list(meta["outputs"])
        epochs, n_train, n_val = int(meta["epochs"]), int(meta["n_train"]), int(meta["n_val"])
        files: dict[str, dict[str, Any]] = meta["files"]
        expected = [FILLED_FILE] + [f(o) for o in outputs for f in (_train_file, _val_file)]
        missing = sorted(set(expected) - set(files))
        if not outputs or missing:
            raise InvalidTeacherCache(f"{directory}/{META_FILE} lists no entry for {missing}")
        for name in expected:
            path = directory / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise InvalidTeacherCache(f"{path} is missing") from None
            if size != int(files[name]["bytes"]):
                raise InvalidTeacherCache(
                    f"{path} has {size} bytes, {META_FILE} records {files[name]['bytes']} "
                    "(truncated or overwritten)"
                )
        if verify:
            for name in expected:
                if _sha256(directory / name) != files[name]["sha256"]:
                    raise InvalidTeacherCache(
                        f"{directory / name} does not match its recorded sha256 (corrupt)"
                    )
        arrays: dict[str, np.ndarray] = {}
        for name in expected:
            array = np.load(directory / name, mmap_mode="r", allow_pickle=False)
            shape, dtype = tuple(files[name]["shape"]), np.dtype(files[name]["dtype"])
            if array.shape != shape or array.dtype != dtype:
                raise InvalidTeacherCache(
                    f"{directory / name} holds {array.shape} {array.dtype}, {META_FILE} records "
                    f"{shape} {dtype}"
                )
            arrays[name] = array
        filled = arrays[FILLED_FILE]
        if filled.shape != (epochs, n_train) or filled.dtype != np.bool_:
            raise InvalidTeacherCache(f"{directory / FILLED_FILE} has shape {filled.shape}")
        for o in outputs:
            train, val = arrays[_train_file(o)], arrays[_val_file(o)]
            if train.shape[:2] != (epochs, n_train) or val.shape[:1] != (n_val,):
                raise InvalidTeacherCache(
                    f"{directory}: output {o!r} has shapes {train.shape} / {val.shape}, "
                    f"expected ({epochs}, {n_train}, ...) / ({n_val}, ...)"
                )
        return cls(
            directory,
            meta,
            {o: arrays[_train_file(o)] for o in outputs},
            {o: arrays[_val_file(o)] for o in outputs},
            filled,
        )

    # --- building ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        directory: str | os.PathLike[str],
        teacher: nn.Module | Callable[[Tensor], Mapping[str, Tensor | None]],
        train_loader: Callable[[int], Iterable],
        val_loader: Iterable,
        epochs: int,
        max_steps: int | None,
        outputs: Sequence[str],
        n_train: int,
        n_val: int,
        device: torch.device | str = "cpu",
        precision: str = "32",
        channels_last: bool = False,
        fields: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> TeacherCache:
        """Run ``teacher`` over exactly the batches the student will see and write the cache.

        Per epoch ``e``: the first ``max_steps`` batches ``(x, y, i)`` of ``train_loader(e)``
        (all without ``max_steps``, as :func:`conkd.engine.train_one_epoch`), outputs stored at
        ``[e, i]``; then every ``val_loader`` batch at ``[i]``. The teacher (already on
        ``device``) runs in eval mode, no_grad, with the run's autocast and memory format, so
        the numbers are those the online teacher gives; its train/eval mode is restored.
        Written into a hidden sibling folder, ``meta.json`` last, renamed to ``directory``
        (which must not exist) in one step. Returns the opened cache.
        """
        start = time.perf_counter()
        directory = Path(directory)
        outputs = list(outputs)
        _check_build_args(outputs, epochs, n_train, n_val, max_steps, precision)
        if directory.exists():
            raise FileExistsError(
                f"{directory} exists; open it with TeacherCache.open, or remove it to rebuild"
            )
        device = torch.device(device)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.{_BUILDING}-{os.getpid()}-{uuid.uuid4().hex}")
        tmp.mkdir()
        module = teacher if isinstance(teacher, nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            meta = _write_cache(
                tmp,
                teacher,
                train_loader,
                val_loader,
                epochs,
                max_steps,
                outputs,
                n_train,
                n_val,
                device,
                precision,
                channels_last,
                progress,
            )
            meta.update(
                key=None if fields is None else cache_key(fields),
                fields=None if fields is None else _jsonable(fields),
                precision=precision,
                channels_last=bool(channels_last),
                max_steps=max_steps,
                device=str(device),
                torch=torch.__version__,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                build_seconds=time.perf_counter() - start,
            )
            _commit(tmp, directory, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if module is not None:
                module.train(was_training)
        cache = cls.open(directory, verify=False)
        assert cache is not None  # renamed into place just above
        return cache

    @classmethod
    def ensure(
        cls,
        root: str | os.PathLike[str],
        fields: Mapping[str, Any],
        build_fn: Callable[[Path], Any],
        verify: bool = True,
    ) -> tuple[TeacherCache, bool]:
        """:func:`ensure` (the same function, as a class method)."""
        return ensure(root, fields, build_fn, verify=verify)


def _check_build_args(
    outputs: list[str],
    epochs: int,
    n_train: int,
    n_val: int,
    max_steps: int | None,
    precision: str,
) -> None:
    """Refuse a build whose shape or settings cannot give a usable cache."""
    if not outputs or len(set(outputs)) != len(outputs):
        raise ConKDError(f"teacher cache outputs must be distinct names, got {outputs}")
    if epochs < 1 or n_train < 1 or n_val < 1:
        raise ConKDError(
            f"teacher cache needs epochs, n_train and n_val >= 1, got {epochs}, {n_train}, {n_val}"
        )
    if max_steps is not None and max_steps < 1:
        raise ConKDError(f"teacher cache max_steps must be None or >= 1, got {max_steps}")
    if precision not in ("32", "bf16"):
        raise ConKDError(f"teacher cache precision must be 32 or bf16, got {precision!r}")


def _commit(tmp: Path, directory: Path, meta: dict[str, Any]) -> None:
    """``meta.json`` last (its presence marks a complete build), fsync, rename into place."""
    with open(tmp / META_FILE, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)


def _teacher_rows(
    teacher: Callable[[Tensor], Mapping[str, Tensor | None]],
    x: Tensor,
    idx: np.ndarray,
    size: int,
    split: str,
    outputs: list[str],
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> dict[str, np.ndarray]:
    """The teacher's float16 rows of ``outputs`` for batch ``x`` at positions ``idx``, checked
    (positions in range, every output present, one row per position, finite in float16)."""
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ConKDError(
            f"teacher cache: {split} loader yields positions up to {idx.max()}, "
            f"but n_{split}={size}"
        )
    with autocast(device, precision):
        out = teacher(to_device(x, device, channels_last))
    rows = {}
    for name in outputs:
        value = out.get(name)
        if value is None:
            raise ConKDError(
                f"the teacher has no {name!r} output to cache (it returns "
                f"{sorted(k for k, v in out.items() if v is not None)})"
            )
        if value.shape[0] != idx.size:
            raise ConKDError(
                f"teacher output {name!r} has {value.shape[0]} rows for a batch of "
                f"{idx.size} positions"
            )
        row32 = value.detach().float().cpu().numpy()
        row = row32.astype(np.float16)
        if not np.isfinite(row).all():
            what = "is not finite" if not np.isfinite(row32).all() else "overflows float16"
            raise ConKDError(f"teacher output {name!r} {what}; it cannot be cached")
        rows[name] = row
    return rows


def _row_array(
    arrays: dict[str, np.ndarray], name: str, path: Path, lead: tuple, row: np.ndarray
) -> np.ndarray:
    """``arrays[name]``, created as a float16 memmap at the first batch, when ``D`` is known."""
    if name not in arrays:
        arrays[name] = open_memmap(path, mode="w+", dtype=np.float16, shape=(*lead, *row.shape[1:]))
    return arrays[name]


def _finish_files(tmp: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Flush, fsync and hash every array file: shape, dtype, bytes and sha256 for meta.json."""
    files: dict[str, dict[str, Any]] = {}
    for name, a in arrays.items():
        a.flush()  # msync: the bytes are in the file before it is fsync'd and hashed
        files[name] = {"shape": list(a.shape), "dtype": a.dtype.str}
    for name, info in files.items():
        path = tmp / name
        fsync_file(path)
        info["bytes"] = path.stat().st_size
        info["sha256"] = _sha256(path)
    return files


@torch.no_grad()
def _write_cache(
    tmp: Path,
    teacher: Callable[[Tensor], Mapping[str, Tensor | None]],
    train_loader: Callable[[int], Iterable],
    val_loader: Iterable,
    epochs: int,
    max_steps: int | None,
    outputs: list[str],
    n_train: int,
    n_val: int,
    device: torch.device,
    precision: str,
    channels_last: bool,
    progress: bool,
) -> dict[str, Any]:
    """Write the arrays of a cache into ``tmp`` (flushed and fsync'd); returns the meta without
    the build-level fields. Arrays are created at the first batch, when ``D`` is known."""
    train: dict[str, np.ndarray] = {}
    val: dict[str, np.ndarray] = {}
    filled = open_memmap(tmp / FILLED_FILE, mode="w+", dtype=np.bool_, shape=(epochs, n_train))
    val_seen = np.zeros(n_val, dtype=bool)

    def rows(x: Tensor, idx: np.ndarray, size: int, split: str) -> dict[str, np.ndarray]:
        args = (outputs, device, precision, channels_last)
        return _teacher_rows(teacher, x, idx, size, split, *args)

    bar = tqdm(total=None, desc="teacher cache", unit="batch", disable=not progress)
    try:
        for epoch in range(epochs):
            loader = train_loader(epoch)
            if bar.total is None and hasattr(loader, "__len__"):
                steps = len(loader)  # type: ignore[arg-type]
                steps = steps if max_steps is None else min(steps, max_steps)
                val_steps = len(val_loader) if hasattr(val_loader, "__len__") else 0  # type: ignore[arg-type]
                bar.total = epochs * steps + val_steps
                bar.refresh()
            for step, (x, _, index) in enumerate(loader):
                if max_steps is not None and step >= max_steps:
                    break
                idx = _positions(index)
                for name, row in rows(x, idx, n_train, "train").items():
                    path = tmp / _train_file(name)
                    _row_array(train, name, path, (epochs, n_train), row)[epoch, idx] = row
                filled[epoch, idx] = True
                bar.update()
        for x, _, index in val_loader:
            idx = _positions(index)
            for name, row in rows(x, idx, n_val, "val").items():
                _row_array(val, name, tmp / _val_file(name), (n_val,), row)[idx] = row
            val_seen[idx] = True
            bar.update()
    finally:
        bar.close()
    if not filled.any():
        raise ConKDError("teacher cache: the train loader yielded no batches")
    if not val_seen.all():
        raise ConKDError(
            f"teacher cache: the validation loader covered {int(val_seen.sum())} of "
            f"n_val={n_val} samples"
        )
    filled_count = int(filled.sum())
    arrays = {FILLED_FILE: filled}
    arrays.update({_train_file(o): a for o, a in train.items()})
    arrays.update({_val_file(o): a for o, a in val.items()})
    files = _finish_files(tmp, arrays)
    return {
        "format_version": FORMAT_VERSION,
        "outputs": outputs,
        "epochs": epochs,
        "n_train": n_train,
        "n_val": n_val,
        "filled": filled_count,
        "files": files,
        "size_bytes": sum(info["bytes"] for info in files.values()),
    }


# --------------------------------------------------------------------------------------------
# Build once, share
# --------------------------------------------------------------------------------------------


def _set_aside(path: Path) -> None:
    """Remove ``path`` by first renaming it to a hidden name (atomic), so no reader ever sees
    a half-deleted cache under the real name."""
    aside = path.with_name(f".{path.name}.{_STALE}-{os.getpid()}-{uuid.uuid4().hex}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(root: Path, key: str) -> None:
    """Hidden folders of killed builds / removals of ``key`` (only called under its lock)."""
    for pattern in (f".{key}.{_BUILDING}-*", f".{key}.{_STALE}-*"):
        for path in root.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _open_key(directory: Path, key: str, verify: bool) -> TeacherCache | None:
    cache = TeacherCache.open(directory, verify=verify)
    if cache is not None and cache.key is not None and cache.key != key:
        raise InvalidTeacherCache(f"{directory} records key {cache.key}, expected {key}")
    return cache


def ensure(
    root: str | os.PathLike[str],
    fields: Mapping[str, Any],
    build_fn: Callable[[Path], Any],
    verify: bool = True,
) -> tuple[TeacherCache, bool]:
    """The cache for ``fields`` under ``root``, building it if needed; returns
    ``(cache, built_now)``.

    The folder is ``root / cache_key(fields)``. A valid cache there is opened without any lock
    (readers never block each other). Otherwise this takes ``FileLock(root / "<key>.lock")``,
    checks again (another process may have built it while we waited), removes an invalid
    leftover and hidden folders of killed builds, and calls ``build_fn(directory)``, which must
    create ``directory`` (typically a :meth:`TeacherCache.build` call with the same ``fields``).
    So the first trial of a sweep builds and the others, parallel or later, reuse.
    ``verify`` is passed to :meth:`TeacherCache.open` (see the module's checksum policy).
    """
    root = Path(root)
    key = cache_key(fields)
    directory = root / key
    try:
        cache = _open_key(directory, key, verify)
        if cache is not None:
            return cache, False
    except InvalidTeacherCache as err:
        log.warning("teacher cache %s is unusable (%s); rebuilding it", directory, err)
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("teacher cache %s: waiting for another process to build it", directory)
        lock.acquire()
    try:
        try:
            cache = _open_key(directory, key, verify)
            if cache is not None:
                return cache, False  # built by another process while we waited
        except InvalidTeacherCache:
            _set_aside(directory)
        _remove_leftovers(root, key)
        result = build_fn(directory)
        if isinstance(result, TeacherCache) and result.directory == directory:
            cache = result
        else:
            cache = TeacherCache.open(directory, verify=verify)
        if cache is None:
            raise TeacherCacheError(f"the teacher cache build function did not create {directory}")
        if cache.key is not None and cache.key != key:
            raise TeacherCacheError(
                f"the teacher cache in {directory} was built with fields of key {cache.key}, "
                f"not {key}: pass ensure's fields to TeacherCache.build"
            )
        return cache, True
    finally:
        lock.release()
