"""Where images come from: a class-folder tree, torchvision's Imagenette, scikit-learn's digits.

A source exposes an untransformed ``train`` and ``test`` :class:`Split` and its class names;
:class:`conkd.data.DataModule` draws the validation split and builds the loaders. Sources check
their files up front (``verify``: headers; ``skip_bad_images``: a full decode that drops and
counts unreadable files), so a bad image fails before training, naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.error
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from torchvision import datasets
from tqdm.auto import tqdm

from conkd.errors import ConKDError

log = logging.getLogger("conkd")

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

    @classmethod
    def of_files(cls, samples: Sequence[tuple[str, int]]) -> Split:
        """A split of image files from ``(path, label)`` pairs."""
        return cls([p for p, _ in samples], [t for _, t in samples], load_rgb)


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
    return folder.classes, Split.of_files(samples)


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


class ImagenetteSource(ImageFolderSource):
    """torchvision's Imagenette (fastai), official split; downloaded on first use.

    Once downloaded it is a class-folder tree (``imagenette2-<size>/{train,val}/<wnid>/``), read
    as :class:`ImageFolderSource` reads one, with the WordNet ids named (``tench``, ...).
    ``checks`` are ImageFolderSource's ``verify`` (default False here: the archive is checked
    by its md5) and ``skip_bad_images``.
    """

    name = "imagenette"

    def __init__(self, root: str, size: str = "160px", download: bool = True, **checks: bool):
        if size not in ("160px", "320px", "full"):
            raise ConKDError(f"dataset.source.size must be 160px, 320px or full, got {size!r}")
        root_path = Path(root).expanduser()
        try:
            root_path.mkdir(parents=True, exist_ok=True)
            for split in ("train", "val"):  # torchvision downloads and checks the archive
                found = datasets.Imagenette(str(root_path), split, size, download)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            url = datasets.Imagenette._ARCHIVES[size][0]
            raise ConKDError(
                f"Imagenette ({size}) is not in {root_path} and could not be downloaded "
                f"({err.__class__.__name__}: {err}). Download {url} yourself and extract it "
                f"into {root_path}, or point dataset=imagefolder dataset.root at an "
                "existing train/ + val/ copy"
            ) from err
        super().__init__(str(found._size_root), **{"verify": False, **checks})
        self.classes = [datasets.Imagenette._WNID_TO_CLASS[w][0] for w in self.classes]
        self.location = str(root_path.resolve())

    @property
    def identity(self) -> str:
        """``imagenette``: one official dataset, whatever folder it was downloaded to."""
        return self.name


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
