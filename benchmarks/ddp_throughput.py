"""torchrun on this machine: N processes (gloo on the CPU, NCCL on GPUs) vs 1, side by side.

Trains the same ResNet-18 CE run (``--steps`` steps of global batch ``--batch``, 2 epochs, the
second timed) once with ``python train.py`` and once with ``torchrun --nproc_per_node=N``, and
prints each one's training img/s (from its checkpoint's history) and, last, the ratio.

    python benchmarks/ddp_throughput.py [--nproc 2] [--data ../shared/data/imagenette]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    DATA,
    ROOT,
    dataset_overrides,
    missing_dataset,
    parser,
    scratch_dir,
    train_cmd,
    train_env,
)


def throughput(cmd: list[str], out: Path) -> float:
    res = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    from conkd.checkpoint import load_checkpoint

    history = load_checkpoint(out / "checkpoints" / "last.pt")["train_state"]["history"]
    return history[-1]["train/throughput_img_s"]


def main() -> int:
    args = parser(
        __doc__, nproc=2, data=DATA, image_size=64, batch=64, steps=20, keep=False
    ).parse_args()
    if missing_dataset(args.data):
        return 0
    work = scratch_dir("conkd_ddp_", args.keep)
    common = [
        "experiment=teacher", "model=resnet18", "mlflow.enabled=false",
        *dataset_overrides(args.data, args.image_size, args.batch, work), "trainer.epochs=2",
        f"trainer.max_steps_per_epoch={args.steps}", "trainer.progress=false",
    ]  # fmt: skip
    one = throughput(train_cmd(*common, f"hydra.run.dir={work / 'one'}"), work / "one")
    many = throughput(
        train_cmd(*common, f"hydra.run.dir={work / 'many'}", torchrun=args.nproc), work / "many"
    )
    print(f"1 process: {one:.1f} img/s; {args.nproc} processes (torchrun): {many:.1f} img/s")
    print(f"ratio {args.nproc} processes / 1 process: {many / one:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
