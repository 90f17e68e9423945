"""Exact references for bound tests: the dense matrix of a linear map, and a module around a function."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def dense_matrix(function: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int]) -> torch.Tensor:
    """The matrix of a linear map of float64 tensors of shape input_shape (batch dim included)."""
    x = torch.zeros(tuple(input_shape), dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(function, x)
    return jacobian.reshape(jacobian.numel() // x.numel(), x.numel())


class Lambda(nn.Module):
    """A model whose forward is `function` (a traced forward with its own operations)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)
