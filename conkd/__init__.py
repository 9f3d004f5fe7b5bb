"""ConKD: Hydra-configured knowledge-distillation experiments (LS-KD + SupCon + Lion)."""

__version__ = "0.1.0"
