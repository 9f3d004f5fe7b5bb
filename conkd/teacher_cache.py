"""Teacher-output cache with augmentation replay: the frozen teacher runs once, not per trial.

Why: in a KD sweep every trial distils from the same frozen teacher over the same augmented
views, because the view of sample ``i`` in epoch ``e`` is a pure function of ``(seed, e, i)``
(:meth:`conkd.views.ViewSpec.draw`, :class:`conkd.loaders.EpochSampler`). Running a ResNet-101
forward pass per student step per trial recomputes identical numbers; Fast Knowledge Distillation
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

Crash safety and sharing are :mod:`conkd.store`'s rules: the cache is built in a hidden sibling
folder, every file fsync'd, ``meta.json`` written last and the folder renamed into place in one
step, so a killed build leaves only a hidden folder that never looks complete; :func:`ensure`
builds under a file lock, so the first trial of a sweep builds and parallel trials wait and
reuse. What is the cache's own: the key (:func:`cache_key`, with :data:`FORMAT_VERSION`), the
array layout above, the checks of a lookup and the build that replays the student's batches.

Checksum policy: :meth:`TeacherCache.open` verifies, on *every* open, that ``meta.json`` parses,
that every file exists with its recorded byte size, shape and dtype, and (``verify=True``, the
default) that each file's sha256 matches. sha256 runs at about 1.2 GB/s on one core of the
project machines, and the run caps caches at ``teacher_cache.max_gb`` (default 4), so a full check
costs at most a few seconds per trial against minutes of training, and it catches silent
corruption (a flipped byte keeps the size) that a size check cannot; ``verify=False`` keeps the
size, shape and dtype checks for callers that must open very large caches quickly.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor, nn

from conkd import store
from conkd.devices import upload
from conkd.errors import ConKDError
from conkd.replay import Replay, Teacher, evaluating, positions
from conkd.views import Mixer

#: Bumped whenever the layout or meaning of the files changes; part of every key, so an old
#: cache is never read by new code (it gets a new folder instead).
FORMAT_VERSION = 1
META_FILE = store.META_FILE
FILLED_FILE = "filled.npy"
#: Hex digits of the sha256 kept in folder names (80 bits: collisions are not a concern).
KEY_LENGTH = 20


class TeacherCacheError(ConKDError):
    """A teacher cache cannot serve a request (e.g. an ``(epoch, i)`` it never computed)."""


class InvalidTeacherCache(TeacherCacheError, store.Unusable):
    """A cache folder exists but must not be used: partial, truncated or corrupt (so
    :func:`conkd.store.ensure` sets it aside and rebuilds)."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def cache_key(fields: Mapping[str, Any]) -> str:
    """Folder name of the cache for ``fields``: the first :data:`KEY_LENGTH` hex digits of the
    sha256 of their canonical JSON (with :data:`FORMAT_VERSION`), see :func:`conkd.store.key_of`.

    ``fields`` must hold everything the cached outputs depend on (:func:`conkd.teacher.cache_fields`
    assembles them from the provenance table): the teacher weights' :func:`state_dict_digest`,
    the dataset fingerprint, the view pipeline, the transform config, seed, epochs, steps per
    epoch, batch size, precision, channels_last and the output names. Anything left out lets
    two runs that see different views share one cache.
    """
    try:
        return store.key_of(
            {"__teacher_cache_format__": FORMAT_VERSION, "fields": fields}, KEY_LENGTH
        )
    except TypeError as err:
        raise TypeError(f"teacher-cache key: {err}") from err


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


def _train_file(output: str) -> str:
    return f"train_{output}.npy"


def _val_file(output: str) -> str:
    return f"val_{output}.npy"


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
        self.resident: torch.device | None = None  # set by to_device
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
        idx = positions(index)
        at = idx
        if self.resident is not None:  # a copy, not a wait: the device has no say in the checks
            # the loader's pinned positions themselves where they are what positions() makes
            plain = isinstance(index, Tensor) and index.dtype == torch.int64 and index.dim() == 1
            src = index if plain and index.device.type == "cpu" else torch.from_numpy(idx)
            at = upload(src, self.resident)
        if epoch is None:
            self._check_range(idx, self.n_val, "validation")
            rows = {name: array[at] for name, array in self.val.items()}
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
            rows = {name: array[epoch, at] for name, array in self.train.items()}
        return {name: self._float32(row, x.device) for name, row in rows.items()}

    @staticmethod
    def _float32(row: np.ndarray | Tensor, device: torch.device) -> Tensor:
        if isinstance(row, Tensor):  # resident: gathered on the device
            return row.float()
        return upload(torch.from_numpy(np.asarray(row, dtype=np.float32)), device)

    def to_device(self, device: torch.device) -> None:
        """Keep the outputs in ``device`` memory (float16, copied once) and gather them there;
        the checks of each lookup stay on the host, so a lookup moves only the positions."""
        self.train = {k: torch.from_numpy(np.array(a)).to(device) for k, a in self.train.items()}
        self.val = {k: torch.from_numpy(np.array(a)).to(device) for k, a in self.val.items()}
        self.resident = device

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
            return cls._open_checked(directory, store.read_meta(directory), verify)
        except InvalidTeacherCache:
            raise
        except store.Unusable as err:  # the store's checks, as this cache's error
            raise InvalidTeacherCache(str(err)) from err
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as err:
            raise InvalidTeacherCache(
                f"{directory}: {META_FILE} or the arrays are malformed "
                f"({err.__class__.__name__}: {err})"
            ) from err

    @classmethod
    def _open_checked(cls, directory: Path, meta: dict[str, Any], verify: bool) -> TeacherCache:
        """The arrays :func:`conkd.store.open_arrays` checks, then this layout's shapes."""
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
        arrays = store.open_arrays(directory, {name: files[name] for name in expected}, verify)
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
        teacher: Teacher,
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
        mix: Mixer | None = None,
    ) -> TeacherCache:
        """Run ``teacher`` over exactly the batches the student will see and write the cache.

        Per epoch ``e``: the first ``max_steps`` batches ``(x, y, i)`` of ``train_loader(e)``
        (all without ``max_steps``, as :func:`conkd.engine.train_one_epoch`), outputs stored at
        ``[e, i]``; then every ``val_loader`` batch at ``[i]``. The teacher (already on
        ``device``) runs in eval mode, no_grad, with the run's autocast and memory format, so
        the numbers are those the online teacher gives; its train/eval mode is restored.
        With ``mix`` each training batch is mixed first, as the loop mixes it, so the rows are
        the teacher's outputs on exactly the mixed images the student sees. Written through
        :func:`conkd.store.build_folder` into ``directory`` (which must not exist). Returns the
        opened cache.
        """
        start = time.perf_counter()
        replay = Replay(list(outputs), epochs, n_train, n_val, max_steps, torch.device(device),
                        precision, bool(channels_last), mix)  # fmt: skip
        replay.check()

        def write(tmp: Path) -> dict[str, Any]:
            arrays = _Arrays(tmp, replay)
            replay.run(teacher, train_loader, val_loader, arrays.put, progress)
            return {
                **arrays.finish(),
                "key": None if fields is None else cache_key(fields),
                "fields": None if fields is None else store.jsonable(fields),
                "precision": precision,
                "channels_last": bool(channels_last),
                "max_steps": max_steps,
                "device": str(replay.device),
                "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": time.perf_counter() - start,
            }

        with evaluating(teacher):
            store.build_folder(Path(directory), write)
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


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


class _Arrays:
    """The array files of a cache being built in ``tmp``; a float16 memmap per output and split
    is created at its first batch, when the output's width ``D`` is known."""

    def __init__(self, tmp: Path, replay: Replay) -> None:
        self.tmp, self.replay = tmp, replay
        shape = (replay.epochs, replay.n_train)
        self.filled = open_memmap(tmp / FILLED_FILE, mode="w+", dtype=np.bool_, shape=shape)
        self.val_seen = np.zeros(replay.n_val, dtype=bool)
        self.files: dict[str, np.ndarray] = {FILLED_FILE: self.filled}

    def put(self, epoch: int | None, idx: np.ndarray, rows: Mapping[str, np.ndarray]) -> None:
        """Rows of train samples ``idx`` in ``epoch``, or of validation samples (epoch None)."""
        r = self.replay
        for output, row in rows.items():
            name = _val_file(output) if epoch is None else _train_file(output)
            if name not in self.files:
                lead = (r.n_val,) if epoch is None else (r.epochs, r.n_train)
                shape = (*lead, *row.shape[1:])
                self.files[name] = open_memmap(self.tmp / name, "w+", np.float16, shape)
            self.files[name][(idx,) if epoch is None else (epoch, idx)] = row
        if epoch is None:
            self.val_seen[idx] = True
        else:
            self.filled[epoch, idx] = True

    def finish(self) -> dict[str, Any]:
        """Check that the loaders covered the cache, fsync and describe the files: the meta
        without the build-level fields."""
        r = self.replay
        if not self.filled.any():
            raise ConKDError("teacher cache: the train loader yielded no batches")
        if not self.val_seen.all():
            raise ConKDError(
                f"teacher cache: the validation loader covered {int(self.val_seen.sum())} of "
                f"n_val={r.n_val} samples"
            )
        files = store.record_arrays(self.tmp, self.files)
        return {
            "format_version": FORMAT_VERSION,
            "outputs": r.outputs,
            "epochs": r.epochs,
            "n_train": r.n_train,
            "n_val": r.n_val,
            "filled": int(self.filled.sum()),
            "files": files,
            "size_bytes": sum(info["bytes"] for info in files.values()),
        }


# --------------------------------------------------------------------------------------------
# Build once, share
# --------------------------------------------------------------------------------------------


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

    The folder is ``root / cache_key(fields)``, shared through :func:`conkd.store.ensure`: a
    valid cache is opened without a lock, otherwise one process builds under
    ``<key>.lock`` while the others wait and reuse; an invalid leftover (or one that records
    another key) is set aside and rebuilt. ``build_fn(directory)`` must create ``directory``
    (typically a :meth:`TeacherCache.build` call with the same ``fields``); the cache it
    returns is used as it is, not opened and hashed again. ``verify`` is passed to
    :meth:`TeacherCache.open` (see the module's checksum policy).
    """
    key = cache_key(fields)
    directory = Path(root) / key
    made: list[TeacherCache | None] = []  # what build_fn returned, once it has run

    def open_fn(path: Path) -> TeacherCache | None:
        if made:  # the build's own result: its key is checked below, with a clearer message
            return made[0] or TeacherCache.open(path, verify=verify)
        return _open_key(path, key, verify)

    def build(path: Path) -> None:
        result = build_fn(path)
        made.append(
            result if isinstance(result, TeacherCache) and result.directory == path else None
        )

    cache, built = store.ensure(directory, open_fn, build, "teacher cache")
    if built and cache.key is not None and cache.key != key:
        raise TeacherCacheError(
            f"the teacher cache in {directory} was built with fields of key {cache.key}, "
            f"not {key}: pass ensure's fields to TeacherCache.build"
        )
    return cache, built
