"""Decode once, augment per batch: a faster input pipeline for small images.

The PIL path (:class:`conkd.data.AugmentedDataset`) decodes every JPEG and augments every sample
in Python in every epoch; at 64 px on a few CPU cores that, not the network, bounds the step
rate. Here each split is decoded ONCE, squashed to ``size x size``, into a uint8 ``.npy`` array
on disk (``N x 3 x size x size``, so a batch of rows is an NCHW tensor as is), and every epoch

* gathers the rows of a batch from the memory-mapped array in a background thread,
* moves them to the training device, and
* augments the whole batch there with tensor ops (one ``roi_align`` call crops and resizes all
  samples), with per-sample parameters drawn from a generator seeded by
  :func:`conkd.data.sample_seed` ``(seed, epoch, index)``.

The view of sample ``i`` in epoch ``e`` therefore stays a pure function of ``(seed, e, i)``,
whatever the batch composition, the device or the global RNG state, as on the PIL path; the
random draws even follow torchvision's order (crop, flip, RandAugment, ColorJitter), so with the
same input size the crop boxes and flips are the ones :func:`conkd.data.build_transforms` draws.

Arrays are keyed by a sha256 of (the split's item digest, size, resize method, format version):
a changed file list or size gets a new array, never a stale one. They are written atomically
(temp file, fsync, ``os.replace``, then ``meta.json`` last), checked on open (a missing,
partial, truncated or mismatched file is rebuilt, never used) and built under a file lock, so a
second process building the same array waits and then reuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from numpy.lib.format import open_memmap
from torch import Tensor
from torch.nn import functional as nnf
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf
from tqdm.auto import tqdm

from conkd.data import IMAGENET_MEAN, IMAGENET_STD, EpochSampler, Split, sample_seed
from conkd.errors import ConKDError

#: Bumped whenever the bytes written for the same (items, size) change; part of the key.
FORMAT_VERSION = 1
#: How images are squashed to ``size x size``: torchvision's antialiased bilinear resize of the
#: uint8 tensor, the same kernel the PIL path's ``v2.Resize`` applies after ``v2.ToImage``.
RESIZE_METHOD = "torchvision-bilinear-antialias"
ARRAY_FILE = "images.npy"
META_FILE = "meta.json"
#: How much larger than the output the decoded images are for RandomResizedCrop (see
#: :func:`default_decode_size`).
RESIZED_CROP_MARGIN = 1.15


def default_decode_size(image_size: int, crop: str) -> int:
    """Decoded side length when ``decode.size`` is not set.

    ``resized`` crops (RandomResizedCrop) zoom into 35-100 % of the image's area, so keeping 15 %
    more pixels per side than the output (ImageNet's 256 -> 224 convention) keeps detail in the
    zoomed-in views for 1.3x the disk of an ``image_size`` array. ``pad`` and ``none`` crops (and
    evaluation) first resize the whole image to ``image_size`` on the PIL path anyway, so decoding
    at ``image_size`` gives exactly the same pixels and needs no second resize.
    """
    if crop == "resized":
        return int(round(image_size * RESIZED_CROP_MARGIN))
    return image_size


def decode_key(item_digest: str, size: int) -> str:
    """sha256 of everything that determines an array's bytes (hex)."""
    fields = {
        "items": item_digest,
        "size": int(size),
        "resize": RESIZE_METHOD,
        "version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Decoding to disk
# --------------------------------------------------------------------------------------------


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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _file_sha256(path: Path, offset: int) -> str:
    """sha256 of ``path``'s bytes from ``offset`` (the array data after the .npy header)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


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
        same key and shape and an ``images.npy`` of the recorded byte size (and, with
        ``verify_hash``, the recorded sha256 of its data: slower, it reads the whole file);
        anything else is rebuilt.
        """
        if size < 1:
            raise ConKDError(f"dataset.decode.size must be >= 1, got {size}")
        key = decode_key(item_digest, size)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "split"
        root = Path(directory).expanduser()
        folder = root / f"{slug}-{size}px-{key[:16]}"
        shape = (len(split), 3, size, size)
        reason = _invalid_reason(folder, key, shape, verify_hash)
        if reason is None:
            return cls(folder, _load(folder), _read_meta(folder))
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for another process decoding {folder} ...", flush=True)
            lock.acquire()
        try:
            # another process may have finished it while we waited for the lock
            reason = _invalid_reason(folder, key, shape, verify_hash)
            if reason is None:
                return cls(folder, _load(folder), _read_meta(folder))
            if reason != "not built yet":
                print(f"decoded array {folder} is unusable ({reason}); rebuilding", flush=True)
            start = time.perf_counter()
            _build(split, size, folder, key, item_digest, slug, workers, progress)
            seconds = time.perf_counter() - start
        finally:
            lock.release()
        return cls(folder, _load(folder), _read_meta(folder), built=True, seconds=seconds)


def _read_meta(folder: Path) -> dict[str, Any]:
    with open(folder / META_FILE) as f:
        return json.load(f)


def _load(folder: Path) -> np.ndarray:
    return np.load(folder / ARRAY_FILE, mmap_mode="r")


def _invalid_reason(
    folder: Path, key: str, shape: tuple[int, ...], verify_hash: bool
) -> str | None:
    """Why the array in ``folder`` must not be used, or None when it is complete and current."""
    meta_path, array_path = folder / META_FILE, folder / ARRAY_FILE
    if not meta_path.exists() and not array_path.exists():
        return "not built yet"
    try:
        meta = _read_meta(folder)
    except (OSError, ValueError) as err:
        return f"no readable {META_FILE}: {err.__class__.__name__}"
    if meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
        return "its key does not match"
    if tuple(meta.get("shape", ())) != shape or meta.get("dtype") != "uint8":
        return f"shape {meta.get('shape')} / {meta.get('dtype')}, expected {list(shape)} / uint8"
    try:
        file_bytes = array_path.stat().st_size
    except OSError:
        return f"{ARRAY_FILE} is missing"
    if file_bytes != meta.get("file_bytes"):
        return f"{ARRAY_FILE} has {file_bytes} bytes, expected {meta.get('file_bytes')}"
    try:
        array = _load(folder)
    except (OSError, ValueError) as err:
        return f"{ARRAY_FILE} does not open: {err}"
    if array.shape != shape or array.dtype != np.uint8:
        return f"{ARRAY_FILE} holds {array.shape} {array.dtype}"
    if verify_hash and _file_sha256(array_path, array.offset) != meta.get("data_sha256"):
        return f"{ARRAY_FILE} does not match its recorded sha256"
    return None


def _build(
    split: Split,
    size: int,
    folder: Path,
    key: str,
    item_digest: str,
    name: str,
    workers: int,
    progress: bool,
) -> None:
    """Decode ``split`` into ``folder`` (caller holds the lock): temp file, fsync, replace, and
    ``meta.json`` last, so a crash at any point leaves something :func:`_invalid_reason`
    rejects."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)  # the old meta must not vouch for new bytes
    for stale in folder.glob(f"{ARRAY_FILE}.tmp-*"):  # a crashed build's leftovers
        stale.unlink(missing_ok=True)
    n = len(split)
    tmp = folder / f"{ARRAY_FILE}.tmp-{os.getpid()}"
    out = open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    data_offset = out.offset
    loader = DataLoader(
        _DecodeSplit(split, size),
        batch_size=32,
        shuffle=False,
        num_workers=max(0, workers),
        generator=torch.Generator(),  # its worker seeds must not consume the global RNG
    )
    h = hashlib.sha256()  # rows arrive in order: the hash of the data region, as written
    start = 0
    with tqdm(total=n, desc=f"decode {name} {size}px", unit="img", disable=not progress) as bar:
        for batch in loader:
            rows = batch.numpy()
            out[start : start + len(rows)] = rows
            h.update(np.ascontiguousarray(rows).data)
            start += len(rows)
            bar.update(len(rows))
    if start != n:
        raise ConKDError(f"decoding {name} produced {start} images, expected {n}")
    out.flush()
    del out
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    file_bytes = tmp.stat().st_size
    os.replace(tmp, folder / ARRAY_FILE)
    fsync_dir(folder)
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "item_digest": item_digest,
        "size": size,
        "resize": RESIZE_METHOD,
        "name": name,
        "shape": [n, 3, size, size],
        "dtype": "uint8",
        "file_bytes": file_bytes,
        "data_offset": data_offset,
        "data_sha256": h.hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json_atomic(folder / META_FILE, meta)


# --------------------------------------------------------------------------------------------
# Batched augmentation
# --------------------------------------------------------------------------------------------


@dataclass
class ViewParams:
    """Per-sample random parameters of one batch (CPU tensors, row k = sample k).

    ``boxes``: crop windows ``(left, top, right, bottom)`` in input pixels (``resized``);
    ``offsets``: ``(top, left)`` of the crop in the padded image (``pad``); ``flip``: horizontal
    flips; ``rng_states``: each sample's generator state after those draws, where the
    photometric ops (RandAugment, ColorJitter) continue the sample's random stream.
    """

    boxes: Tensor
    offsets: Tensor
    flip: Tensor
    rng_states: list[Tensor] = field(default_factory=list)


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` by torchvision's ``RandomResizedCrop.make_params``
    (10 attempts, then a centre crop), drawing from ``generator`` in the same order, so a
    generator seeded like the global RNG gives torchvision's box."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class BatchAugment:
    """The train or eval transform of :func:`conkd.data.build_transforms`, on whole batches.

    ``aug(x, epoch, index)`` maps a uint8 batch ``[B, 3, S, S]`` (on any device) to the float
    normalized ``[B, 3, out, out]`` views of samples ``index`` in ``epoch`` (an int or one per
    sample). Geometry for the whole batch is one call (``roi_align`` for ``resized``, an
    advanced-indexing gather for ``pad``, one batched resize otherwise); only RandAugment and
    ColorJitter, when enabled, run per sample (under the sample's own RNG stream).

    Train options (``crop``, ``scale_min``, ``padding``, ``flip``, ``randaugment_ops``,
    ``randaugment_magnitude``, ``color_jitter``, ``mean``, ``std``) are those of
    ``dataset.augment``; with ``train=False`` it is the eval transform (resize + normalize).
    """

    def __init__(
        self,
        image_size: int,
        train: bool,
        seed: int = 0,
        crop: str = "resized",
        scale_min: float = 0.35,
        padding: int = 4,
        flip: bool = True,
        randaugment_ops: int = 0,
        randaugment_magnitude: int = 9,
        color_jitter: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if crop not in ("resized", "pad", "none"):
            raise ConKDError(f"dataset.augment.crop must be resized, pad or none, got {crop!r}")
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.crop = crop if train else "none"
        self.scale = (float(scale_min), 1.0)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.padding = int(padding)
        self.flip = bool(flip) and train
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        photometric: list[Any] = []
        if train and randaugment_ops:
            photometric.append(v2.RandAugment(randaugment_ops, randaugment_magnitude))
        if train and color_jitter:
            photometric.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
        self.photometric = v2.Compose(photometric) if photometric else None

    @property
    def random(self) -> bool:
        """Whether views depend on (epoch, index) at all (False for the eval transform)."""
        return self.train and (self.crop != "none" or self.flip or self.photometric is not None)

    def params(self, epoch: int | Sequence[int] | Tensor, index: Tensor, size: int) -> ViewParams:
        """Random parameters of samples ``index`` in ``epoch`` for ``size x size`` inputs, each
        from ``torch.Generator().manual_seed(sample_seed(seed, epoch, index))`` alone."""
        index = torch.as_tensor(index).reshape(-1)
        b = index.numel()
        epochs = torch.as_tensor(epoch).reshape(-1).expand(b) if b else torch.zeros(0)
        boxes = torch.tensor([[0.0, 0.0, size, size]]).repeat(b, 1)
        offsets = torch.zeros(b, 2, dtype=torch.long)
        flips = torch.zeros(b, dtype=torch.bool)
        states: list[Tensor] = []
        if not self.random:
            return ViewParams(boxes, offsets, flips)
        out = self.image_size
        padded = out + 2 * self.padding  # pad crops come after the resize to out
        for k, (e, i) in enumerate(zip(epochs.tolist(), index.tolist())):
            g = torch.Generator().manual_seed(sample_seed(self.seed, int(e), int(i)))
            if self.crop == "resized":
                top, left, h, w = random_resized_crop_params(size, size, self.scale, self.ratio, g)
                boxes[k] = torch.tensor([left, top, left + w, top + h], dtype=torch.float32)
            elif self.crop == "pad" and self.padding > 0:
                # torchvision's RandomCrop: top then left, each only if the padded side is larger
                offsets[k, 0] = int(torch.randint(0, padded - out + 1, size=(), generator=g))
                offsets[k, 1] = int(torch.randint(0, padded - out + 1, size=(), generator=g))
            if self.flip:  # RandomHorizontalFlip(p=0.5) skips when rand >= p
                flips[k] = bool(torch.rand(1, generator=g).item() < 0.5)
            if self.photometric is not None:
                states.append(g.get_state())
        return ViewParams(boxes, offsets, flips, states)

    def __call__(
        self,
        x: Tensor,
        epoch: int | Sequence[int] | Tensor,
        index: Tensor,
        params: ViewParams | None = None,
    ) -> Tensor:
        """Augmented, normalized float views of the uint8 batch ``x`` (on ``x``'s device).

        ``params`` (from :meth:`params`) may be drawn ahead, e.g. by a loader's prefetch thread.
        """
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 [B, 3, S, S] batch, got {x.dtype} {tuple(x.shape)}")
        size = int(x.shape[-1])
        if params is None:
            params = self.params(epoch, index, size)
        out = self.image_size
        if self.crop == "resized":
            b = x.shape[0]
            rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], params.boxes], dim=1)
            y = roi_align(x.float(), rois.to(x.device), (out, out), 1.0, -1, aligned=True)
        else:
            y = x if size == out else tvf.resize(x, [out, out], antialias=True)
            if self.crop == "pad" and self.padding > 0:
                y = _crop_padded(y, params.offsets.to(x.device), self.padding, out)
        if self.flip and bool(params.flip.any()):
            flip = params.flip.to(x.device)[:, None, None, None]
            y = torch.where(flip, y.flip(-1), y)
        if self.photometric is not None:
            y = self._photometric(y, params.rng_states)
        if y.dtype == torch.uint8:
            y = tvf.to_dtype(y, torch.float32, scale=True)
        else:  # roi_align's float output, still in [0, 255]: the same scale as to_dtype's
            y = y.mul_(1.0 / 255)
        return tvf.normalize(y, self.mean, self.std, inplace=True)

    def _photometric(self, y: Tensor, states: Sequence[Tensor]) -> Tensor:
        """RandAugment / ColorJitter per sample on uint8, each continuing its sample's stream
        (the global CPU RNG is forked, so the caller's RNG state is untouched)."""
        if y.dtype != torch.uint8:
            y = y.round_().clamp_(0, 255).to(torch.uint8)
        views = []
        for k in range(y.shape[0]):
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(states[k])
                views.append(self.photometric(y[k]))
        return torch.stack(views)


def _crop_padded(x: Tensor, offsets: Tensor, padding: int, out: int) -> Tensor:
    """``out x out`` crops at ``offsets`` (top, left) of the zero-padded batch, in one gather."""
    padded = nnf.pad(x, (padding, padding, padding, padding))
    steps = torch.arange(out, device=x.device)
    rows = (offsets[:, 0:1] + steps)[:, :, None]  # [B, out, 1]
    cols = (offsets[:, 1:2] + steps)[:, None, :]  # [B, 1, out]
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # [B, out, out, C]


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


class DecodedLoader:
    """One epoch of ``(x, y, i)`` batches from a decoded array, in :class:`EpochSampler` order,
    from batch ``start`` on.

    Dataset position ``i`` is split item ``rows[i]`` with label ``targets[i]`` (as
    ``AugmentedDataset`` maps ``i`` to ``indices[i]``). A background thread gathers the next
    batch's rows from the memory map (and draws its augmentation parameters) while the caller
    computes; the batch is then moved to ``device`` and augmented there. ``x`` lives on
    ``device``; ``y`` and ``i`` are CPU int64 tensors, as a DataLoader gives them.
    """

    def __init__(
        self,
        array: np.ndarray,
        rows: Sequence[int],
        targets: Sequence[int],
        transform: BatchAugment,
        epoch: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.as_tensor(list(targets), dtype=torch.int64)
        self.transform = transform
        self.epoch = epoch
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.start = start  # batches of the epoch already trained on (a mid-epoch resume)
        # Training: batch_size is the global batch, each rank takes its slice of every batch.
        global_batch = batch_size if drop_last else None
        self.sampler = EpochSampler(
            len(self.rows), seed, shuffle, start * batch_size, global_batch, rank, world
        )
        self.sampler.set_epoch(epoch)
        self.local_batch = batch_size // world if drop_last else batch_size
        self.device = torch.device(device)
        self.prefetch = max(1, prefetch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.local_batch if self.drop_last else math.ceil(n / self.local_batch)

    def batches(self) -> list[list[int]]:
        """The dataset positions of each batch still to come (this rank's share), in order."""
        order = [i for _, i in self.sampler]
        b = self.local_batch
        return [order[s : s + b] for s in range(0, len(self) * b, b)]

    def _gather(self, positions: list[int]) -> tuple[Tensor, Tensor, Tensor, ViewParams | None]:
        index = torch.tensor(positions, dtype=torch.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.array[self.rows[positions]]))
        if self.device.type == "cuda":
            x = x.pin_memory()
        params = None
        if self.transform.random:
            params = self.transform.params(self.epoch, index, int(x.shape[-1]))
        return x, self.targets[index], index, params

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        batches = self.batches()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for positions in batches:
                    item: Any = self._gather(positions)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as err:  # handed to the consumer, raised there
                ready.put(err)

        worker = threading.Thread(target=produce, name="decoded-prefetch", daemon=True)
        worker.start()
        non_blocking = self.device.type == "cuda"
        try:
            for _ in batches:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                x, y, index, params = item
                x = x.to(self.device, non_blocking=non_blocking)
                yield self.transform(x, self.epoch, index, params), y, index
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()
