"""The loop's pieces on hand-made inputs: metrics, resumable loaders."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from conkd.engine import evaluate
from conkd.loaders import EpochSampler


class FixedLogits(nn.Module):
    """Returns the logits stored for each batch position, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.logits[x[:, 0].long()]}


def test_top1_top5_and_confusion_orientation_on_hand_made_logits() -> None:
    # 6 classes; four samples with known rankings.
    logits = torch.tensor(
        [
            [9, 8, 7, 6, 5, 0],  # true 0: top-1 right
            [9, 8, 7, 6, 5, 0],  # true 4: 5th ranked -> top-5 only
            [9, 8, 7, 6, 5, 0],  # true 5: ranked last -> neither
            [0, 1, 9, 2, 3, 4],  # true 2: top-1 right
        ],
        dtype=torch.float,
    )
    y = torch.tensor([0, 4, 5, 2])
    x = torch.arange(4, dtype=torch.float)[:, None].expand(4, 3)
    loader = [(x[:2], y[:2], torch.arange(2)), (x[2:], y[2:], torch.arange(2, 4))]
    metrics, confusion = evaluate(FixedLogits(logits), loader, torch.device("cpu"), 6)
    assert metrics["val/top1"] == 50.0 and metrics["val/top5"] == 75.0
    expected = np.zeros((6, 6), dtype=np.int64)
    expected[0, 0] = expected[2, 2] = 1
    expected[4, 0] = expected[5, 0] = 1  # rows: true class, columns: predicted
    np.testing.assert_array_equal(confusion, expected)


def test_epoch_sampler_start_continues_the_same_order() -> None:
    full = EpochSampler(20, seed=3, shuffle=True)
    full.set_epoch(2)
    rest = EpochSampler(20, seed=3, shuffle=True, start=8)
    rest.set_epoch(2)
    assert list(rest) == list(full)[8:] and len(rest) == 12
