"""ConKD: Hydra-configured knowledge-distillation experiments (LS-KD + SupCon + Lion)."""

from conkd import schema as _schema  # noqa: F401  registers train.yaml's typed schema with Hydra

__version__ = "0.1.0"
