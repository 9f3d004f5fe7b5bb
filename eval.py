"""Evaluate a checkpoint: top-1/top-5 and per-class accuracy.

    python eval.py ckpt_path=outputs/train/.../checkpoints/best.pt dataset=imagefolder \
        dataset.root=/data/imagenette
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from conkd.targets import config_targets

os.environ.setdefault("CONKD_ROOT", str(Path(__file__).resolve().parent))


# The whitelist: the only _target_ packages this config may build (conkd/targets.py).
@hydra.main(config_path="conf", config_name="eval", execution_whitelist=config_targets())
def main(cfg: DictConfig) -> dict:
    from conkd.cli import run_app
    from conkd.evaluate import evaluate_checkpoint

    return run_app(evaluate_checkpoint, cfg)


if __name__ == "__main__":
    main()
