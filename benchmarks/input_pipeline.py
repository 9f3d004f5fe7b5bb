"""Benchmark: can the decode-once input pipeline keep a ResNet-18 student busy?

Measures, in one process and one after the other (never concurrently):

(a) images/s of the decoded pipeline alone: gathering rows from the memory-mapped uint8 array and
    augmenting the batch with tensor ops (the train transform), i.e. ``DataModule.loaders().train``
    with ``dataset.decode`` on;
(b) images/s of a ResNet-18 student training step (forward, cross-entropy, backward, AdamW) on
    batches made beforehand, i.e. what the input pipeline has to keep up with;
(c) for comparison, images/s of today's PIL DataLoader path (decode + augment per sample).

and prints the ratio (a)/(b) last, as ``ratio input/step: X.XX``; >= 5 means the input pipeline
takes at most a fifth of a step's time.

    python benchmarks/input_pipeline.py --root ../shared/data/imagenette --image-size 64 \\
        --batch-size 64 --steps 20

The first run decodes the train and test splits into ``--cache-dir`` (once; later runs reuse
the arrays).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from _common import DATA, parser
from torch import nn

from conkd.data import DataModule
from conkd.models import Network
from conkd.sources import ImageFolderSource


def time_loader(loader: Iterable, steps: int, warmup: int) -> tuple[float, list]:
    """img/s over ``steps`` batches after ``warmup`` batches (startup excluded); the batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    batches = []
    seen = 0
    start = time.perf_counter()
    for _ in range(steps):
        x, y, _ = next(it)
        seen += x.shape[0]
        batches.append((x, y))
    elapsed = time.perf_counter() - start
    close = getattr(it, "close", None)
    if close is not None:
        close()  # stop the prefetch thread before the next measurement
    del it  # and a DataLoader's worker processes
    return seen / elapsed, batches


def time_train_steps(model: nn.Module, batches: list, steps: int, warmup: int) -> float:
    """img/s of forward + CE + backward + AdamW step on ready-made batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = criterion(model(x)["logits"], y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for k in range(warmup):
        step(*batches[k % len(batches)])
    seen = 0
    start = time.perf_counter()
    for k in range(steps):
        x, y = batches[k % len(batches)]
        step(x, y)
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> int:
    args = parser(
        __doc__, root=DATA, image_size=64, batch_size=64,
        steps=(20, "timed batches / steps per measurement"),
        warmup=(2, "untimed batches / steps before each"),
        cache_dir=("/tmp/conkd-bench-cache", "decoded arrays"),
        decode_size={"type": int, "default": None, "help": "default: 1.15 x image size"},
        workers=(2, "PIL loader and decoding workers"),
        skip_pil=(False, "skip the PIL DataLoader timing"),
    ).parse_args()  # fmt: skip

    root = Path(args.root).expanduser()
    if not (root / "train").is_dir():
        print(f"error: no class-folder dataset at {root} (needs train/<class>/*.jpg); pass --root")
        return 1
    source = ImageFolderSource(str(root), verify=False)
    common = dict(
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        augment={"crop": "resized", "scale_min": 0.35, "flip": True},
    )
    decode = {"dir": args.cache_dir, "size": args.decode_size, "workers": args.workers}
    data = DataModule(source, decode=decode, **common)
    data.prepare()
    print(
        f"{len(data.train)} training images, {args.image_size} px, batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, {args.steps} timed steps",
        flush=True,
    )

    decoded_rate, batches = time_loader(data.loaders().train(0), args.steps, args.warmup)
    model = Network("resnet18", data.num_classes, image_size=args.image_size)
    step_rate = time_train_steps(model, batches, args.steps, args.warmup)

    if not args.skip_pil:
        pil = DataModule(source, **common)
        pil_rate, _ = time_loader(pil.loaders().train(0), args.steps, 1)
        print(f"PIL DataLoader ({args.workers} workers):     {pil_rate:8.0f} img/s")
    print(f"decoded pipeline (gather + augment): {decoded_rate:8.0f} img/s")
    print(f"ResNet-18 train step (AdamW, CE):    {step_rate:8.0f} img/s")
    print(f"ratio input/step: {decoded_rate / step_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
