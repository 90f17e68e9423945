"""Builders of the demo zoo's networks (plain functions, torchvision style).

Every builder returns an `nn.Sequential` that takes [0,1] pixels (N, 1, 28, 28), normalises inside
(`layers.Normalize`) and returns logits, built only from layers `mixclf_ros.core.lipschitz` can bound.
Weights are loaded separately (`mixclf_ros.models.loading`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from mixclf_ros.core.layers import Normalize

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def fmnist_cnn(num_classes: int = 10, mean: Sequence[float] = FASHION_MNIST_MEAN,
               std: Sequence[float] = FASHION_MNIST_STD) -> nn.Sequential:
    """Accurate standard CNN: 4 convolutions (32-32-64-64), 2 max-pools, 2 linear layers; 0.47 M params."""
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, num_classes),
    )


def fmnist_small_cnn(num_classes: int = 10, mean: Sequence[float] = FASHION_MNIST_MEAN,
                     std: Sequence[float] = FASHION_MNIST_STD) -> nn.Sequential:
    """Smaller CNN for adversarial and noise training: 2 convolutions (32-64), 2 max-pools; 0.42 M params."""
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def fmnist_lipschitz_cnn(num_classes: int = 10, mean: Sequence[float] = (0.0,),
                         std: Sequence[float] = (1.0,)) -> nn.Sequential:
    """Lipschitz-bounded CNN: no BatchNorm, no normalisation gain, stride-1 convolutions (whose l2
    norm `mixclf_ros.core.lipschitz` computes exactly from their FFT) and non-overlapping 2x2 average
    pooling (l2 norm exactly 1/2): convolutions 1-32, 32-64 (3x3), then 3136-128-num_classes. The
    last layer's scale includes the temperature chosen after training."""
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": fmnist_cnn,
    "fmnist_small_cnn": fmnist_small_cnn,
    "fmnist_lipschitz_cnn": fmnist_lipschitz_cnn,
}
