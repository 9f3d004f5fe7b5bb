"""Benchmark: peak resident memory of a student run with the teacher cache and without it.

Runs the same short ``python train.py loss=lsd+supcon optimizer=lion`` student twice as separate
processes, with ``teacher_cache.enabled=true`` (the cache is built first by a warm-up run, so the
measured run only reads it by memory map and never loads the teacher) and with
``teacher_cache.enabled=false`` (the online ResNet-101 teacher in memory), and prints each
process's peak RSS (``ru_maxrss``).

    python benchmarks/memory.py --data ../shared/data/imagenette --image-size 64
"""

from __future__ import annotations

import subprocess
import sys

from _common import (
    CACHE_DIR,
    DATA,
    QUICK_TEACHER,
    QUIET,
    ROOT,
    dataset_overrides,
    missing_dataset,
    parser,
    scratch_dir,
    train_cmd,
)

#: Runs a command and prints the peak RSS (KiB on Linux) of that child alone.
_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(r.returncode)"
)


def peak_rss_mb(*overrides: str) -> float:
    cmd = [sys.executable, "-c", _PEAK, *train_cmd(*overrides)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"train.py failed:\n{res.stderr[-3000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024


def main() -> int:
    args = parser(
        __doc__, data=DATA, image_size=64, steps=10, cache_dir=CACHE_DIR, keep=False
    ).parse_args()
    if missing_dataset(args.data):
        return 0
    out = scratch_dir("conkd-bench-mem-", args.keep)
    common = [
        *dataset_overrides(args.data, args.image_size, cache_dir=args.cache_dir),
        f"teacher_cache.dir={out}/teacher_cache",
        "trainer.epochs=1",
        f"trainer.max_steps_per_epoch={args.steps}",
        *QUIET,
    ]
    peak_rss_mb(*common, *QUICK_TEACHER, f"hydra.run.dir={out}/teacher")
    student = [
        *common,
        "loss=lsd+supcon",
        "optimizer=lion",
        f"teacher_ckpt={out}/teacher/checkpoints/best.pt",
    ]
    peak_rss_mb(*student, "teacher_cache.enabled=true", f"hydra.run.dir={out}/warm")
    cached = peak_rss_mb(*student, "teacher_cache.enabled=true", f"hydra.run.dir={out}/cached")
    online = peak_rss_mb(*student, "teacher_cache.enabled=false", f"hydra.run.dir={out}/online")
    print(f"student run, {args.image_size} px, {args.steps} steps, resnet18 <- resnet101")
    print(f"peak RSS with the teacher cache:   {cached:7.0f} MB")
    print(f"peak RSS with the online teacher:  {online:7.0f} MB")
    print(f"ratio cached/online peak RSS: {cached / online:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
