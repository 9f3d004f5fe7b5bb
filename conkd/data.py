"""Datasets, splits, augmentation and loaders.

A *source* knows where images come from (a class-folder tree, torchvision's Imagenette, the
digits that ship with scikit-learn) and exposes an untransformed ``train`` and ``test`` split.
:class:`DataModule` turns a source into seeded train / validation / test loaders.

Augmentation is a pure function of ``(seed, epoch, index)``: the sampler yields ``(epoch, index)``
pairs and each sample seeds its own RNG from them. The same image therefore gets the same crop in
any worker, on any rank and after a resume, which is what caching teacher outputs per augmented
view (FKD-style) needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import v2
from tqdm.auto import tqdm

from conkd.errors import ConKDError

log = logging.getLogger("conkd")

if TYPE_CHECKING:  # conkd.decoded imports this module; the runtime imports are local
    from conkd.decoded import DecodedArray, DecodedLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (Imagenette has grayscale images), naming the file on failure."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise ConKDError(f"cannot read image {path}: {err}. Remove or replace the file.") from err


def check_images(paths: Sequence[str]) -> None:
    """Fail before training on files that are not images (reads headers only, ~50 us each)."""
    for path in paths:
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as err:
            raise ConKDError(
                f"cannot read image {path}: {err}. Remove or replace the file."
            ) from err


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be decoded in full (truncated, corrupt, not an image), or None."""
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as err:
        return f"{err}"
    return None


def drop_unreadable(
    samples: Sequence[tuple[str, int]], where: str, workers: int = 2
) -> list[tuple[str, int]]:
    """``samples`` without the images that do not decode in full (the opt-in
    ``dataset.source.skip_bad_images``); says how many it dropped, naming the first few."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(
            tqdm(pool.map(_unreadable, paths), total=len(paths), desc=f"check {where}", leave=False)
        )
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad:
        shown = "; ".join(f"{p} ({r})" for p, r in bad[:3])
        log.warning(
            "skipped %d of %d images in %s that cannot be read (skip_bad_images=true): %s%s",
            len(bad),
            len(paths),
            where,
            shown,
            " ..." if len(bad) > 3 else "",
        )
    return [s for s, r in zip(samples, reasons) if r is None]


def _checked(
    samples: list[tuple[str, int]], where: str, verify: bool, skip_bad: bool
) -> list[tuple[str, int]]:
    """Samples after the configured check: headers (``verify``) or a full decode that drops
    unreadable files (``skip_bad``)."""
    if skip_bad:
        return drop_unreadable(samples, where)
    if verify:
        check_images([p for p, _ in samples])
    return samples


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """An untransformed split: ``items[i]`` is loaded by ``load`` into a PIL image."""

    items: list[Any]
    targets: list[int]
    load: Any

    def __len__(self) -> int:
        return len(self.targets)


class Source:
    """Base class: ``train`` and ``test`` splits plus class names."""

    name: str = "source"
    classes: list[str]
    train: Split
    test: Split
    #: True when the test split is an official held-out set rather than a split we drew.
    official_test: bool = True
    #: Where the images come from (a folder, a URL), for the MLflow dataset input.
    location: str = ""

    @property
    def identity(self) -> str:
        """A short, stable name for *this* dataset (not its loader type): registered teachers
        are named after it, so an Imagewoof run never picks up an Imagenette teacher."""
        return self.name

    def item_digest(self, split: Split) -> str:
        """Digest of a split's items and labels: file paths (relative) and sizes, or pixels."""
        h = hashlib.sha256()
        base = Path(self.location) if self.location else None
        for item, target in zip(split.items, split.targets):
            if isinstance(item, np.ndarray):
                h.update(item.tobytes())
            else:
                path = Path(item)
                rel = path.relative_to(base) if base and path.is_relative_to(base) else path
                size = path.stat().st_size if path.exists() else -1
                h.update(f"{rel.as_posix()}:{size}".encode())
            h.update(f":{target}\n".encode())
        return h.hexdigest()


def _image_folder_split(path: Path, verify: bool, skip_bad: bool) -> tuple[list[str], Split]:
    if not path.is_dir():
        raise ConKDError(f"dataset folder {path} does not exist")
    folder = datasets.ImageFolder(str(path), loader=load_rgb, is_valid_file=None)
    samples = _checked(folder.samples, str(path), verify, skip_bad)
    left = {t for _, t in samples}
    empty = [c for i, c in enumerate(folder.classes) if i not in left]
    if empty:
        raise ConKDError(f"class folder(s) {', '.join(empty)} in {path} have no readable images")
    return folder.classes, Split([p for p, _ in samples], [t for _, t in samples], load_rgb)


class ImageFolderSource(Source):
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (official val = test set)."""

    name = "imagefolder"

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        test_dir: str = "val",
        verify: bool = True,
        skip_bad_images: bool = False,
    ) -> None:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise ConKDError(
                f"dataset root {base} does not exist; set dataset.root to a folder "
                f"with {train_dir}/<class>/ and {test_dir}/<class>/ image folders"
            )
        try:
            split = (verify, skip_bad_images)
            self.classes, self.train = _image_folder_split(base / train_dir, *split)
            test_classes, self.test = _image_folder_split(base / test_dir, *split)
        except FileNotFoundError as err:  # ImageFolder: no class folders / no images
            raise ConKDError(
                f"dataset root {base} is empty or incomplete ({err}); it needs "
                f"{train_dir}/<class>/*.jpg and {test_dir}/<class>/*.jpg"
            ) from err
        if test_classes != self.classes:
            raise ConKDError(
                f"{base}/{train_dir} and {base}/{test_dir} have different class folders"
            )
        self.location = str(base.resolve())

    @property
    def identity(self) -> str:
        """``<folder name>-<digest of the class names>``, e.g. ``imagenette-1a2b3c4d``."""
        classes = hashlib.sha256("\n".join(self.classes).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(self.location).name).strip("-") or "data"
        return f"{slug}-{classes}"


class ImagenetteSource(Source):
    """torchvision's Imagenette (fastai), official split; downloaded on first use."""

    name = "imagenette"

    def __init__(
        self,
        root: str,
        size: str = "160px",
        download: bool = True,
        verify: bool = False,
        skip_bad_images: bool = False,
    ) -> None:
        if size not in ("160px", "320px", "full"):
            raise ConKDError(f"dataset.source.size must be 160px, 320px or full, got {size!r}")
        root_path = Path(root).expanduser()
        try:
            root_path.mkdir(parents=True, exist_ok=True)
            train = datasets.Imagenette(str(root_path), "train", size, download, loader=load_rgb)
            test = datasets.Imagenette(str(root_path), "val", size, download, loader=load_rgb)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            url = datasets.Imagenette._ARCHIVES[size][0]
            raise ConKDError(
                f"Imagenette ({size}) is not in {root_path} and could not be downloaded "
                f"({err.__class__.__name__}: {err}). Download {url} yourself and extract it "
                f"into {root_path}, or point dataset=imagefolder dataset.root at an "
                "existing train/ + val/ copy"
            ) from err
        self.classes = [names[0] for names in (train._WNID_TO_CLASS[w] for w in train.wnids)]
        samples = [
            _checked(list(d._samples), f"{root_path} {d._split}", verify, skip_bad_images)
            for d in (train, test)
        ]
        self.train = Split([p for p, _ in samples[0]], [t for _, t in samples[0]], load_rgb)
        self.test = Split([p for p, _ in samples[1]], [t for _, t in samples[1]], load_rgb)
        self.location = str(root_path.resolve())


def _digit_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels).convert("RGB")


class DigitsSource(Source):
    """scikit-learn's 8x8 handwritten digits (1,797 images, ships with the package).

    A real dataset that needs no download, for the demo and tests. It has no official split, so
    the test set is a fixed stratified ``test_fraction`` of it (independent of the run seed).
    """

    name = "digits"
    official_test = False

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        idx = np.arange(len(images))
        train_idx, test_idx = train_test_split(
            idx, test_size=test_fraction, random_state=split_seed, stratify=digits.target
        )
        self.classes = [str(c) for c in digits.target_names]
        self.location = "sklearn.datasets.load_digits"
        self.train = Split(
            [images[i] for i in train_idx], digits.target[train_idx].tolist(), _digit_image
        )
        self.test = Split(
            [images[i] for i in test_idx], digits.target[test_idx].tolist(), _digit_image
        )


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def build_transforms(
    image_size: int,
    train: bool,
    crop: str = "resized",
    scale_min: float = 0.35,
    padding: int = 4,
    flip: bool = True,
    randaugment_ops: int = 0,
    randaugment_magnitude: int = 9,
    color_jitter: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Train or eval transform. ``crop``: ``resized`` (RandomResizedCrop), ``pad`` (resize then
    RandomCrop with padding, CIFAR-style) or ``none``."""
    ops: list[Any] = [v2.ToImage()]
    if not train or crop == "none":
        ops.append(v2.Resize((image_size, image_size), antialias=True))
    elif crop == "resized":
        ops.append(v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), antialias=True))
    elif crop == "pad":
        ops += [
            v2.Resize((image_size, image_size), antialias=True),
            v2.RandomCrop(image_size, padding=padding),
        ]
    else:
        raise ConKDError(f"dataset.augment.crop must be resized, pad or none, got {crop!r}")
    if train:
        if flip:
            ops.append(v2.RandomHorizontalFlip())
        if randaugment_ops:
            ops.append(v2.RandAugment(randaugment_ops, randaugment_magnitude))
        if color_jitter:
            ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample ``index`` in ``epoch``: a function of these alone."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class AugmentedDataset(Dataset):
    """Applies ``transform`` to ``split[indices[i]]`` with an RNG seeded by (seed, epoch, i).

    Indexed by ``(epoch, i)`` pairs (see :class:`EpochSampler`); returns ``(image, label, i)`` so
    later stages can attach per-sample data such as cached teacher outputs.
    """

    def __init__(self, split: Split, indices: Sequence[int], transform: Any, seed: int) -> None:
        self.split = split
        self.indices = list(indices)
        self.transform = transform
        self.seed = seed
        self.targets = [split.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, i = key
        j = self.indices[i]
        image = self.split.load(self.split.items[j])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            x = self.transform(image)
        return x, self.split.targets[j], i


_ORDER_STREAM = 2**32 - 1  # an "index" no sample has: the stream of the shuffling order


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``; the order is a permutation seeded by (seed, epoch) alone.

    ``start`` skips the first ``start`` samples of the order: a run resumed mid-epoch continues
    with exactly the samples (and, as augmentation is seeded per sample, the views) it had left.
    With ``world`` > 1 (torchrun) it yields rank ``rank``'s share: with ``batch_size`` (the global
    training batch) the rank's contiguous slice of every full global batch, so the ranks together
    see exactly a one-process run's batches; without it every ``world``-th sample.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool,
        start: int = 0,
        batch_size: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.start = start
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = max(self.size - self.start, 0)
        if self.world == 1:
            return n
        if self.batch_size:
            return n // self.batch_size * (self.batch_size // self.world)
        return len(range(self.rank, n, self.world))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, _ORDER_STREAM))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        order = order[self.start :]
        if self.world > 1 and self.batch_size:
            from conkd.distributed import rank_slice

            b, full = self.batch_size, len(order) // self.batch_size * self.batch_size
            order = [
                i
                for s in range(0, full, b)
                for i in rank_slice(order[s : s + b], self.rank, self.world)
            ]
        elif self.world > 1:
            order = order[self.rank :: self.world]
        return ((self.epoch, i) for i in order)


_DECODE_KEYS = {"enabled", "size", "dir", "workers", "verify", "progress"}


def _decode_options(
    decode: dict[str, Any] | None, image_size: int, crop: str
) -> dict[str, Any] | None:
    """``dataset.decode`` checked and completed (see :class:`DataModule`); None when off."""
    if decode is None:
        return None
    options = dict(decode)
    unknown = sorted(set(options) - _DECODE_KEYS)
    if unknown:
        raise ConKDError(
            f"unknown dataset.decode keys {unknown}; expected some of {sorted(_DECODE_KEYS)}"
        )
    if not options.get("enabled", True):
        return None
    from conkd.decoded import default_decode_size

    size = options.get("size")
    if size is None:
        size = default_decode_size(image_size, crop)
    if int(size) < 8:
        raise ConKDError(f"dataset.decode.size must be >= 8, got {size}")
    directory = options.get("dir")
    if not directory:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = str(Path(cache) / "conkd" / "decoded")
    workers = options.get("workers")
    if workers is not None and int(workers) < 0:
        raise ConKDError(f"dataset.decode.workers must be >= 0, got {workers}")
    return {
        "size": int(size),
        "dir": str(directory),
        "workers": None if workers is None else int(workers),
        "verify": bool(options.get("verify", False)),
        "progress": bool(options.get("progress", True)),
    }


def _split(targets: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split where every class can be represented, else a plain random one."""
    idx = np.arange(len(targets))
    try:
        return train_test_split(idx, test_size=fraction, random_state=seed, stratify=targets)
    except ValueError:  # tiny data: fewer held-out samples than classes
        return train_test_split(idx, test_size=fraction, random_state=seed)


class DataModule:
    """Seeded train / validation / test loaders over a :class:`Source`.

    The validation split (for model selection) is a stratified ``val_fraction`` of the source's
    train split drawn with ``split_seed``; the source's test split is only used for the final
    evaluation of the best checkpoint.

    ``decode`` switches to the decode-once pipeline (:mod:`conkd.decoded`): each split is decoded
    once into a uint8 array on disk and batches are augmented with tensor ops on ``device``
    (settable after construction, default CPU), because per-sample PIL decoding and augmentation
    bound the step rate of small-image runs. Keys (all optional):

    * ``enabled`` (default True when a dict is given): False keeps the PIL loaders;
    * ``size``: decoded side length; None (default) means ``round(1.15 * image_size)`` for
      ``resized`` crops (room for zoomed-in crops) and ``image_size`` for ``pad`` / ``none``
      (the PIL path resizes to ``image_size`` first, so the pixels are the same), see
      :func:`conkd.decoded.default_decode_size`;
    * ``dir``: where arrays live (default ``$XDG_CACHE_HOME/conkd/decoded`` or
      ``~/.cache/conkd/decoded``); they are keyed by the file list and size, so one folder
      serves any number of datasets and runs;
    * ``workers``: decoding processes for the one-time build (default ``num_workers``);
    * ``verify``: also check each array's sha256 when opening it (reads the whole file);
    * ``progress``: show a progress bar while decoding (default True).

    Without ``decode`` (or with ``enabled: false``) the loaders are the PIL DataLoaders.
    """

    def __init__(
        self,
        source: Source,
        name: str | None = None,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        augment: dict[str, Any] | None = None,
        pin_memory: bool = False,
        decode: dict[str, Any] | None = None,
    ) -> None:
        if image_size < 8:
            raise ConKDError(f"dataset.image_size must be >= 8, got {image_size}")
        if batch_size < 2:
            raise ConKDError(f"dataset.batch_size must be >= 2, got {batch_size}")
        if not 0 < val_fraction < 1:
            raise ConKDError(f"dataset.val_fraction must be in (0, 1), got {val_fraction}")
        if len(source.classes) < 2:
            raise ConKDError(
                f"the dataset has {len(source.classes)} class ({', '.join(source.classes)}); "
                "classification needs at least 2 class folders"
            )
        self.source = source
        self.name = name or source.name
        self.root = root  # informational: the source was built from it
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        augment = dict(augment or {})
        self.augment = augment
        self.classes = list(source.classes)
        train_tf = build_transforms(image_size, train=True, **augment)
        eval_tf = build_transforms(image_size, train=False, **augment)

        train_idx, val_idx = _split(source.train.targets, val_fraction, split_seed)
        self.train = AugmentedDataset(source.train, sorted(train_idx), train_tf, seed)
        self.val = AugmentedDataset(source.train, sorted(val_idx), eval_tf, seed)
        self.test = AugmentedDataset(source.test, range(len(source.test)), eval_tf, seed)
        if len(self.train) < batch_size:
            raise ConKDError(
                f"only {len(self.train)} training images for batch_size={batch_size}; "
                "lower dataset.batch_size"
            )
        self._train_sampler = EpochSampler(len(self.train), seed, shuffle=True)
        #: Where decoded batches are augmented (the decode-once pipeline only; PIL batches are
        #: made on the CPU and moved by the training loop).
        self.device = torch.device("cpu")
        #: This process's rank and the number of processes (torchrun); set by conkd.run.
        self.rank, self.world = 0, 1
        self.decode = _decode_options(decode, image_size, augment.get("crop", "resized"))
        self._decoded: dict[str, DecodedArray] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # Its own generator: workers' base seeds are not drawn from the global RNG (views are
            # seeded per sample anyway), so creating a loader mid-run leaves that RNG as it was
            # and a resumed run draws the same dropout masks as an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_loader(self, epoch: int, start: int = 0) -> Iterable:
        """Loader for one training epoch; drops the last incomplete batch (BatchNorm, SupCon).

        ``start`` skips the epoch's first ``start`` batches (a mid-epoch resume); the loader's
        length is then the number of batches left. Under torchrun each rank gets its
        ``batch_size / world`` share of every batch.
        """
        if self.decode is not None:
            return self._decoded_loader(self.train, "train", epoch, train=True, start=start)
        sampler = EpochSampler(
            len(self.train), self.seed, shuffle=True, start=start * self.batch_size,
            batch_size=self.batch_size, rank=self.rank, world=self.world,
        )  # fmt: skip
        sampler.set_epoch(epoch)  # one sampler per loader: a loader made earlier keeps its order
        return self._loader(self.train, sampler, self.batch_size // self.world, drop_last=True)

    def eval_loader(self, split: str) -> Iterable:
        """Loader over the un-augmented ``val`` or ``test`` split (each rank's share of it under
        torchrun; the evaluation sums its counts over ranks)."""
        dataset = {"val": self.val, "test": self.test}[split]
        if self.decode is not None:
            return self._decoded_loader(dataset, "test" if split == "test" else "train", 0, False)
        sampler = EpochSampler(len(dataset), self.seed, False, rank=self.rank, world=self.world)
        return self._loader(dataset, sampler, self.eval_batch_size, drop_last=False)

    def pipeline(self) -> dict[str, Any]:
        """What, besides the data, the seed and ``augment``, shapes the views a run sees: the
        PIL path or the decode-once path at a given size. Views of the two differ (resized crops
        are taken from the decoded image), so caches of per-view outputs must key on this."""
        if self.decode is None:
            return {"kind": "pil", "image_size": self.image_size}
        from conkd.decoded import FORMAT_VERSION, RESIZE_METHOD

        return {
            "kind": "decoded",
            "image_size": self.image_size,
            "decode_size": self.decode["size"],
            "resize": RESIZE_METHOD,
            "format_version": FORMAT_VERSION,
        }

    def prepare(self) -> dict[str, Path]:
        """Decode the source's train and test splits now (or find them decoded) instead of on
        the first loader, printing the time and size; returns each array's folder. Does
        nothing without ``decode``."""
        if self.decode is None:
            return {}
        return {name: self._decoded_array(name).path for name in ("train", "test")}

    def _decoded_array(self, name: str) -> DecodedArray:
        """The decoded array of source split ``name`` (``train`` also serves validation)."""
        if self.decode is None:
            raise ConKDError("the decode-once pipeline is off (dataset.decode.enabled=false)")
        if name not in self._decoded:
            from conkd.decoded import DecodedArray

            split = self.source.train if name == "train" else self.source.test
            workers = self.decode["workers"]
            decoded = DecodedArray.open(
                split,
                self.decode["size"],
                self.decode["dir"],
                self.source.item_digest(split),
                name=f"{self.identity}-{name}",
                workers=self.num_workers if workers is None else workers,
                verify_hash=self.decode["verify"],
                progress=self.decode["progress"],
            )
            shape = "x".join(str(d) for d in decoded.array.shape)
            what = f"built in {decoded.seconds:.1f} s" if decoded.built else "reused"
            print(
                f"decoded {self.name} {name}: {shape} uint8, {decoded.nbytes / 2**20:.1f} MiB, "
                f"{what} ({decoded.path})",
                flush=True,
            )
            self._decoded[name] = decoded
        return self._decoded[name]

    def _decoded_loader(
        self, dataset: AugmentedDataset, name: str, epoch: int, train: bool, start: int = 0
    ) -> DecodedLoader:
        from conkd.decoded import BatchAugment, DecodedLoader

        return DecodedLoader(
            self._decoded_array(name).array,
            dataset.indices,
            dataset.targets,
            BatchAugment(self.image_size, train=train, seed=self.seed, **self.augment),
            epoch=epoch,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            seed=self.seed,
            device=self.device,
            start=start,
            rank=self.rank,
            world=self.world,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": self.root,
            "num_classes": self.num_classes,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "test_size": len(self.test),
        }

    @property
    def identity(self) -> str:
        """The dataset's identity (see :attr:`Source.identity`)."""
        return self.source.identity

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data a run saw: source, class names, a digest of the file list,
        labels and the drawn train/val split, and the split sizes. Used for the MLflow dataset
        input and as part of cache keys."""
        h = hashlib.sha256()
        h.update(json.dumps({"classes": self.classes, "identity": self.identity}).encode())
        h.update(self.source.item_digest(self.source.train).encode())
        h.update(self.source.item_digest(self.source.test).encode())
        h.update(json.dumps([[int(i) for i in s.indices] for s in (self.train, self.val)]).encode())
        return {
            "name": self.name,
            "identity": self.identity,
            "source": self.source.location or str(self.root),
            "digest": h.hexdigest(),
            "classes": list(self.classes),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
        }
