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
from conkd.targets import config_targets

os.environ.setdefault("CONKD_ROOT", str(Path(__file__).resolve().parent))


# The whitelist: the only _target_ packages this config may build (conkd/targets.py).
@hydra.main(config_path="conf", config_name="train", execution_whitelist=config_targets())
def main(cfg: DictConfig) -> float:
    from conkd.cli import run_app
    from conkd.run import run

    return run_app(run, cfg)


if __name__ == "__main__":
    main()
