"""Train a teacher, distil a student or fit a probe: `python train.py --help` lists the options.

python train.py experiment=teacher
python train.py loss=lsd+supcon optimizer=lion teacher_ckpt=outputs/.../checkpoints/best.pt
python train.py -m hparams_search=conkd_lion teacher_ckpt=...
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

import conkd  # noqa: F401  registers the config schema (conkd/schema.py) before Hydra composes

os.environ.setdefault("CONKD_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from conkd.cli import run_app
    from conkd.run import run

    return run_app(run, cfg)


if __name__ == "__main__":
    main()
