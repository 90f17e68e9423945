"""Models that misbehave on purpose, loaded by the node through the `package.module:Callable`
architecture path (the test directory is on PYTHONPATH). Each wraps a small real CNN and
misbehaves only on frames whose mean intensity falls in a trigger band, so the same node serves
good frames normally between faults.

Trigger bands of the mean pixel value of the model input ([0,1]):
    > 0.90          raise RuntimeError
    0.80 .. 0.90    return NaN logits
    0.70 .. 0.80    stall for 1.5 s, then answer normally; the stall's start is announced by creating
                    the file named by $MIXCLF_TEST_STALL_FILE (if set), so a test waits on it
"""

import os
import time
from pathlib import Path

import torch
from torch import nn


class Tripwire(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brightness = float(x.mean())
        if brightness > 0.90:
            raise RuntimeError("tripwire: injected model exception")
        logits = self.body(x)
        if 0.80 < brightness <= 0.90:
            return torch.full_like(logits, float("nan"))
        if 0.70 < brightness <= 0.80:
            if os.environ.get("MIXCLF_TEST_STALL_FILE"):
                Path(os.environ["MIXCLF_TEST_STALL_FILE"]).touch()
            time.sleep(1.5)  # the fault injected: a model that stalls
        return logits


def tripwire(num_classes: int = 10) -> Tripwire:
    return Tripwire(num_classes)


def flat_linear(num_classes: int = 10) -> nn.Module:
    """A single linear layer on the flattened 28x28 grey input: its Lipschitz bound is its largest
    singular value, so large weights give a sound but meaninglessly small certified radius."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))
