"""Networks: heads, stems, probes."""

from __future__ import annotations

import pytest
import torch

from conkd.errors import ConKDError
from conkd.models import Network, Probe, linear_head


@pytest.mark.parametrize(("size", "kernel"), [(32, 3), (64, 7)])
def test_small_stem_auto_follows_image_size(size: int, kernel: int) -> None:
    net = Network("resnet18", num_classes=4, image_size=size)
    assert net.backbone.conv1.kernel_size == (kernel, kernel)
    assert net(torch.randn(2, 3, size, size))["logits"].shape == (2, 4)


def test_small_stem_only_for_resnets() -> None:
    with pytest.raises(ConKDError, match="small_stem"):
        Network("mobilenet_v3_small", num_classes=4, small_stem=True)


def test_unknown_arch_is_clear() -> None:
    with pytest.raises(ConKDError, match="unknown model.arch"):
        Network("resnet9000", num_classes=4)


@pytest.mark.parametrize("zero", [False, True])
def test_zero_init_residual_starts_each_block_as_identity(zero: bool) -> None:
    """Every residual branch's last BatchNorm scale is 0 (the block passes its input through)
    only when asked for; the stem and other BatchNorms keep torchvision's 1."""
    torch.manual_seed(0)
    net = Network("resnet18", num_classes=4, image_size=32, zero_init_residual=zero).eval()
    blocks = [b for layer in ("layer1", "layer2") for b in getattr(net.backbone, layer)]
    last_bn = [b.bn2.weight.abs().max().item() for b in blocks]
    assert last_bn == [0.0 if zero else 1.0] * 4
    assert net.backbone.bn1.weight.min().item() == 1.0
    block = net.backbone.layer1[0]  # no downsample: out = relu(x + branch(x)) = relu(x)
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(block(x), torch.relu(x)) is zero


def test_zero_init_residual_only_for_resnets() -> None:
    with pytest.raises(ConKDError, match="zero_init_residual"):
        Network("mobilenet_v3_small", num_classes=4, zero_init_residual=True)


def test_probe_keeps_backbone_frozen_in_train_mode() -> None:
    net = Network("resnet18", num_classes=3, image_size=32, projection_dim=None)
    probe = Probe(net, linear_head(net.embedding_dim, 5)).train()
    assert not probe.network.training and probe.head.training
    out = probe(torch.randn(4, 3, 32, 32))
    out["logits"].sum().backward()
    assert all(p.grad is None for p in probe.network.parameters())
    assert probe.head.weight.grad is not None
