"""Decode once: each split's images decoded a single time into a uint8 array on disk.

The PIL path decodes every JPEG in every epoch; at 64 px on a few CPU cores that, not the
network, bounds the step rate. Here a split is decoded ONCE, squashed to ``size x size``, into a
uint8 ``.npy`` array (``N x 3 x size x size``, so a batch of rows is an NCHW tensor as is) that
:class:`conkd.loaders.DecodedLoaders` memory-maps and renders on the training device.

Arrays live in the content store (:mod:`conkd.store`): keyed by a sha256 of (the split's item
digest, size, resize method, format version), so a changed file list or size gets a new array,
never a stale one; built in a hidden folder renamed into place with ``meta.json`` last; checked
on open (a missing, partial, truncated or mismatched file is rebuilt, never used; with
``verify_hash`` also its sha256); built under a file lock, so a second process building the same
array waits and then reuses it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as tvf
from tqdm.auto import tqdm

from conkd import store
from conkd.errors import ConKDError
from conkd.sources import Split
from conkd.store import META_FILE, Unusable

#: Bumped whenever the bytes or the layout written for the same (items, size) change.
FORMAT_VERSION = 2
#: How images are squashed to ``size x size``: torchvision's antialiased bilinear resize of the
#: uint8 tensor, the same kernel the PIL path's views apply (:func:`conkd.views.render`).
RESIZE_METHOD = "torchvision-bilinear-antialias"
ARRAY_FILE = "images.npy"
#: How much larger than the output the decoded images are for RandomResizedCrop (see
#: :func:`default_decode_size`).
RESIZED_CROP_MARGIN = 1.15


def default_decode_size(image_size: int, crop: str) -> int:
    """Decoded side length when ``decode.size`` is not set.

    ``resized`` crops zoom into 35-100 % of the image's area, so keeping 15 % more pixels per
    side than the output (ImageNet's 256 -> 224 convention) keeps detail in the zoomed-in views
    for 1.3x the disk of an ``image_size`` array. ``pad`` and ``none`` crops (and evaluation)
    first resize the whole image to ``image_size`` on the PIL path anyway, so decoding at
    ``image_size`` gives exactly the same pixels and needs no second resize.
    """
    if crop == "resized":
        return int(round(image_size * RESIZED_CROP_MARGIN))
    return image_size


def decode_key(item_digest: str, size: int) -> str:
    """sha256 of everything that determines an array's bytes (hex)."""
    fields = {"items": item_digest, "size": int(size), "resize": RESIZE_METHOD,
              "version": FORMAT_VERSION}  # fmt: skip
    return store.key_of(fields)


class _DecodeSplit(Dataset):
    """``split[j]`` loaded, as a uint8 ``3 x size x size`` tensor (for a decoding DataLoader)."""

    def __init__(self, split: Split, size: int) -> None:
        self.split = split
        self.size = size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, j: int) -> Tensor:
        image = tvf.pil_to_tensor(self.split.load(self.split.items[j]))
        if tuple(image.shape[-2:]) != (self.size, self.size):
            image = tvf.resize(image, [self.size, self.size], antialias=True)
        return image


@dataclass
class DecodedArray:
    """A split decoded once: ``array[j]`` is item ``j`` as uint8 ``3 x size x size``.

    ``built`` says whether this process built the array (False: an earlier build was reused).
    """

    path: Path
    array: np.ndarray
    meta: dict[str, Any]
    built: bool = False
    seconds: float = 0.0

    @property
    def size(self) -> int:
        return int(self.array.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @classmethod
    def open(
        cls,
        split: Split,
        size: int,
        directory: str | os.PathLike[str],
        item_digest: str,
        name: str = "split",
        workers: int = 2,
        verify_hash: bool = False,
        progress: bool = True,
    ) -> DecodedArray:
        """The array of ``split`` at ``size``, built unless a valid one exists.

        ``item_digest`` is ``Source.item_digest(split)``; with ``name`` it names the folder
        ``<directory>/<name>-<size>px-<key[:16]>/``. A valid array has a ``meta.json`` with the
        same key and shape and an ``images.npy`` of the recorded byte size, shape and dtype
        (and, with ``verify_hash``, the recorded sha256: slower, it reads the whole file);
        anything else is rebuilt.
        """
        if size < 1:
            raise ConKDError(f"dataset.decode.size must be >= 1, got {size}")
        key = decode_key(item_digest, size)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "split"
        folder = Path(directory).expanduser() / f"{slug}-{size}px-{key[:16]}"
        shape = (len(split), 3, size, size)
        start = time.perf_counter()
        found, built = store.ensure(
            folder,
            lambda path: _open(path, key, shape, verify_hash),
            lambda path: _build(path, split, size, key, slug, workers, progress),
            "decoded array",
        )
        if built:
            found.built, found.seconds = True, time.perf_counter() - start
        return found


def _open(folder: Path, key: str, shape: tuple[int, ...], verify: bool) -> DecodedArray | None:
    """The array in ``folder``; None when none was built, :class:`Unusable` when it must not be
    used (see :func:`conkd.store.open_arrays`)."""
    if not folder.exists():
        return None
    meta = store.read_meta(folder)
    if meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
        raise Unusable("its key does not match")
    if tuple(meta.get("shape", ())) != shape:
        raise Unusable(f"shape {meta.get('shape')}, expected {list(shape)}")
    try:
        arrays = store.open_arrays(folder, meta["files"], verify)
        return DecodedArray(folder, arrays[ARRAY_FILE], meta)
    except (KeyError, TypeError) as err:
        raise Unusable(f"{META_FILE} is malformed ({err.__class__.__name__}: {err})") from err


def _build(
    folder: Path, split: Split, size: int, key: str, name: str, workers: int, progress: bool
) -> DecodedArray:
    """Decode ``split`` into ``folder`` (in one atomic step) and open it without re-hashing
    what was just hashed while writing."""
    store.build_folder(folder, lambda tmp: _write(tmp, split, size, key, name, workers, progress))
    found = _open(folder, key, (len(split), 3, size, size), verify=False)
    assert found is not None  # renamed into place just above
    return found


def _write(
    tmp: Path, split: Split, size: int, key: str, name: str, workers: int, progress: bool
) -> dict[str, Any]:
    """Decode ``split`` into ``tmp/images.npy``; returns the folder's meta."""
    n = len(split)
    out = open_memmap(tmp / ARRAY_FILE, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    loader = DataLoader(
        _DecodeSplit(split, size),
        batch_size=32,
        shuffle=False,
        num_workers=max(0, workers),
        generator=torch.Generator(),  # its worker seeds must not consume the global RNG
    )
    start = 0
    with tqdm(total=n, desc=f"decode {name} {size}px", unit="img", disable=not progress) as bar:
        for batch in loader:
            out[start : start + len(batch)] = batch.numpy()
            start += len(batch)
            bar.update(len(batch))
    if start != n:
        raise ConKDError(f"decoding {name} produced {start} images, expected {n}")
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "size": size,
        "resize": RESIZE_METHOD,
        "name": name,
        "shape": [n, 3, size, size],
        "files": store.record_arrays(tmp, {ARRAY_FILE: out}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
