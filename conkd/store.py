"""The content store: how ConKD writes anything that must never be half-written or stale.

Three artefacts are built once and reused: decoded image arrays (:mod:`conkd.decoded`), the
teacher-output cache (:mod:`conkd.teacher_cache`) and checkpoints (:mod:`conkd.checkpoint`).
They share one set of rules, defined here once:

* **keys**: :func:`key_of` is the sha256 of the canonical JSON of everything an artefact
  depends on (plain values only, see :func:`jsonable`), so a changed input gets a new folder,
  never a stale one;
* **atomic files**: :func:`write_atomic` writes a temporary file, fsyncs it, renames it over
  the target and fsyncs the folder, so a crash leaves the old file or the new one;
* **atomic folders**: :func:`build_folder` writes into a hidden sibling folder, writes
  ``meta.json`` last (its presence marks a complete build) and renames the folder into place in
  one step, so a killed build leaves only a hidden folder that never looks complete;
* **build once**: :func:`ensure` opens a valid artefact without a lock (readers never block each
  other), and otherwise builds it under a file lock, checking again once it holds the lock, so
  of processes that need the same artefact at once one builds and the others wait and reuse it.
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
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from filelock import FileLock, Timeout

from conkd.errors import ConKDError

log = logging.getLogger("conkd")

META_FILE = "meta.json"
_HASH_BLOCK = 1 << 23
_BUILDING, _STALE = "building", "stale"
T = TypeVar("T")


class Unusable(ConKDError):
    """An artefact exists but must not be used: partial, truncated, corrupt or of another key."""


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, or TypeError.

    Unknown objects are refused rather than ``str()``-ed: a repr with a memory address would make
    a key differ between processes (no reuse), and a lossy repr could make two different
    configurations share one artefact (wrong contents, silently).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__nonfinite_float__": repr(value)}
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"key fields need string keys, got {k!r}")
            out[k] = jsonable(v)
        return out
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [jsonable(v) for v in value]
    raise TypeError(
        f"cannot put {type(value).__name__} into a key; pass plain values "
        "(str, numbers, bools, lists, dicts), e.g. OmegaConf.to_container(cfg, resolve=True)"
    )


def canonical_json(fields: Mapping[str, Any]) -> str:
    """The canonical JSON of ``fields``: sorted keys, no whitespace, plain types only."""
    return json.dumps(
        jsonable(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def key_of(fields: Mapping[str, Any], length: int | None = None) -> str:
    """sha256 (hex) of the canonical JSON of ``fields``, cut to ``length`` digits if given."""
    digest = hashlib.sha256(canonical_json(fields).encode("ascii")).hexdigest()
    return digest[:length] if length else digest


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes; about 1.2 GB/s on one core of the project machines."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Atomic files and folders
# --------------------------------------------------------------------------------------------


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to the disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], Any], keep_as: Path | None = None) -> None:
    """Write ``path`` through ``write(tmp)``: ``<path>.tmp``, fsync, rename over ``path``, fsync
    the folder. With ``keep_as`` the old ``path`` is first renamed there (the previous
    checkpoint). A failed write removes the temporary file and re-raises; ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        if keep_as is not None and path.exists():
            os.replace(path, keep_as)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as indented JSON in ``path``, fsync'd (inside a folder still being built)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_meta(directory: Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of a built folder, or :class:`Unusable` saying why not."""
    try:
        return json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise Unusable(
            f"{directory} has no readable {META_FILE} ({err.__class__.__name__}): "
            "an unfinished or damaged build"
        ) from err


def hidden_sibling(path: Path, what: str) -> Path:
    """A unique hidden name beside ``path`` (``.<name>.<what>-<pid>-<uuid>``)."""
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{uuid.uuid4().hex}")


def build_folder(directory: Path, write: Callable[[Path], dict[str, Any]]) -> None:
    """Build ``directory`` (which must not exist) in one atomic step.

    ``write(tmp)`` fills a hidden sibling folder and returns its meta; every file it wrote must
    be fsync'd (:func:`fsync_file`). The meta is written last as ``meta.json``, the folder is
    fsync'd and renamed to ``directory``. On any failure the hidden folder is removed.
    """
    if directory.exists():
        raise FileExistsError(f"{directory} exists; open it, or remove it to rebuild")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(directory, _BUILDING)
    tmp.mkdir()
    try:
        meta = write(tmp)
        write_json(tmp / META_FILE, meta)
        fsync_dir(tmp)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_aside(path: Path) -> None:
    """Remove ``path`` by first renaming it to a hidden name (atomic), so no reader ever sees
    a half-deleted artefact under the real name."""
    aside = hidden_sibling(path, _STALE)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(directory: Path) -> None:
    """Hidden folders of killed builds / removals of ``directory`` (call under its lock)."""
    for what in (_BUILDING, _STALE):
        for path in directory.parent.glob(f".{directory.name}.{what}-*"):
            shutil.rmtree(path, ignore_errors=True)


def record_arrays(directory: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Flush, fsync and describe the ``.npy`` memmaps written into ``directory`` (by file name):
    shape, dtype, bytes and sha256 of each, the ``files`` entry of a folder's meta."""
    files: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        array.flush()  # msync: the bytes are in the file before it is fsync'd and hashed
        files[name] = {"shape": list(array.shape), "dtype": array.dtype.str}
    for name, info in files.items():
        path = directory / name
        fsync_file(path)
        info["bytes"] = path.stat().st_size
        info["sha256"] = sha256_file(path)
    return files


def open_arrays(
    directory: Path, files: Mapping[str, Mapping[str, Any]], verify: bool
) -> dict[str, np.ndarray]:
    """The arrays :func:`record_arrays` described, memory-mapped read-only, or
    :class:`Unusable`: a file missing, of another byte size (truncated or overwritten), of
    another shape or dtype, or (``verify``: reads every byte) of another sha256 (corrupt)."""
    for name, info in files.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise Unusable(f"{path} is missing") from None
        if size != int(info["bytes"]):
            raise Unusable(
                f"{path} has {size} bytes, {META_FILE} records {info['bytes']} "
                "(truncated or overwritten)"
            )
    if verify:
        for name, info in files.items():
            if sha256_file(directory / name) != info["sha256"]:
                raise Unusable(f"{directory / name} does not match its recorded sha256 (corrupt)")
    arrays: dict[str, np.ndarray] = {}
    for name, info in files.items():
        try:
            array = np.load(directory / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise Unusable(f"{directory / name} does not open: {err}") from err
        shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
        if array.shape != shape or array.dtype != dtype:
            raise Unusable(
                f"{directory / name} holds {array.shape} {array.dtype}, {META_FILE} records "
                f"{shape} {dtype}"
            )
        arrays[name] = array
    return arrays


# --------------------------------------------------------------------------------------------
# Build once, share
# --------------------------------------------------------------------------------------------


@contextmanager
def locked(lock_path: Path, waiting: str) -> Iterator[None]:
    """Hold the file lock ``lock_path``, saying ``waiting`` once if another process holds it."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s", waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def ensure(
    directory: Path,
    open_fn: Callable[[Path], T | None],
    build_fn: Callable[[Path], T | None],
    what: str,
) -> tuple[T, bool]:
    """The artefact in ``directory``, built if needed; returns ``(artefact, built_now)``.

    ``open_fn(directory)`` returns the artefact, None when nothing was built there, or raises
    :class:`Unusable`. ``build_fn(directory)`` must create ``directory`` (through
    :func:`build_folder`) and may return the artefact it built (else it is opened, which
    re-reads what was just written). A valid artefact is opened without a lock; otherwise this takes
    ``<directory>.lock``, opens again (another process may have built it meanwhile), sets an
    unusable one aside, removes hidden leftovers of killed builds and builds.
    """
    try:
        found = open_fn(directory)
        if found is not None:
            return found, False
    except Unusable as err:
        log.warning("%s %s is unusable (%s); rebuilding it", what, directory, err)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = directory.with_name(directory.name + ".lock")
    with locked(lock, f"{what} {directory}: waiting for another process to build it"):
        try:
            found = open_fn(directory)
            if found is not None:
                return found, False  # built by another process while we waited
        except Unusable:
            set_aside(directory)
        remove_leftovers(directory)
        built = build_fn(directory)
        if built is None:
            built = open_fn(directory)
        if built is None:
            raise ConKDError(f"the {what} build did not create {directory}")
        return built, True
