"""Small layers that the model zoo uses and that `mixclf_ros.core.lipschitz` knows how to bound.

Every layer here has a known Lipschitz constant (stated in its docstring). `lipschitz.logit_lipschitz_bound`
bounds `Normalize` and `GroupSort` as whole layers (from their buffers) and traces through `Residual`
(its add is bounded like any other add in a traced graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _as_channel_tensor(values: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() == 0:
        raise ValueError(f"{name} must have at least one value")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} must be finite, got {tensor.tolist()}")
    return tensor


class Normalize(nn.Module):
    """`(x - mean) / std` per channel, for inputs of shape (N, C, ...) with pixels in [0, 1].

    Putting the normalisation inside the model keeps every radius in [0,1]-pixel units at the
    model input. Lipschitz constant (any lp norm, the map is diagonal): `max_c 1 / |std_c|`.
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        super().__init__()
        mean_tensor = _as_channel_tensor(mean, "mean")
        std_tensor = _as_channel_tensor(std, "std")
        if mean_tensor.numel() != std_tensor.numel():
            raise ValueError(f"mean has {mean_tensor.numel()} values but std has {std_tensor.numel()}")
        if (std_tensor == 0).any():
            raise ValueError("std must be non-zero")
        self.register_buffer("mean", mean_tensor)
        self.register_buffer("std", std_tensor)

    def _view(self, tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shape = [1, tensor.numel()] + [1] * (x.dim() - 2)
        return tensor.to(dtype=x.dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.mean.numel():
            raise ValueError(
                f"Normalize expects (N, {self.mean.numel()}, ...) inputs, got shape {tuple(x.shape)}")
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def lipschitz_constant(self) -> float:
        """Exact Lipschitz constant in every lp norm: `max_c 1/|std_c|`."""
        return float((1.0 / self.std.double().abs()).max())

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Residual(nn.Module):
    """`x + block(x)`. Lipschitz constant at most `1 + Lip(block)` (triangle inequality), any norm."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class GroupSort(nn.Module):
    """Sorts contiguous groups of `group_size` channels (dim 1) in ascending order.

    `group_size=2` is MaxMin. The map is piecewise a coordinate permutation and continuous, hence
    1-Lipschitz in every lp norm (lp norms are permutation invariant).
    """

    def __init__(self, group_size: int = 2):
        super().__init__()
        if group_size < 1:
            raise ValueError("group_size must be >= 1")
        self.group_size = int(group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels % self.group_size != 0:
            raise ValueError(f"{channels} channels are not divisible by group_size {self.group_size}")
        grouped = x.reshape(x.shape[0], channels // self.group_size, self.group_size, *x.shape[2:])
        return grouped.sort(dim=2).values.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def _aol_scales(gram_abs_row_sums: torch.Tensor) -> torch.Tensor:
    # the tiny floor keeps an all-zero column finite; its scale multiplies zeros
    return gram_abs_row_sums.clamp_min(1e-12).rsqrt()


class AOLRescale(nn.Module):
    """AOL parametrization (Prach & Lampert 2022, "Almost-Orthogonal Layers", Theorem 1) of a
    Linear or Conv2d weight: `W D` with `D_ii = (sum_j |W^T W|_ij)^(-1/2)`, which makes the layer's
    l2 operator norm at most 1 (units: those of the layer's input and output). A wide matrix
    (fewer rows than columns) is rescaled by rows instead, `D W` with D from `W W^T` (the theorem
    applied to `W^T`, whose norm is W's): the same guarantee from the smaller gram.

    For a convolution, `W^T W` is the convolution of the kernel with its transpose (all spatial
    offsets summed), which bounds the stride-1 convolution under any zero or circular padding. With
    `patches=True` (stride equal to kernel size, no padding, so that windows never overlap) the
    kernel is the dense map of one window, and the dense rule applies: a tighter scale.
    Register with `torch.nn.utils.parametrize.register_parametrization(layer, "weight", AOLRescale())`;
    the bound engine bounds the weights it computes, frozen at load (`core.tracing.freeze_parametrizations`).
    """

    def __init__(self, patches: bool = False):
        super().__init__()
        self.patches = bool(patches)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2 or self.patches:
            matrix = weight.reshape(weight.shape[0], -1)
            if matrix.shape[0] < matrix.shape[1]:  # wide: the rows' gram is the small one, ||D W|| = ||W^T D||
                return (matrix * _aol_scales((matrix @ matrix.T).abs().sum(1)).unsqueeze(1)).reshape(weight.shape)
            return (matrix * _aol_scales((matrix.T @ matrix).abs().sum(1))).reshape(weight.shape)
        if weight.dim() != 4:
            raise ValueError(f"AOLRescale expects a Linear or Conv2d weight, got shape {tuple(weight.shape)}")
        kernel = weight.transpose(0, 1)  # (in, out, k, k): the gram kernel is sum_out K_out,i * K_out,j
        gram = torch.nn.functional.conv2d(kernel, kernel, padding=(weight.shape[2] - 1, weight.shape[3] - 1))
        scales = _aol_scales(gram.abs().sum((1, 2, 3)))
        return weight * scales.view(1, -1, 1, 1)


class MaxMin(nn.Module):
    """MaxMin on channel halves (dim 1): `cat(max(a, b), min(a, b))` for `a, b = x.chunk(2, 1)`.

    Each output pair is a permutation of an input pair, so the map is 1-Lipschitz in every lp norm
    and norm preserving in l2 (Anil et al. 2019); the same function class as `GroupSort(2)` up to
    a fixed permutation of channels, cheaper to train (no sort). Needs an even channel count.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)
