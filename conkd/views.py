"""Augmented views: one definition, drawn per sample, rendered wherever the batch is.

A view of sample ``index`` in ``epoch`` is a pure function of ``(seed, epoch, index)``: the
sampler, the worker, the rank, the batch it lands in, the device and any global RNG state do not
matter. That is what an exact resume needs, and what caching the teacher's outputs per view
(FKD-style, :mod:`conkd.teacher_cache`) needs.

* :class:`ViewSpec` is the augmentation (``dataset.augment`` plus the output size), frozen;
* :meth:`ViewSpec.draw` turns ``(seed, epoch, index)`` into :class:`ViewParams`: a crop window
  in *relative* coordinates (so it means the same on the source image and on its decoded copy),
  a padded-crop offset, a flip and the seed of the photometric ops;
* :func:`render` applies them to a uint8 batch, on the batch's device;
* :class:`MixSpec` / :class:`Mixer` mix whole training batches (mixup, cutmix) on the training
  device, their partners and weights a pure function of ``(seed, epoch, batch position)``.

Crop windows are relative to the image, as the decode-once pipeline has always taken them from
its square copy: on a non-square source the aspect-ratio range (3/4..4/3) applies to the
squashed image, so the PIL path now shows the same content as the decoded one (before, it drew
in source pixels with torchvision's RandomResizedCrop and the two paths cropped differently).

Both input pipelines call :func:`render` (:mod:`conkd.loaders`): the PIL path per decoded image
in its DataLoader workers, the decode-once path per batch on the training device. A pipeline
decides *where* augmentation runs, never *what* it does; their views differ only in the pixels
they start from (the source image, or its copy decoded once at ``dataset.decode.size``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as nnf
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from conkd.devices import upload
from conkd.errors import ConKDError

#: Bumped whenever the view drawn for the same (spec, seed, epoch, index) changes: part of the
#: teacher cache's key (:meth:`conkd.data.DataModule.pipeline`) and of every checkpoint, so a
#: cache or a resume never mixes views of two definitions. 2: one definition for both pipelines.
VERSION = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("resized", "pad", "none")
#: RandomResizedCrop's aspect-ratio range and its number of tries before the whole image.
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_TRIES = 10
_MIX_STREAM = 2**32 - 2  # an "index" no sample has: the stream of each batch's mixing


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a function of ``(seed, epoch, index)`` alone."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class ViewParams:
    """The random parameters of a batch of views (CPU tensors, row k = sample k).

    ``boxes``: crop windows ``(x0, y0, x1, y1)`` as fractions of the image (``resized``; the
    whole image otherwise); ``offsets``: ``(top, left)`` of the crop in the padded
    ``image_size`` image (``pad``); ``flip``: horizontal flips; ``photometric``: each sample's
    seed for RandAugment / ColorJitter.
    """

    boxes: Tensor
    offsets: Tensor
    flip: Tensor
    photometric: Tensor


@dataclass(frozen=True)
class ViewSpec:
    """The train or eval view: ``dataset.augment``'s options and the output size.

    ``crop``: ``resized`` (RandomResizedCrop: ``scale_min``..1 of the area, aspect 3/4..4/3),
    ``pad`` (resize to ``image_size``, pad by ``padding``, random crop; CIFAR-style) or ``none``
    (resize). Then an optional horizontal flip, RandAugment and ColorJitter, and normalisation
    by ``mean`` / ``std``. ``train=False`` is the eval view: resize and normalise.
    """

    image_size: int
    train: bool = True
    crop: str = "resized"
    scale_min: float = 0.35
    padding: int = 4
    flip: bool = True
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    color_jitter: float = 0.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConKDError(
                f"dataset.augment.crop must be resized, pad or none, got {self.crop!r}"
            )
        if not 0 < self.scale_min <= 1:
            raise ConKDError(f"dataset.augment.scale_min must be in (0, 1], got {self.scale_min}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or not all(self.std):
            raise ConKDError(
                f"normalisation needs 3 means and 3 non-zero stds, got {self.mean} / {self.std}"
            )

    @classmethod
    def of(cls, image_size: int, augment: dict[str, Any] | None = None) -> ViewSpec:
        """The train view of ``dataset.augment`` (a plain dict) at ``image_size``."""
        return cls(image_size, True, **(augment or {}))

    def eval(self) -> ViewSpec:
        """The eval view of the same data: resize and normalise."""
        return replace(self, train=False)

    @property
    def crop_kind(self) -> str:
        return self.crop if self.train else "none"

    @property
    def photometric_ops(self) -> bool:
        return self.train and bool(self.randaugment_ops or self.color_jitter)

    @property
    def random(self) -> bool:
        """Whether views depend on (epoch, index) at all (False for the eval view)."""
        return self.train and (self.crop != "none" or self.flip or self.photometric_ops)

    def draw(
        self, seed: int, epoch: int | Sequence[int] | Tensor, index: Sequence[int] | Tensor
    ) -> ViewParams:
        """The parameters of the views of samples ``index`` in ``epoch`` (an int or one per
        sample), each from a generator seeded by ``(seed, epoch, index)`` alone.

        It runs for every training batch in the loader's thread, holding the GIL the training
        thread needs to launch its kernels, so it keeps per-sample work to the generator and its
        draws: the tensors are made once per batch, and the seed words go in as a uint32 row
        (the same entropy as the list ``[seed, epoch, index]``, converted faster)."""
        index = torch.as_tensor(index).reshape(-1)
        b = index.numel()
        epochs = torch.as_tensor(epoch).reshape(-1).expand(b) if b else torch.zeros(0)
        if not self.random:
            return ViewParams(
                torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(b, 1),
                torch.zeros(b, 2, dtype=torch.long),
                torch.zeros(b, dtype=torch.bool),
                torch.zeros(b, dtype=torch.long),
            )
        words = [[seed, int(e), int(i)] for e, i in zip(epochs.tolist(), index.tolist())]
        if all(0 <= w < 2**32 for row in words for w in row):
            words = np.asarray(words, dtype=np.uint32)  # type: ignore[assignment]
        resized, pad, span = self.crop == "resized", self.crop == "pad", 2 * self.padding + 1
        flip, photometric = self.flip, self.photometric_ops
        boxes, offsets, flips, seeds = [], [], [], []
        for entropy in words:
            rng = np.random.default_rng(entropy)
            boxes.append(self._resized_box(rng) if resized else (0.0, 0.0, 1.0, 1.0))
            offsets.append(rng.integers(0, span, 2).tolist() if pad else (0, 0))
            flips.append(bool(rng.random() < 0.5) if flip else False)
            seeds.append(int(rng.integers(0, 2**62)) if photometric else 0)
        return ViewParams(
            torch.tensor(boxes, dtype=torch.float32).reshape(b, 4),
            torch.tensor(offsets, dtype=torch.long).reshape(b, 2),
            torch.tensor(flips, dtype=torch.bool),
            torch.tensor(seeds, dtype=torch.long),
        )

    def _resized_box(self, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """RandomResizedCrop's window as fractions of the image: an area fraction and a
        log-uniform aspect ratio, retried until it fits (then the whole image)."""
        log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
        for _ in range(_TRIES):
            area = rng.uniform(self.scale_min, 1.0)
            ratio = math.exp(rng.uniform(*log_ratio))
            w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if w <= 1.0 and h <= 1.0:
                x0, y0 = rng.uniform(0.0, 1.0 - w), rng.uniform(0.0, 1.0 - h)
                return x0, y0, x0 + w, y0 + h
        return 0.0, 0.0, 1.0, 1.0

    def photometric(self) -> v2.Compose | None:
        """RandAugment and ColorJitter (uint8 in, uint8 out), or None when both are off."""
        ops: list[Any] = []
        if self.train and self.randaugment_ops:
            ops.append(v2.RandAugment(self.randaugment_ops, self.randaugment_magnitude))
        if self.train and self.color_jitter:
            c = self.color_jitter
            ops.append(v2.ColorJitter(c, c, c))
        return v2.Compose(ops) if ops else None


def render(spec: ViewSpec, x: Tensor, params: ViewParams) -> Tensor:
    """The normalized float views ``[B, 3, out, out]`` of the uint8 batch ``x`` ``[B, 3, H, W]``
    (on ``x``'s device) with the drawn ``params``.

    Geometry is one call for the whole batch: ``roi_align`` (bilinear, averaging over each output
    pixel's footprint) for resized crops, an antialiased resize plus a gather for ``pad`` and
    ``none``; only RandAugment / ColorJitter run per sample, each under its own seed.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a uint8 [B, 3, H, W] batch, got {x.dtype} {tuple(x.shape)}")
    out, (h, w) = spec.image_size, x.shape[-2:]
    crop = spec.crop_kind
    if crop == "resized":
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        b = torch.arange(x.shape[0], dtype=torch.float32)[:, None]
        rois = upload(torch.cat([b, params.boxes * scale], dim=1), x.device)
        y = roi_align(x.float(), rois, (out, out), 1.0, -1, aligned=True)
    else:
        y = x if (h, w) == (out, out) else tvf.resize(x, [out, out], antialias=True)
        if crop == "pad" and spec.padding > 0:
            y = _crop_padded(y, upload(params.offsets, x.device), spec.padding, out)
    if spec.train and spec.flip and bool(params.flip.any()):  # params are on the host
        y = torch.where(upload(params.flip, x.device)[:, None, None, None], y.flip(-1), y)
    ops = spec.photometric()
    if ops is not None:
        y = _photometric(ops, y, params.photometric)
    if y.dtype == torch.uint8:
        y = tvf.to_dtype(y, torch.float32, scale=True)
    else:  # roi_align's float output, still in [0, 255]: the same scale as to_dtype's
        y = y.mul_(1.0 / 255)
    # tvf.normalize's own mean/std tensors would be two synchronising copies per batch
    mean, std = (upload(torch.tensor(v, dtype=y.dtype).view(-1, 1, 1), y.device)
                 for v in (spec.mean, spec.std))  # fmt: skip
    return y.sub_(mean).div_(std)


def _photometric(ops: v2.Compose, y: Tensor, seeds: Tensor) -> Tensor:
    """``ops`` per sample on uint8, each under its own seed (the global CPU RNG is forked, so
    the caller's RNG state is untouched)."""
    if y.dtype != torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    views = []
    for k in range(y.shape[0]):
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would reseed the CUDA ones too, and
            # fork_rng(devices=[]) does not restore those (the ops draw on the CPU anyway)
            torch.default_generator.manual_seed(int(seeds[k]))
            views.append(ops(y[k]))
    return torch.stack(views)


def _crop_padded(x: Tensor, offsets: Tensor, padding: int, out: int) -> Tensor:
    """``out x out`` crops at ``offsets`` (top, left) of the zero-padded batch, in one gather."""
    padded = nnf.pad(x, (padding, padding, padding, padding))
    steps = torch.arange(out, device=x.device)
    rows = (offsets[:, 0:1] + steps)[:, :, None]  # [B, out, 1]
    cols = (offsets[:, 1:2] + steps)[:, None, :]  # [B, 1, out]
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()  # [B, out, out, C]


# --- batch mixing --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixParams:
    """How one batch is mixed: ``kind`` (none, mixup or cutmix), the Beta draw ``lam`` (the
    weight of each sample itself; its partner gets ``1 - lam``) and, for cutmix, the pasted
    window ``box`` as fractions of the image ``(x0, y0, x1, y1)``."""

    kind: str = "none"
    lam: float = 1.0
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Mix:
    """A mixed batch's label weights: sample ``k`` is ``lam`` of itself and ``1 - lam`` of its
    partner ``k - 1`` (:func:`partners`); a loss of the labels is mixed the same way."""

    lam: float
    kind: str


def partners(t: Tensor) -> Tensor:
    """Each sample's mixing partner: the one before it in the batch (the first takes the last),
    as torchvision's ``v2.MixUp`` / ``v2.CutMix`` pair them (``roll(1, 0)``)."""
    return t.roll(1, 0)


@dataclass(frozen=True)
class MixSpec:
    """``dataset.mix``: batch-level mixing augmentations.

    Mixup (Zhang et al., ICLR 2018) blends each image with its partner, ``lam ~ Beta(a, a)`` with
    ``a = mixup_alpha``; CutMix (Yun et al., ICCV 2019) pastes a window of the partner covering
    ``1 - lam`` of the image, ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``, and ``lam`` becomes the
    area actually kept. A batch is mixed with probability ``prob``; with both on, cutmix is
    picked with probability ``switch_prob`` (timm's ``Mixup`` options). 0 turns one off.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise ConKDError(f"dataset.mix.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConKDError(f"dataset.mix.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, seed: int, epoch: int, batch: int) -> MixParams:
        """The mixing of training batch ``batch`` of ``epoch``, from a generator seeded by
        ``(seed, epoch, batch)`` alone (so a resumed run and the teacher cache draw the same)."""
        if not self.enabled:
            return MixParams()
        rng = np.random.default_rng([seed, epoch, batch, _MIX_STREAM])
        if rng.random() >= self.prob:
            return MixParams()
        cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or rng.random() < self.switch_prob
        )
        if not cutmix:
            return MixParams("mixup", float(rng.beta(self.mixup_alpha, self.mixup_alpha)))
        lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        side = math.sqrt(1.0 - lam)  # the window's side, as a fraction of the image's
        cx, cy = rng.uniform(0.0, 1.0, 2)
        box = (max(cx - side / 2, 0.0), max(cy - side / 2, 0.0),
               min(cx + side / 2, 1.0), min(cy + side / 2, 1.0))  # fmt: skip
        return MixParams("cutmix", lam, box)


def mix(x: Tensor, params: MixParams) -> tuple[Tensor, Mix | None]:
    """Batch ``x`` ``[B, C, H, W]`` mixed with its :func:`partners` as ``params`` say, on its
    device, and the label weights (None: not mixed). CutMix's ``lam`` is the share of pixels
    each image keeps after the window is clipped to whole pixels."""
    if params.kind == "none":
        return x, None
    other = partners(x)
    if params.kind == "mixup":
        return torch.lerp(other, x, params.lam), Mix(params.lam, "mixup")
    assert params.box is not None
    h, w = x.shape[-2:]
    x0, y0 = round(params.box[0] * w), round(params.box[1] * h)
    x1, y1 = round(params.box[2] * w), round(params.box[3] * h)
    out = x.clone()
    out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return out, Mix(1.0 - (x1 - x0) * (y1 - y0) / (h * w), "cutmix")


@dataclass(frozen=True)
class Mixer:
    """The run's mixing: :class:`MixSpec` under the run's seed, applied to training batch
    ``batch`` of ``epoch`` by the loop and, identically, by the teacher cache's replay."""

    spec: MixSpec
    seed: int

    def __call__(self, x: Tensor, epoch: int, batch: int) -> tuple[Tensor, Mix | None]:
        return mix(x, self.spec.draw(self.seed, epoch, batch))
