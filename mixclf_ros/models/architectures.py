"""Builders of the demo zoo's networks (plain functions, torchvision style).

Every builder returns an `nn.Sequential` that takes [0,1] pixels (N, 1, 28, 28), normalises inside
(`layers.Normalize`) and returns logits, built only from layers `mixclf_ros.core.lipschitz` can bound.
Weights are loaded separately (`mixclf_ros.models.loading`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torch.nn.utils import parametrize

from mixclf_ros.core.layers import AOLRescale, MaxMin, Normalize

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


def _aol(layer: nn.Module, trainable: bool, patches: bool = False) -> nn.Module:
    if not trainable:
        return layer
    # start where AOL is an isometry where it can be: orthogonal rows/columns, identity 3x3 kernels
    weight = layer.weight
    if weight.dim() == 2 or patches:
        nn.init.orthogonal_(weight)
    elif weight.shape[0] == weight.shape[1]:
        nn.init.dirac_(weight)
    parametrize.register_parametrization(layer, "weight", AOLRescale(patches))
    return layer


def fmnist_gnp_cnn(num_classes: int = 10, mean: Sequence[float] = (0.2860,), std: Sequence[float] = (1.0,),
                   width: int = 32, trainable: bool = False) -> nn.Sequential:
    """1-Lipschitz (l2) CNN of near gradient-norm-preserving layers, trained with AOL-rescaled
    convolutions and linear layers (each of l2 norm <= 1, `core.layers.AOLRescale`) and MaxMin
    activations (`core.layers.MaxMin`, 1-Lipschitz); downsampling by 2x2 stride-2 convolutions on
    non-overlapping windows (no pooling). Mean subtracted, std 1: no gain at the input, so the l2
    constant of the logits per [0,1] pixel is at most 1 while training.
    28x28: conv3x3 w -> s2 2w (14x14) -> conv3x3 2w -> s2 4w (7x7) -> conv3x3 4w -> 196w-256-num_classes.

    `trainable=True` registers the AOL parametrizations (for `mixclf_ros.train`); the zoo ships the
    weights they compute, frozen, with the temperature chosen after training folded into the last
    layer, so the loaded network (`trainable=False`) is plain Conv2d/Linear layers whose bound the
    engine computes from those weights."""
    return nn.Sequential(
        Normalize(mean, std),
        _aol(nn.Conv2d(1, width, 3, padding=1), trainable), MaxMin(),
        _aol(nn.Conv2d(width, 2 * width, 2, stride=2), trainable, patches=True), MaxMin(),
        _aol(nn.Conv2d(2 * width, 2 * width, 3, padding=1), trainable), MaxMin(),
        _aol(nn.Conv2d(2 * width, 4 * width, 2, stride=2), trainable, patches=True), MaxMin(),
        _aol(nn.Conv2d(4 * width, 4 * width, 3, padding=1), trainable), MaxMin(),
        nn.Flatten(), _aol(nn.Linear(4 * width * 7 * 7, 256), trainable), MaxMin(),
        _aol(nn.Linear(256, num_classes), trainable),
    )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "fmnist_cnn": fmnist_cnn,
    "fmnist_small_cnn": fmnist_small_cnn,
    "fmnist_lipschitz_cnn": fmnist_lipschitz_cnn,
    "fmnist_gnp_cnn": fmnist_gnp_cnn,
}
