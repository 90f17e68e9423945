"""An example of your own Lipschitz network h, for docs/BRING_YOUR_OWN.md: 32x32 RGB in, logits out,
with its own `forward` (a residual block). Nothing in it declares a constant: mixclf_ros traces the
network and bounds its Lipschitz constant from the weights at configure.

Architecture string in a parameters file: `my_lipschitz_net:build` (with this folder on PYTHONPATH).
"""

from __future__ import annotations

import torch
from torch import nn


class SmallLipschitzNet(nn.Module):
    """conv 3-32, a residual conv block, two 2x2 average pools, linear: (N, 3, 32, 32) -> (N, classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.AvgPool2d(4)
        self.head = nn.Linear(32 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + 0.5 * torch.relu(self.block(x))
        return self.head(torch.flatten(self.pool(x), 1))


def build(num_classes: int = 10) -> nn.Module:
    return SmallLipschitzNet(num_classes)
