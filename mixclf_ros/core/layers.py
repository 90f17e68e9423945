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
