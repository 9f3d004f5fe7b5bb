"""Benchmark: ConKD's training loop vs a minimal hand-written PyTorch loop, side by side.

Both train the same ResNet-18 (``conkd.models.Network``) with AdamW and cross-entropy on the same
class folders, batch, resolution and loader workers, with no tracking. The ConKD side is the
project's own path: the real configs composed by Hydra, :func:`conkd.run.setup` and
:func:`conkd.engine.train_one_epoch` (its data path is whatever the config selects: the
decode-once arrays by default, the PIL path with ``--pil``). The hand-written side is the usual
notebook loop: ``torchvision.datasets.ImageFolder`` + PIL + ``RandomResizedCrop``. The two are
timed alternately (``--rounds`` each, best kept) so machine noise hits both alike.

    python benchmarks/loop_overhead.py --data ../shared/data/imagenette --image-size 64 --steps 20

Prints images/s of each and, last, ``ratio conkd/minimal: X.XX`` (target >= 0.95).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torchvision
from _common import (
    CACHE_DIR,
    DATA,
    QUIET,
    dataset_overrides,
    epoch_rate,
    missing_dataset,
    parser,
    scratch_dir,
    setup_parts,
)
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from conkd.models import Network  # noqa: E402
from conkd.views import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def minimal_loop(root: Path, size: int, batch: int, workers: int, steps: int) -> float:
    """The hand-written baseline; returns images/s over ``steps`` steps (loader start included)."""
    tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.35, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(root / "train"), tf)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    model = Network("resnet18", len(ds.classes), image_size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def conkd_loop(overrides: list[str], steps: int, epoch: int) -> float:
    """The project's path: composed config, ``setup``, one epoch of ``train_one_epoch``."""
    parts = setup_parts([*overrides, f"trainer.max_steps_per_epoch={steps}"])
    rate, metrics = epoch_rate(parts, epoch, steps)
    assert metrics["train/loss"] > 0
    return rate


def main() -> int:
    args = parser(
        __doc__, data=DATA, image_size=64, batch_size=64, workers=2, steps=20, rounds=2,
        pil=(False, "ConKD side on the PIL path too"), cache_dir=CACHE_DIR, keep=False,
    ).parse_args()  # fmt: skip
    data = Path(args.data)
    if missing_dataset(args.data):
        return 0
    out = scratch_dir("conkd-bench-loop-", args.keep)
    overrides = [
        "stage=teacher",
        "model=resnet18",
        "loss=ce",
        "optimizer=adamw",
        "optimizer.lr=1e-3",
        "scheduler=none",
        *dataset_overrides(
            data, args.image_size, args.batch_size, args.cache_dir, workers=args.workers
        ),
        f"dataset.decode.enabled={str(not args.pil).lower()}",
        *QUIET,
        "trainer.device=cpu",
        f"paths.output_dir={out}",
    ]
    torch.set_num_threads(torch.get_num_threads())
    conkd_loop(overrides, 2, 0)  # warm-up: builds the decoded arrays once, outside the timing
    ours, theirs = [], []
    for r in range(args.rounds):
        theirs.append(
            minimal_loop(data, args.image_size, args.batch_size, args.workers, args.steps)
        )
        ours.append(conkd_loop(overrides, args.steps, epoch=r + 1))
        print(f"round {r + 1}: minimal {theirs[-1]:.1f} img/s, conkd {ours[-1]:.1f} img/s")
    path = "PIL" if args.pil else "decode-once"
    print(
        f"resnet18 CE AdamW, {args.image_size} px, batch {args.batch_size}, {args.steps} steps, "
        f"{args.workers} workers, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"minimal hand-written loop (ImageFolder + PIL): {max(theirs):.1f} img/s (best)")
    print(f"conkd train_one_epoch ({path} input):      {max(ours):.1f} img/s (best)")
    print(f"ratio conkd/minimal: {max(ours) / max(theirs):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
