"""torchrun on this machine: N processes (gloo on the CPU, NCCL on GPUs) vs 1, side by side.

Trains the same ResNet-18 CE run (``--steps`` steps of global batch ``--batch``, 2 epochs, the
second timed) once with ``python train.py`` and once with ``torchrun --nproc_per_node=N``, and
prints each one's training img/s (from its checkpoint's history) and, last, the ratio.

    python benchmarks/ddp_throughput.py [--nproc 2] [--data ../shared/data/imagenette]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, missing_dataset, scratch_dir  # noqa: E402


def throughput(cmd: list[str], out: Path) -> float:
    env = {**os.environ, "CONKD_ROOT": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    from conkd.checkpoint import load_checkpoint

    history = load_checkpoint(out / "checkpoints" / "last.pt")["train_state"]["history"]
    return history[-1]["train/throughput_img_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()
    if missing_dataset(args.data):
        return 0
    work = scratch_dir("conkd_ddp_", args.keep)
    common = [
        "experiment=teacher", "model=resnet18", "mlflow.enabled=false", "dataset=imagefolder",
        f"dataset.root={args.data}", "dataset.source.verify=false",
        f"dataset.image_size={args.image_size}", f"dataset.batch_size={args.batch}",
        f"dataset.decode.dir={work / 'decoded'}", "trainer.epochs=2",
        f"trainer.max_steps_per_epoch={args.steps}", "trainer.progress=false",
    ]  # fmt: skip
    one = throughput([sys.executable, "train.py", *common, f"hydra.run.dir={work / 'one'}"],
                     work / "one")  # fmt: skip
    many = throughput(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={args.nproc}", "train.py", *common, f"hydra.run.dir={work / 'many'}"],
        work / "many",
    )  # fmt: skip
    print(f"1 process: {one:.1f} img/s; {args.nproc} processes (torchrun): {many:.1f} img/s")
    print(f"ratio {args.nproc} processes / 1 process: {many / one:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
