"""The data of a run: a source, its seeded train / validation / test split, its views.

:class:`DataModule` (``dataset=...``; the source comes from :mod:`conkd.sources`) draws the
validation split, holds the train and eval :class:`conkd.views.ViewSpec` and builds the run's
:class:`conkd.loaders.Loaders` for a device, rank and world size: the PIL pipeline, or the
decode-once one (:mod:`conkd.decoded`) with ``dataset.decode``. Its :meth:`fingerprint` and
:meth:`pipeline` say what identifies the data and the views, for MLflow and cache keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from conkd import views
from conkd.checks import check_range
from conkd.decoded import FORMAT_VERSION, RESIZE_METHOD, DecodedArray, default_decode_size
from conkd.errors import ConKDError
from conkd.loaders import (
    AugmentedDataset,
    DecodedLoaders,
    Loaders,
    PILLoaders,
    Splits,
    keep_resident,
    to_resident,
)
from conkd.sources import DigitsSource, ImageFolderSource, ImagenetteSource, Source, Split
from conkd.views import ViewSpec

#: The sources are configured (and stored in checkpoints) as ``conkd.data.*``: one object each,
#: defined in :mod:`conkd.sources`.
__all__ = ["DataModule", "DigitsSource", "ImageFolderSource", "ImagenetteSource", "Source", "Split"]

_DECODE_KEYS = {"enabled", "size", "dir", "workers", "verify", "progress", "resident"}


def _decode_options(decode: dict[str, Any] | None, spec: ViewSpec) -> dict[str, Any] | None:
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
    size = options.get("size")
    if size is None:
        size = default_decode_size(spec.image_size, spec.crop)
    if int(size) < 8:
        raise ConKDError(f"dataset.decode.size must be >= 8, got {size}")
    directory = options.get("dir")
    if not directory:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = str(Path(cache) / "conkd" / "decoded")
    workers = options.get("workers")
    if workers is not None and int(workers) < 0:
        raise ConKDError(f"dataset.decode.workers must be >= 0, got {workers}")
    resident = options.get("resident", "auto")
    if resident not in ("auto", True, False):
        raise ConKDError(f"dataset.decode.resident must be auto, true or false, got {resident!r}")
    return {
        "resident": resident,
        "size": int(size),
        "dir": str(directory),
        "workers": None if workers is None else int(workers),
        "verify": bool(options.get("verify", False)),
        "progress": bool(options.get("progress", True)),
    }


def _mix_spec(mix: dict[str, Any] | None) -> views.MixSpec:
    """``dataset.mix`` as a :class:`conkd.views.MixSpec`, its keys checked."""
    options = dict(mix or {})
    known = {f.name for f in dataclasses.fields(views.MixSpec)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConKDError(f"unknown dataset.mix keys {unknown}; expected some of {sorted(known)}")
    return views.MixSpec(**{k: float(v) for k, v in options.items()})


def _split(targets: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split where every class can be represented, else a plain random one."""
    idx = np.arange(len(targets))
    try:
        return train_test_split(idx, test_size=fraction, random_state=seed, stratify=targets)
    except ValueError:  # tiny data: fewer held-out samples than classes
        return train_test_split(idx, test_size=fraction, random_state=seed)


def _check_sizes(image_size: int, batch_size: int, val_fraction: float, source: Source) -> None:
    check_range("dataset.image_size", image_size)
    check_range("dataset.batch_size", batch_size)
    check_range("dataset.val_fraction", val_fraction)
    if len(source.classes) < 2:
        raise ConKDError(
            f"the dataset has {len(source.classes)} class ({', '.join(source.classes)}); "
            "classification needs at least 2 class folders"
        )


class DataModule:
    """Seeded train / validation / test data over a :class:`conkd.sources.Source`.

    The validation split (for model selection) is a stratified ``val_fraction`` of the source's
    train split drawn with ``split_seed``; the source's test split is only used for the final
    evaluation of the best checkpoint. ``augment`` is the train view (:class:`ViewSpec`).

    ``mix`` (``dataset.mix``, :class:`conkd.views.MixSpec`) mixes training batches (mixup,
    cutmix) on the training device; :attr:`mixer` is what the loop and the teacher cache apply.

    ``decode`` switches to the decode-once pipeline (:mod:`conkd.decoded`): each split is decoded
    once into a uint8 array on disk and batches are rendered with tensor ops on the training
    device, because per-sample PIL decoding bounds the step rate of small-image runs. Keys (all
    optional):

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
    * ``progress``: show a progress bar while decoding (default True);
    * ``resident``: keep the arrays in the training device's memory and gather batches there
      (:func:`conkd.loaders.keep_resident`; ``auto``, the default: on CUDA when they fit).
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
        mix: dict[str, Any] | None = None,
    ) -> None:
        _check_sizes(image_size, batch_size, val_fraction, source)
        self.source = source
        self.name = name or source.name
        self.root = root  # informational: the source was built from it
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.classes = list(source.classes)
        self.spec = ViewSpec.of(image_size, dict(augment or {}))
        train_idx, val_idx = _split(source.train.targets, val_fraction, split_seed)
        eval_spec = self.spec.eval()
        self.train = AugmentedDataset(source.train, sorted(train_idx), self.spec, seed)
        self.val = AugmentedDataset(source.train, sorted(val_idx), eval_spec, seed)
        self.test = AugmentedDataset(source.test, range(len(source.test)), eval_spec, seed)
        if len(self.train) < batch_size:
            raise ConKDError(
                f"only {len(self.train)} training images for batch_size={batch_size}; "
                "lower dataset.batch_size"
            )
        self.decode = _decode_options(decode, self.spec)
        self._decoded: dict[str, DecodedArray] = {}
        self.mixing = _mix_spec(mix)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mixer(self) -> views.Mixer | None:
        """The training batches' mixing under the run's seed; None when ``mix`` is off."""
        return views.Mixer(self.mixing, self.seed) if self.mixing.enabled else None

    def loaders(self, device: torch.device | str = "cpu", rank: int = 0, world: int = 1) -> Loaders:
        """The run's loaders for this process: rendered on ``device`` (decode-once; PIL batches
        are made on the CPU and moved by the loop), rank ``rank``'s share of every batch when
        ``world`` processes train together (``dataset.batch_size`` is the global batch)."""
        if self.batch_size % world:
            raise ConKDError(
                f"dataset.batch_size={self.batch_size} (the global batch) must be divisible by "
                f"the {world} processes"
            )
        splits = Splits(self.train, self.val, self.test, self.batch_size, self.eval_batch_size,
                        self.seed)  # fmt: skip
        device = torch.device(device)
        if self.decode is None:  # pinned batches: the loop's copy to a CUDA device is queued
            pin = self.pin_memory or device.type == "cuda"
            return PILLoaders(splits, self.num_workers, pin, rank, world)
        arrays = {name: self.decoded(name).array for name in ("train", "test")}
        nbytes = sum(a.nbytes for a in arrays.values())
        if keep_resident(self.decode["resident"], device, nbytes):
            arrays = {name: to_resident(a, device) for name, a in arrays.items()}
        return DecodedLoaders(splits, arrays, device, rank, world)

    def pipeline(self) -> dict[str, Any]:
        """What, besides the data, the seed and ``augment``, shapes the views a run sees: the
        PIL path or the decode-once path at a given size. Their views start from other pixels
        (resized crops are taken from the decoded image), so caches of per-view outputs must
        key on this."""
        mixing = {"mix": dataclasses.asdict(self.mixing)} if self.mixing.enabled else {}
        if self.decode is None:
            return {"kind": "pil", "image_size": self.image_size, "views": views.VERSION, **mixing}
        return {
            "kind": "decoded",
            "views": views.VERSION,
            "image_size": self.image_size,
            "decode_size": self.decode["size"],
            "resize": RESIZE_METHOD,
            "format_version": FORMAT_VERSION,
            **mixing,
        }

    def prepare(self) -> dict[str, Path]:
        """Decode the source's train and test splits now (or find them decoded) instead of on
        the first loader, printing the time and size; returns each array's folder. Does
        nothing without ``decode``."""
        if self.decode is None:
            return {}
        return {name: self.decoded(name).path for name in ("train", "test")}

    def decoded(self, name: str) -> DecodedArray:
        """The decoded array of source split ``name`` (``train`` also serves validation)."""
        if self.decode is None:
            raise ConKDError("the decode-once pipeline is off (dataset.decode.enabled=false)")
        if name not in self._decoded:
            self._decoded[name] = self._open_decoded(name)
        return self._decoded[name]

    def _open_decoded(self, name: str) -> DecodedArray:
        assert self.decode is not None
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
        return decoded

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
        """The dataset's identity (see :attr:`conkd.sources.Source.identity`)."""
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
