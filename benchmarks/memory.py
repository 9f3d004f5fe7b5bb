"""Benchmark: peak resident memory of a student run with the teacher cache and without it.

Runs the same short ``python train.py loss=lsd+supcon optimizer=lion`` student twice as separate
processes, with ``teacher_cache.enabled=true`` (the cache is built first by a warm-up run, so the
measured run only reads it by memory map and never loads the teacher) and with
``teacher_cache.enabled=false`` (the online ResNet-101 teacher in memory), and prints each
process's peak RSS (``ru_maxrss``).

    python benchmarks/memory.py --data ../shared/data/imagenette --image-size 64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import missing_dataset, scratch_dir  # noqa: E402

#: Runs a command and prints the peak RSS (KiB on Linux) of that child alone.
_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(r.returncode)"
)


def peak_rss_mb(*overrides: str) -> float:
    cmd = [sys.executable, "-c", _PEAK, sys.executable, str(ROOT / "train.py"), *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"train.py failed:\n{res.stderr[-3000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK_KB")][-1]
    return int(line.split()[1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "conkd-bench-cache"))
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    data = Path(args.data)
    if missing_dataset(args.data):
        return 0
    out = scratch_dir("conkd-bench-mem-", args.keep)
    common = [
        "dataset=imagefolder",
        f"dataset.root={data}",
        "dataset.source.verify=false",
        f"dataset.image_size={args.image_size}",
        f"dataset.decode.dir={args.cache_dir}/decoded",
        f"teacher_cache.dir={out}/teacher_cache",
        "trainer.epochs=1",
        f"trainer.max_steps_per_epoch={args.steps}",
        "trainer.progress=false",
        "mlflow.enabled=false",
    ]
    peak_rss_mb(
        *common,
        "experiment=teacher",
        "trainer.max_steps_per_epoch=2",
        f"hydra.run.dir={out}/teacher",
    )
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
