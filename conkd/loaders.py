"""Loaders: one interface, two input pipelines, built for a device, a rank and a world size.

:class:`Loaders` is what the training loop, evaluation and the teacher cache read:
``train(epoch, start)`` (the epoch's batches from batch ``start`` on: a mid-epoch resume) and
``eval(split)``. Both yield ``(x, y, i)``: views, labels and dataset positions ``i`` (for
per-sample data such as cached teacher outputs). Two implementations:

* :class:`PILLoaders`: a DataLoader decodes each image with PIL and renders its view in the
  workers, every epoch;
* :class:`DecodedLoaders`: rows of a split decoded once (:mod:`conkd.decoded`) are gathered in a
  background thread and rendered a batch at a time on the training device, because per-sample
  decoding bounds the step rate of small-image runs.

Both order samples with :class:`EpochSampler` and render them with :func:`conkd.views.render`
from :meth:`conkd.views.ViewSpec.draw`, so a view depends on ``(seed, epoch, index)`` alone.
Under torchrun each rank's loaders yield its ``batch_size / world`` share of every global batch.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as tvf

from conkd.devices import pinned_for, upload
from conkd.distributed import rank_slice
from conkd.sources import Split
from conkd.views import ViewParams, ViewSpec, render, sample_seed

_ORDER_STREAM = 2**32 - 1  # an "index" no sample has: the stream of the shuffling order


class EpochSampler(Sampler):
    """Yields ``(epoch, index)``; the order is a permutation seeded by (seed, epoch) alone.

    ``start`` skips the first ``start`` samples of the order: a run resumed mid-epoch continues
    with exactly the samples (and, as views are drawn per sample, the views) it had left.
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
        self.size, self.seed, self.shuffle, self.start = size, seed, shuffle, start
        self.batch_size, self.rank, self.world = batch_size, rank, world
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
            b, full = self.batch_size, len(order) // self.batch_size * self.batch_size
            order = [
                i
                for s in range(0, full, b)
                for i in rank_slice(order[s : s + b], self.rank, self.world)
            ]
        elif self.world > 1:
            order = order[self.rank :: self.world]
        return ((self.epoch, i) for i in order)


class AugmentedDataset(Dataset):
    """Item ``i`` is ``split[indices[i]]``; indexed by ``(epoch, i)`` (see :class:`EpochSampler`),
    it returns ``(view, label, i)`` with the view of ``(seed, epoch, i)`` under ``spec``."""

    def __init__(self, split: Split, indices: Sequence[int], spec: ViewSpec, seed: int) -> None:
        self.split = split
        self.indices = list(indices)
        self.spec = spec
        self.seed = seed
        self.targets = [split.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        epoch, i = key
        j = self.indices[i]
        image = tvf.pil_to_tensor(self.split.load(self.split.items[j]))[None]
        x = render(self.spec, image, self.spec.draw(self.seed, epoch, [i]))[0]
        return x, self.split.targets[j], i


class Loaders(Protocol):
    """The batches of one run: what the loop, evaluation and the teacher cache read."""

    batch_size: int

    def train(self, epoch: int, start: int = 0) -> Iterable:
        """Epoch ``epoch``'s training batches from batch ``start`` on (the last incomplete
        batch dropped: BatchNorm and SupCon want full batches)."""
        ...

    def eval(self, split: str) -> Iterable:
        """The un-augmented ``val`` or ``test`` split, every sample once, in order."""
        ...


@dataclass
class Splits:
    """The three datasets a run reads, with its batch sizes and seed."""

    train: AugmentedDataset
    val: AugmentedDataset
    test: AugmentedDataset
    batch_size: int
    eval_batch_size: int
    seed: int

    def eval_split(self, name: str) -> AugmentedDataset:
        return {"val": self.val, "test": self.test}[name]

    def train_sampler(self, epoch: int, start: int, rank: int, world: int) -> EpochSampler:
        b = self.batch_size
        sampler = EpochSampler(len(self.train), self.seed, True, start * b, b, rank, world)
        sampler.set_epoch(epoch)  # one sampler per loader: a loader made earlier keeps its order
        return sampler


class PILLoaders:
    """DataLoaders that decode with PIL and render each view in their workers."""

    def __init__(
        self, splits: Splits, num_workers: int, pin_memory: bool, rank: int = 0, world: int = 1
    ) -> None:
        self.splits, self.rank, self.world = splits, rank, world
        self.batch_size = splits.batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory

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
            generator=torch.Generator().manual_seed(self.splits.seed),
        )

    def train(self, epoch: int, start: int = 0) -> DataLoader:
        sampler = self.splits.train_sampler(epoch, start, self.rank, self.world)
        return self._loader(self.splits.train, sampler, self.batch_size // self.world, True)

    def eval(self, split: str) -> DataLoader:
        dataset = self.splits.eval_split(split)
        sampler = EpochSampler(len(dataset), self.splits.seed, False, rank=self.rank,
                               world=self.world)  # fmt: skip
        return self._loader(dataset, sampler, self.splits.eval_batch_size, drop_last=False)


class DecodedLoaders:
    """Loaders over decoded arrays (``arrays["train"]`` also serves validation), rendered on
    ``device``."""

    def __init__(
        self,
        splits: Splits,
        arrays: dict[str, np.ndarray],
        device: torch.device | str = "cpu",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.splits, self.arrays, self.rank, self.world = splits, arrays, rank, world
        self.batch_size = splits.batch_size
        self.device = torch.device(device)

    def _loader(self, dataset: AugmentedDataset, array: str, sampler: EpochSampler,
                batch_size: int, drop_last: bool) -> DecodedLoader:  # fmt: skip
        return DecodedLoader(
            self.arrays[array], dataset.indices, dataset.targets, dataset.spec, dataset.seed,
            sampler, batch_size, drop_last, self.device,
        )  # fmt: skip

    def train(self, epoch: int, start: int = 0) -> DecodedLoader:
        sampler = self.splits.train_sampler(epoch, start, self.rank, self.world)
        return self._loader(self.splits.train, "train", sampler,
                            self.batch_size // self.world, True)  # fmt: skip

    def eval(self, split: str) -> DecodedLoader:
        dataset = self.splits.eval_split(split)
        sampler = EpochSampler(len(dataset), self.splits.seed, False, rank=self.rank,
                               world=self.world)  # fmt: skip
        array = "test" if split == "test" else "train"
        return self._loader(dataset, array, sampler, self.splits.eval_batch_size, False)


#: The share of a GPU's free memory the arrays of ``resident: auto`` may take.
RESIDENT_SHARE = 0.25


def keep_resident(want: bool | str, device: torch.device, nbytes: int) -> bool:
    """Whether data of ``nbytes`` lives on ``device`` for the whole run (``want``: True, False
    or ``"auto"``: on a CUDA device when it takes at most :data:`RESIDENT_SHARE` of its free
    memory). Resident data is gathered by index on the device: no host copy, no host-to-device
    transfer per step."""
    if want != "auto":
        return bool(want)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_SHARE * free


def to_resident(array: np.ndarray, device: torch.device) -> Tensor:
    """A decoded array (a read-only memory map) copied into ``device`` memory, once."""
    return torch.from_numpy(np.array(array)).to(device)


class DecodedLoader:
    """One epoch of ``(x, y, i)`` batches from a decoded array, in ``sampler``'s order.

    Dataset position ``i`` is array row ``rows[i]`` with label ``targets[i]``. A background
    thread gathers the next batch's rows from the memory map (and draws its views) while the
    caller computes; the batch is then moved to ``device`` and rendered there. ``x`` lives on
    ``device``; ``y`` and ``i`` are CPU int64 tensors, as a DataLoader gives them.

    With ``array`` a tensor (resident on ``device``: :func:`keep_resident`) the thread only
    draws the views; rows and labels are gathered on the device (``y`` then lives there too),
    so a step moves nothing but the batch's positions and view parameters to the device.
    """

    def __init__(
        self,
        array: np.ndarray,
        rows: Sequence[int],
        targets: Sequence[int],
        spec: ViewSpec,
        seed: int,
        sampler: EpochSampler,
        batch_size: int,
        drop_last: bool,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
    ) -> None:
        if len(rows) != len(targets):
            raise ValueError(f"{len(rows)} rows but {len(targets)} targets")
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = torch.as_tensor(list(targets), dtype=torch.int64)
        self.spec, self.seed, self.sampler = spec, seed, sampler
        self.batch_size, self.drop_last = batch_size, drop_last
        self.device = torch.device(device)
        self.prefetch = max(1, prefetch)
        self.resident = isinstance(array, Tensor)
        if self.resident:
            self.device = array.device
            self.device_rows = upload(torch.from_numpy(self.rows), self.device)
            self.device_targets = upload(self.targets, self.device)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self) -> list[list[int]]:
        """The dataset positions of each batch still to come (this rank's share), in order."""
        order = [i for _, i in self.sampler]
        b = self.batch_size
        return [order[s : s + b] for s in range(0, len(self) * b, b)]

    def _gather(
        self, positions: list[int]
    ) -> tuple[Tensor | None, Tensor | None, Tensor, ViewParams]:
        index = torch.tensor(positions, dtype=torch.int64)
        params = self.spec.draw(self.seed, self.sampler.epoch, index)
        # pinned here, off the training thread: the copies to the device are then queued
        if self.resident:  # only the positions go to the device; labels are gathered there
            return None, None, pinned_for(index, self.device), params
        x = torch.from_numpy(np.ascontiguousarray(self.array[self.rows[positions]]))
        return (
            pinned_for(x, self.device),
            pinned_for(self.targets[index], self.device),
            index,
            params,
        )

    def _on_device(
        self, x: Tensor | None, y: Tensor | None, index: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The batch's rows and labels on the device: copied, or gathered there (resident)."""
        if not self.resident:
            return upload(x, self.device), y  # type: ignore[arg-type,return-value]
        at = upload(index, self.device)
        return self.array.index_select(0, self.device_rows[at]), self.device_targets[at]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        batches = self.batches()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(
            target=_produce, args=(self._gather, batches, ready, stop), name="decoded-prefetch",
            daemon=True,
        )  # fmt: skip
        worker.start()
        try:
            for _ in batches:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                x, y, index, params = item
                x, y = self._on_device(x, y, index)
                yield render(self.spec, x, params), y, index
        finally:
            stop.set()
            while worker.is_alive():
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            worker.join()


def _produce(gather: Any, batches: list[list[int]], ready: queue.Queue, stop: Any) -> None:
    """The prefetch thread: gathered batches into ``ready`` until done or ``stop``; an error
    is handed to the consumer, which raises it."""
    try:
        for positions in batches:
            item: Any = gather(positions)
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as err:
        ready.put(err)
