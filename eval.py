"""Evaluate a checkpoint: top-1/top-5 and per-class accuracy.

    python eval.py ckpt_path=outputs/train/.../checkpoints/best.pt dataset=imagefolder \
        dataset.root=/data/imagenette
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("CONKD_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    from conkd.cli import run_app
    from conkd.evaluate import evaluate_checkpoint

    return run_app(evaluate_checkpoint, cfg)


if __name__ == "__main__":
    main()
