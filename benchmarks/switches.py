"""Benchmark: the trainer's speed switches on this machine, each against the plain fp32 step.

Times a training step (CE, Lion, batch 64) of ``--arch`` on ready-made batches with
``trainer.channels_last``, ``trainer.precision=bf16`` and ``trainer.compile`` switched on alone or
together (``channels_last+bf16``), alternating with the plain step so noise hits all alike; the
best of ``--rounds`` counts. The defaults in ``conf/train.yaml`` and the Imagenette protocol's
switches follow these numbers (see README, Performance).

    python benchmarks/switches.py --image-size 64 --steps 10
    python benchmarks/switches.py --arch resnet101 --settings fp32,channels_last+bf16

Prints images/s per setting and, last, each setting's speed-up over plain fp32.
"""

from __future__ import annotations

import time

import torch
from _common import parser
from lion_pytorch import Lion
from torch.nn import functional as F

from conkd.engine import autocast
from conkd.models import Network


def make(setting: str, size: int, arch: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The network and optimizer for ``setting``: switch names joined by ``+``."""
    torch.manual_seed(0)
    model = Network(arch, 10, image_size=size)
    if "channels_last" in setting:
        model = model.to(memory_format=torch.channels_last)
    if "compile" in setting:
        model.compile()
    return model, Lion(model.parameters(), lr=1e-4, weight_decay=0.5)


def images_per_s(setting: str, model, opt, batches, device: torch.device) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        if "channels_last" in setting:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, "bf16" if "bf16" in setting else "32"):
            loss = F.cross_entropy(model(x)["logits"].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - start)


def main() -> int:
    args = parser(
        __doc__, image_size=64, batch_size=64, steps=10, rounds=2, arch="resnet18",
        settings=("fp32,channels_last,bf16,channels_last+bf16,compile",
                  "comma-separated; switches in one setting joined by +"),
    ).parse_args()  # fmt: skip
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g),
            torch.randint(0, 10, (args.batch_size,), generator=g),
        )
        for _ in range(args.steps)
    ]
    settings = args.settings.split(",")
    built = {s: make(s, args.image_size, args.arch) for s in settings}
    for s in settings:  # warm-up (compile happens here), not timed
        images_per_s(s, *built[s], batches[:2], device)
    best = {s: 0.0 for s in settings}
    for _ in range(args.rounds):
        for s in settings:
            best[s] = max(best[s], images_per_s(s, *built[s], batches, device))
    print(
        f"{args.arch} CE Lion step, {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps} steps, {torch.get_num_threads()} threads, torch {torch.__version__}, cpu"
    )
    for s in settings:
        print(f"{s:<20} {best[s]:7.1f} img/s")
    base = best.get("fp32")
    if base:
        print(
            "speed-up over fp32: "
            + ", ".join(f"{s} {best[s] / base:.2f}x" for s in settings if s != "fp32")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
