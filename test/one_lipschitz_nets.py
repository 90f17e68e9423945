"""Small Fashion-MNIST networks (1x28x28 inputs in [0,1]) built from real 1-Lipschitz layers
(deel-torchlip 1.0.5, orthogonium 0.0.4) and the same maps written with plain torch ops, with the
TRUE operator norms of their layers, for test_one_lipschitz_layers (issue 19).

A layer's true norm is that of the map it computes at inference (eval mode, the weight its
parametrization produces): affine layers are materialised as a matrix (the layer applied to the
standard basis, minus the layer at 0) and measured exactly (l2: largest singular value, linf: largest
absolute row sum); activations and pools have known exact norms (`KNOWN_NORMS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 28, 28)


# ----------------------------------------------------------------------------- plain-torch GroupSorts
# Each computes a GroupSort/MaxMin of the channels (dim 1) of (N, C) or (N, C, H, W) tensors: a
# piecewise permutation of coordinates, continuous, hence 1-Lipschitz in l2 and linf. Sizes are
# fixed at construction so that the forward has no shape-dependent Python control flow.


class SortGroups(nn.Module):
    """`sort` on a reshaped group of `group` consecutive channels."""

    def __init__(self, channels: int, group: int = 2):
        super().__init__()
        self.channels, self.group = channels, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.unflatten(1, (self.channels // self.group, self.group))
        return grouped.sort(dim=2).values.flatten(1, 2)


class ChunkMaxMin(nn.Module):
    """`chunk` into halves, `torch.maximum`/`torch.minimum`, `cat` (orthogonium's MaxMin by hand)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class SliceMaxMin(nn.Module):
    """`torch.maximum`/`minimum` on the slices `x[:, :k]`, `x[:, k:]`."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, :self.half], x[:, self.half:]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class StridedMaxMin(nn.Module):
    """`torch.maximum`/`minimum` on the strided views `x[:, ::2]`, `x[:, 1::2]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class KeepdimMinMax(nn.Module):
    """torchlip's functional GroupSort-2: `min`/`max(y, dim, keepdim=True)` of pairs, then `cat`."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.unflatten(1, (self.channels // 2, 2))
        low = torch.min(y, 2, keepdim=True)[0]
        high = torch.max(y, 2, keepdim=True)[0]
        return torch.cat([low, high], dim=2).flatten(1, 2)


class SqrtAvgPoolOfSquares(nn.Module):
    """The l2-norm pool written by hand, `sqrt(avg_pool(x*x) * k)` with k taps: the same map as
    `LPPool2d(2, kernel)`, but `x*x` is a product of two input-dependent tensors."""

    def __init__(self, kernel: int):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(F.avg_pool2d(x * x, self.kernel) * (self.kernel * self.kernel))


GROUP_SORTS: dict[str, Callable[[int], nn.Module]] = {
    "sort": lambda channels: SortGroups(channels),
    "sort4": lambda channels: SortGroups(channels, 4),
    "chunk": lambda channels: ChunkMaxMin(),
    "slices": SliceMaxMin,
    "strided": lambda channels: StridedMaxMin(),
    "keepdim": KeepdimMinMax,
}


# ----------------------------------------------------------------------------- networks


def _orthogonal_linear(features_in: int, features_out: int) -> nn.Linear:
    layer = nn.Linear(features_in, features_out)
    nn.init.orthogonal_(layer.weight)
    return layer


def plain_dense(group_sort: str, seed: int = 0) -> nn.Module:
    """Flatten, orthogonal Linear(784, 32), GroupSort, Linear(32, 32), GroupSort, Linear(32, 10)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), _orthogonal_linear(784, 32), GROUP_SORTS[group_sort](32),
                         _orthogonal_linear(32, 32), GROUP_SORTS[group_sort](32), _orthogonal_linear(32, 10))


def plain_conv_pool(pool: str, seed: int = 0) -> nn.Module:
    """Conv2d(1, 4, 3), chunk MaxMin, an l2-norm pool of 2x2 windows (`lppool` or `sqrt`), Linear."""
    torch.manual_seed(seed)
    pooling = nn.LPPool2d(2, 2) if pool == "lppool" else SqrtAvgPoolOfSquares(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ChunkMaxMin(), pooling, nn.Flatten(),
                         _orthogonal_linear(4 * 14 * 14, 10))


def torchlip_conv(seed: int = 0) -> nn.Module:
    """deel-torchlip: SpectralConv2d, GroupSort2, ScaledL2NormPool2d (twice), Flatten,
    SpectralLinear, GroupSort(4), SpectralLinear, FullSort, SpectralLinear; in its Sequential."""
    import deel.torchlip as tl

    torch.manual_seed(seed)
    return tl.Sequential(
        tl.SpectralConv2d(1, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2),
        tl.SpectralConv2d(4, 8, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2), nn.Flatten(),
        tl.SpectralLinear(8 * 7 * 7, 16), tl.GroupSort(4), tl.SpectralLinear(16, 16), tl.FullSort(),
        tl.SpectralLinear(16, 10))


def torchlip_scaled(seed: int = 0) -> nn.Module:
    """deel-torchlip layers with `k_coef_lip` != 1 (their outputs are multiplied by it), in a plain
    Sequential (torchlip's own Sequential resets its children's coefficients)."""
    import deel.torchlip as tl

    torch.manual_seed(seed)
    return nn.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1, k_coef_lip=2.0), tl.GroupSort2(k_coef_lip=1.5),
                         tl.ScaledL2NormPool2d(2, k_coef_lip=3.0), nn.Flatten(), tl.SpectralLinear(4 * 14 * 14, 10))


def torchlip_conv_vanilla(seed: int = 0) -> nn.Module:
    """`torchlip_conv(seed).vanilla_export()`: plain Conv2d/Linear, LPPool2d, torchlip's GroupSorts."""
    return torchlip_conv(seed).eval().vanilla_export()


def orthogonium_conv(seed: int = 0) -> nn.Module:
    """orthogonium: AdaptiveOrthoConv2d (1->4, 3x3, stride 1: a FastBlockConv2d), MaxMin,
    AdaptiveOrthoConv2d (4->8, 2x2, stride 2: an RKOConv2d), MaxMin, Flatten, OrthoLinear."""
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear

    torch.manual_seed(seed)
    return nn.Sequential(AdaptiveOrthoConv2d(1, 4, 3), MaxMin(), AdaptiveOrthoConv2d(4, 8, 2, stride=2, padding=0),
                         MaxMin(), nn.Flatten(), OrthoLinear(8 * 14 * 14, 10))


def orthogonium_dense(seed: int = 0) -> nn.Module:
    """orthogonium: Flatten, OrthoLinear(784, 64), MaxMin, OrthoLinear(64, 32), MaxMin, OrthoLinear(32, 10)."""
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear

    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), OrthoLinear(784, 64), MaxMin(), OrthoLinear(64, 32), MaxMin(),
                         OrthoLinear(32, 10))


def orthogonium_sll_aol(seed: int = 0) -> nn.Module:
    """orthogonium's rescaled layers: AOLConv2D (1->4), an SLL residual block, MaxMin, an RKO
    AdaptiveOrthoConv2d (4x4, stride 4), Flatten, OrthoLinear."""
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.conv.AOL import AOLConv2D
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock
    from orthogonium.layers.custom_activations import MaxMin
    from orthogonium.layers.linear import OrthoLinear

    torch.manual_seed(seed)
    return nn.Sequential(AOLConv2D(1, 4, 3, padding=1), SDPBasedLipschitzResBlock(4, 1), MaxMin(),
                         AdaptiveOrthoConv2d(4, 4, 4, stride=4, padding=0), nn.Flatten(), OrthoLinear(4 * 7 * 7, 10))


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "torchlip_conv": torchlip_conv,
    "torchlip_conv_vanilla": torchlip_conv_vanilla,
    "torchlip_scaled": torchlip_scaled,
    "orthogonium_conv": orthogonium_conv,
    "orthogonium_dense": orthogonium_dense,
    "orthogonium_sll_aol": orthogonium_sll_aol,
    **{f"plain_dense_{name}": (lambda name=name: plain_dense(name)) for name in GROUP_SORTS},
    "plain_conv_lppool": lambda: plain_conv_pool("lppool"),
}


# ----------------------------------------------------------------------------- true layer norms


def _pool_taps(kernel: int | Sequence[int]) -> int:
    return kernel * kernel if isinstance(kernel, int) else math.prod(kernel)


def known_norm(module: nn.Module, norm: str) -> float | None:
    """The exact Lipschitz constant of a non-affine layer of these networks, or None.

    GroupSort/MaxMin/FullSort/sort (any writing): 1 in every lp norm (piecewise permutations).
    l2-norm pool with disjoint windows of k taps (`LPPool2d(2, kernel)`, torchlip's
    `ScaledL2NormPool2d` times its `k_coef_lip`): 1 in l2 (reverse triangle inequality per window),
    sqrt(k) in linf (attained by a constant window). SLL residual block `x - 2 K^T relu(K x + b)`
    with `||K||_2 <= 1` (AOL-rescaled K): its Jacobian `I - 2 K^T D K`, 0 <= D <= I, is symmetric
    with eigenvalues in [-1, 1], so 1 in l2 (Araujo et al., ICLR 2023, Thm 3); no exact linf value."""
    import deel.torchlip as tl
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzResBlock
    from orthogonium.layers.custom_activations import MaxMin

    scale = float(getattr(module, "_coefficient_lip", 1.0))  # torchlip's k_coef_lip multiplies the output
    sorts = (tl.GroupSort, MaxMin, SortGroups, ChunkMaxMin, SliceMaxMin, StridedMaxMin, KeepdimMinMax)
    if isinstance(module, sorts + (nn.Flatten,)):
        return scale
    if isinstance(module, (nn.LPPool2d, SqrtAvgPoolOfSquares)):
        kernel = module.kernel_size if isinstance(module, nn.LPPool2d) else module.kernel
        return scale * (1.0 if norm == "l2" else math.sqrt(_pool_taps(kernel)))
    if isinstance(module, SDPBasedLipschitzResBlock):
        return 1.0 if norm == "l2" else None
    return None


def affine_matrix(layer: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """The matrix (outputs x inputs, float64) of an affine layer's linear part, from the layer's
    own forward in eval mode: `layer(e_j) - layer(0)` for every basis vector e_j. Checks affinity
    (`layer(2x) - layer(0) == 2 (layer(x) - layer(0))` for a random x)."""
    dimension = math.prod(input_shape)
    reference = next(layer.parameters())
    with torch.no_grad():
        basis = torch.eye(dimension, dtype=reference.dtype).reshape(dimension, *input_shape)
        origin = layer(torch.zeros(1, *input_shape, dtype=reference.dtype))
        matrix = (layer(basis) - origin).reshape(dimension, -1).T.double()
        x = torch.rand(1, *input_shape, dtype=reference.dtype, generator=torch.Generator().manual_seed(0))
        twice, once = layer(2 * x) - origin, layer(x) - origin
    torch.testing.assert_close(twice, 2 * once, rtol=1e-4, atol=1e-5, msg=f"{type(layer).__name__} is not affine")
    return matrix


def matrix_norm(matrix: torch.Tensor, norm: str) -> float:
    """Operator norm of a matrix: l2 its largest singular value, linf its largest absolute row sum."""
    if norm == "l2":
        return float(torch.linalg.matrix_norm(matrix, ord=2))
    return float(matrix.abs().sum(dim=1).max())


def true_layer_norms(network: nn.Sequential, norm: str) -> list[tuple[str, float]]:
    """(layer type, exact operator norm) of each layer of a flat Sequential, in eval mode, on the
    shapes the layers see for 1x28x28 inputs."""
    network = network.eval()
    shape: tuple[int, ...] = INPUT_SHAPE
    norms = []
    for layer in network:
        value = known_norm(layer, norm)
        if value is None:
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                raise ValueError(f"no exact {norm} norm for {type(layer).__name__}")
            value = matrix_norm(affine_matrix(layer, shape), norm)
        norms.append((type(layer).__name__, value))
        with torch.no_grad():
            shape = tuple(layer(torch.zeros(1, *shape, dtype=next(network.parameters()).dtype)).shape[1:])
    return norms
