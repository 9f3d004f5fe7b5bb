"""Checkpoint writes beside training: the resumable ``last.pt`` written by the training thread
(``trainer.checkpoint_background=false``) or by a thread of its own while training goes on
(``true``; ``auto``, the default, takes it on CUDA), measured side by side in one run.

The network, optimizer, scheduler and weight EMA come from the project's own path (composed
configs, ``conkd.run.setup``): the teacher preset (ResNet-101, AdamW, EMA: a last.pt of about
650 MiB) and the mission's student (ResNet-18, Lion). For each, on ``--device``:

1. how long the training thread is held by one ``last.pt``: the whole write, against the host
   copy that the background writer takes before it returns (and when that write lands);
2. ``--epochs`` short epochs of ``--steps`` training steps (``conkd.engine.train_one_epoch``),
   each followed by its ``best.pt`` and ``last.pt``, as a run's early epochs are: wall time
   with direct writes against background ones (waiting for the last write), in alternating
   order;
3. that a background ``last.pt``, written while the next epoch trains, holds exactly the
   tensors (values and strides, loaded on the CPU) and state of a direct write of the same
   state (exit 1 where not: ``experiments/gpu_check.sh`` then runs the protocol with direct
   writes);
4. the GIL: a loop of small CPU ops (each releases the GIL as it dispatches, as the training
   thread's CUDA ops do) alone, against the same loop while the background writer writes
   ``last.pt`` (``torch.save`` takes the GIL once per tensor).

    python benchmarks/checkpoint_write.py [--device cuda] [--image-size 128] [--steps 20]

Uses a generated image folder (no download): the data does not change what is written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from _common import QUIET, abba, parser, scratch_dir, tiny_overrides

NETWORKS = {
    "teacher": ["experiment=teacher", "mlflow.register=null"],
    "student": ["stage=teacher", "model=resnet18", "loss=ce", "optimizer=lion"],
}


def parts_for(who: str, work: Path, args) -> object:
    """The run parts of the ``who`` network on the generated data, on ``args.device``."""
    from _common import setup_parts

    from tests.conftest import write_image_folder

    per_class = -(-args.steps * args.batch_size * 5 // 12) + 1  # 3 classes, a fifth held out
    data = work / f"data-{per_class}"
    if not data.exists():
        write_image_folder(data, per_class_train=per_class, per_class_val=4)
    return setup_parts([
        *NETWORKS[who], *tiny_overrides(data, work / who, args.epochs, args.steps), *QUIET,
        f"dataset.image_size={args.image_size}", f"dataset.batch_size={args.batch_size}",
        f"trainer.device={args.device}", "teacher_ckpt=null", f"paths.output_dir={work / who}",
        "dataset.decode.progress=false",
    ])  # fmt: skip


def writer_for(parts, directory: Path, background: bool):
    from conkd.checkpoint import Checkpointer

    job = parts.job
    return Checkpointer(directory, job.model, parts.spec, job.optimizer, job.scheduler,
                        {"classes": parts.data.classes}, job.average, background)  # fmt: skip


def last_write(writer):
    """The future of the background ``last.pt`` write in flight (the one being timed)."""
    return writer._writer._pending["last.pt"]  # noqa: SLF001


def wait_device(parts) -> None:
    import torch

    if parts.job.device.type == "cuda":
        torch.cuda.synchronize()


def held(parts, work: Path) -> tuple[float, float, float]:
    """Seconds the training thread is held by one direct ``last.pt`` and by the background
    writer's host copy, and the seconds until that background write lands (the second of two,
    as in a run: the buffers are kept from the first). An epoch trains while it is written:
    its in-place updates, queued after the copies, must not reach the file (:func:`same_files`
    compares it with the direct one)."""
    from conkd.engine import train_one_epoch
    from conkd.state import TrainState

    state = TrainState()
    direct, queued = (writer_for(parts, work / n, n == "queued") for n in ("direct", "queued"))
    wait_device(parts)
    t0 = time.perf_counter()
    direct.save_last(state)
    direct_s = time.perf_counter() - t0
    queued.save_last(state)
    queued.flush()
    wait_device(parts)
    landed: list[float] = []
    t0 = time.perf_counter()
    queued.save_last(state)
    copy_s = time.perf_counter() - t0
    pending = last_write(queued)
    pending.add_done_callback(lambda _: landed.append(time.perf_counter()))
    train_one_epoch(parts.job, parts.loaders.train(1), 1, TrainState())
    queued.close()
    return direct_s, copy_s, landed[0] - t0


def epochs_with_checkpoints(parts, work: Path, background: bool, epochs: int) -> float:
    """Wall seconds of ``epochs`` short epochs, each followed by its ``best.pt`` and
    ``last.pt``, as a run's early epochs write them (the last write waited for)."""
    from conkd.engine import train_one_epoch
    from conkd.state import TrainState

    writer, state = writer_for(parts, work, background), TrainState()
    wait_device(parts)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        train_one_epoch(parts.job, parts.loaders.train(epoch), epoch, state)
        state.epoch += 1
        writer.save_best(epoch=epoch)  # early epochs are mostly new bests
        writer.save_last(state)
    writer.close()
    wait_device(parts)
    return time.perf_counter() - t0


def same_files(work: Path) -> bool:
    """Whether the background ``last.pt`` holds exactly the direct one's tensors and values."""
    import torch

    from conkd.checkpoint import load_checkpoint

    a, b = (load_checkpoint(work / n / "last.pt") for n in ("direct", "queued"))

    def equal(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.stride() == y.stride() and torch.equal(x, y)
        if isinstance(x, dict):
            return (
                isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
            )
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(equal(u, v) for u, v in zip(x, y))
        return x == y

    keys = ("state_dict", "optimizer", "scheduler", "average", "train_state", "classes")
    return all(equal(a[k], b[k]) for k in keys)


def launch_rate_kept(parts, work: Path, seconds: float = 2.0) -> tuple[float, float]:
    """Small in-place ops per second while a background ``last.pt`` is written, as a share of
    the rate alone, and the seconds that write took."""
    import torch

    from conkd.state import TrainState

    small = [torch.zeros(64) for _ in range(50)]

    def rate(until) -> float:
        n, t0 = 0, time.perf_counter()
        while not until(time.perf_counter() - t0):
            for t in small:
                t.add_(1.0)
            n += len(small)
        return n / (time.perf_counter() - t0)

    alone = rate(lambda s: s >= seconds)
    writer = writer_for(parts, work / "gil", background=True)
    writer.save_last(TrainState())  # buffers made; the next one times only the write
    writer.flush()
    t0 = time.perf_counter()
    writer.save_last(TrainState())
    pending = last_write(writer)
    beside = rate(lambda s: pending.done())
    writer.close()
    return beside / alone, time.perf_counter() - t0


def main() -> int:
    args = parser(
        __doc__, device="cpu", image_size=32, batch_size=16, steps=(8, "training steps an epoch"),
        epochs=(3, "epochs per timed run"), rounds=(2, "alternating rounds of the two writers"),
        networks="teacher,student", keep=False,
    ).parse_args()  # fmt: skip
    work, ok = scratch_dir("conkd-ckpt-", args.keep), True
    for who in args.networks.split(","):
        parts = parts_for(who, work, args)
        train_one = epochs_with_checkpoints(parts, work / who / "warm", False, 1)  # warm-up
        direct_s, copy_s, landed_s = held(parts, work / who)
        size = (work / who / "direct" / "last.pt").stat().st_size / 2**20
        print(
            f"{who}: last.pt {size:.0f} MiB on {parts.job.device}; the training thread is "
            f"held {direct_s:.3f} s by a direct write, {copy_s:.3f} s by the background "
            f"copy ({direct_s / copy_s:.1f}x less; the write lands after {landed_s:.3f} s)"
        )
        same = same_files(work / who)
        ok &= same
        print(
            f"{who}: background last.pt {'holds' if same else 'DIFFERS FROM'} what a direct "
            "write holds"
        )
        wall: dict[str, list[float]] = {"direct": [], "background": []}
        for r, name in abba(wall, args.rounds):
            run_dir = work / who / f"{name}-{r}"
            wall[name].append(epochs_with_checkpoints(parts, run_dir, name == "background",
                                                      args.epochs))  # fmt: skip
        d, b = min(wall["direct"]), min(wall["background"])
        print(
            f"{who}: {args.epochs} epochs of {args.steps} steps with a best.pt and last.pt each: "
            f"{d:.2f} s direct, {b:.2f} s background: ratio {b / d:.3f} "
            f"(one epoch without checkpoints: {train_one:.2f} s)"
        )
        kept, took = launch_rate_kept(parts, work / who)
        print(f"{who}: a loop of small ops keeps {100 * kept:.0f}% of its rate while the "
              f"background last.pt is written ({took:.2f} s)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
