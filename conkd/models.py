"""Networks: any torchvision classifier as a backbone, with class and projection heads.

Every network returns a dict ``{"logits", "embedding", "projection"}`` so a loss term can say which
output it consumes (see :class:`conkd.losses.Term`); ``projection`` is ``None`` without a head.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from conkd.errors import ConKDError


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Name and module of the classifier's final ``nn.Linear`` (``fc``, ``classifier.1``, ...)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConKDError(f"{type(model).__name__} has no linear classifier layer to replace")
    return found[-1]


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _small_input_stem(model: nn.Module) -> None:
    """CIFAR-style stem for small images: 3x3 stride-1 first conv and no max-pool.

    The ImageNet stem downsamples 4x before the first block, which leaves a 32 px image with
    8x8 features and costs a lot of accuracy; this keeps the 32 px resolution into layer1.
    """
    if not isinstance(model, torchvision.models.ResNet):
        raise ConKDError(
            f"model.small_stem is implemented for ResNets only, not {type(model).__name__}; "
            "set model.small_stem=false"
        )
    old = model.conv1
    model.conv1 = nn.Conv2d(3, old.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_backbone(arch: str, pretrained: bool, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision classifier by name, with its default ImageNet weights if ``pretrained``.

    ``zero_init_residual`` starts every residual branch's last BatchNorm at zero, so a deep
    ResNet begins as a shallow one and trains faster from scratch (Goyal et al., 2017,
    "Accurate, Large Minibatch SGD", section 5.1).
    """
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConKDError(
            f"unknown model.arch={arch!r}; any torchvision classifier works, "
            "e.g. resnet18, resnet50, mobilenet_v3_small, efficientnet_b0"
        )
    if not pretrained:
        if not zero_init_residual:
            return torchvision.models.get_model(arch, weights=None)
        if not arch.startswith(("resnet", "resnext", "wide_resnet")):
            raise ConKDError(
                f"model.zero_init_residual is implemented for ResNets only, not {arch}; "
                "set model.zero_init_residual=false"
            )
        return torchvision.models.get_model(arch, weights=None, zero_init_residual=True)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise ConKDError(
            f"could not load pretrained {arch} weights ({err.__class__.__name__}: {err}). "
            "Set model.pretrained=false to train from scratch, or place the weights file "
            f"{weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints"
        ) from err


class Network(nn.Module):
    """Backbone + linear classifier + optional projection MLP (SupCon / projection-level KD)."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        pretrained: bool = False,
        small_stem: bool | str = "auto",
        image_size: int | None = None,
        projection_dim: int | None = 128,
        projection_hidden: int | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        backbone = build_backbone(arch, pretrained, zero_init_residual)
        if small_stem == "auto":
            small_stem = image_size is not None and image_size < 64 and arch.startswith("resnet")
        if small_stem:
            _small_input_stem(backbone)
        name, linear = _last_linear(backbone)
        _replace(backbone, name, nn.Identity())
        self.arch = arch
        self.num_classes = num_classes
        self.embedding_dim = linear.in_features
        self.backbone = backbone
        self.fc = nn.Linear(self.embedding_dim, num_classes)
        self.projector: nn.Module | None = None
        if projection_dim:
            hidden = projection_hidden or self.embedding_dim
            self.projector = nn.Sequential(
                nn.Linear(self.embedding_dim, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, projection_dim),
            )

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        embedding = self.backbone(x)
        projection = None
        if self.projector is not None:
            projection = nn.functional.normalize(self.projector(embedding), dim=-1)
        return {"logits": self.fc(embedding), "embedding": embedding, "projection": projection}


def linear_head(embedding_dim: int, num_classes: int) -> nn.Module:
    """Linear probe head."""
    return nn.Linear(embedding_dim, num_classes)


def mlp_head(
    embedding_dim: int, num_classes: int, hidden: int = 128, dropout: float = 0.4
) -> nn.Module:
    """The original notebooks' probe head: Linear -> BN -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(embedding_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


class Probe(nn.Module):
    """A frozen backbone with a new trainable head on its embedding (linear evaluation).

    The backbone stays in eval mode even when the probe is put in train mode, so its BatchNorm
    statistics are not updated by the probe's data.
    """

    def __init__(self, network: Network, head: nn.Module) -> None:
        super().__init__()
        self.network = network.requires_grad_(False)
        self.head = head
        self.arch = network.arch
        self.num_classes = network.num_classes

    def train(self, mode: bool = True) -> Probe:
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor | None]:
        with torch.no_grad():
            embedding = self.network.backbone(x)
        return {"logits": self.head(embedding), "embedding": embedding, "projection": None}


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts for logging."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
