"""Benchmark: a distillation step reading the teacher cache vs a plain CE student step.

Both sides are the project's own path (the real configs composed by Hydra, ``conkd.run.setup``,
``conkd.engine.train_one_epoch``) with the same ResNet-18, batch, resolution, optimizer and
decode-once input; the KD side uses the mission's ``loss=lsd+supcon`` with its teacher's outputs
read from the cache (built once before timing), the CE side ``loss=ce`` with no teacher. With
``--online`` the online ResNet-101 teacher is timed too. Rounds alternate so noise hits all alike.

    python benchmarks/kd_step.py --data ../shared/data/imagenette --image-size 64 --steps 20

Prints images/s of each and, last, ``ratio kd(cache)/ce step time: X.XX`` (target <= 1.10).
"""

from __future__ import annotations

from _common import (
    CACHE_DIR,
    DATA,
    QUIET,
    abba,
    dataset_overrides,
    epoch_rate,
    missing_dataset,
    parser,
    scratch_dir,
    setup_parts,
    train_teacher,
)


def timed_epoch(overrides: list[str], epoch: int, steps: int) -> float:
    """Images/s of one epoch of ``steps`` steps through the project's loop."""
    return epoch_rate(setup_parts(overrides), epoch, steps)[0]


def main() -> int:
    args = parser(
        __doc__, data=DATA, image_size=64, batch_size=64, steps=20, rounds=4,
        online=(False, "also time the online teacher"), cache_dir=CACHE_DIR, keep=False,
    ).parse_args()  # fmt: skip
    if missing_dataset(args.data):
        return 0
    out = scratch_dir("conkd-bench-kd-", args.keep)
    rounds = args.rounds
    common = [
        *dataset_overrides(args.data, args.image_size, args.batch_size, args.cache_dir),
        f"teacher_cache.dir={out}/teacher_cache",
        *QUIET,
        "trainer.device=cpu",
        f"trainer.epochs={rounds + 1}",
        f"trainer.max_steps_per_epoch={args.steps}",
    ]
    teacher = train_teacher(common, f"{out}/teacher")
    ce = [*common, "loss=ce", f"paths.output_dir={out}/ce"]
    kd = [*common, "loss=lsd+supcon", teacher, f"paths.output_dir={out}/kd"]
    online = [*kd, "teacher_cache.enabled=false"]
    timed_epoch(kd, 0, args.steps)  # builds the cache (all epochs), outside the timing
    results: dict[str, list[float]] = {"ce": [], "kd (cache)": [], "kd (online)": []}
    sides = {"ce": ce, "kd (cache)": kd, **({"kd (online)": online} if args.online else {})}
    for r, name in abba(sides, rounds):
        results[name].append(timed_epoch(sides[name], r + 1, args.steps))
    import torch

    print(
        f"resnet18 student, resnet101 teacher, {args.image_size} px, batch {args.batch_size}, "
        f"{args.steps} steps, Lion, decode-once input, {torch.get_num_threads()} threads"
    )
    best = {k: max(v) for k, v in results.items() if v}
    for name, value in best.items():
        print(f"{name:<12} {value:7.1f} img/s (best of {rounds})")
    if "kd (online)" in best:
        print(f"ratio kd(online)/ce step time: {best['ce'] / best['kd (online)']:.2f}")
    print(f"ratio kd(cache)/ce step time: {best['ce'] / best['kd (cache)']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
