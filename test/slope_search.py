"""Attack on a Lipschitz bound: the largest slope of a network that a search finds.

Every slope found is a lower bound of the true Lipschitz constant, so a sound upper bound is never
below it. Used by the Lipschitz tests (float64 models: the bound is for exact arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mixclf_ros.core.lipschitz import jacobian_norm_lower_bound


def difference_quotient_ascent(model: nn.Module, norm: str, x: torch.Tensor, steps: int = 20,
                               step_size: float = 1e-2, seed: int = 0) -> float:
    """PGD on `||f(x + d) - f(x)||_p / ||d||_p` over both x and d (signed steps); the largest
    quotient seen."""
    p = math.inf if norm == "linf" else 2
    generator = torch.Generator().manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    delta = (torch.randn(x.shape, generator=generator, dtype=x.dtype) * 1e-2).requires_grad_(True)
    best = 0.0
    for _ in range(steps):
        quotient = (model(x + delta) - model(x)).flatten(1).norm(p=p, dim=1) / delta.flatten(1).norm(p=p, dim=1)
        best = max(best, float(quotient.detach().max()))
        grad_x, grad_delta = torch.autograd.grad(quotient.sum(), (x, delta))
        with torch.no_grad():
            x += step_size * grad_x.sign()
            delta += step_size * delta.abs().mean() * grad_delta.sign()
    return best


def largest_slope(model: nn.Module, norm: str, input_shape: Sequence[int], samples: int = 64, seed: int = 0,
                  scale: float = 1.0) -> float:
    """Largest local slope found: Jacobian operator norms at random inputs in [0,1] and in a wider
    Gaussian cloud (the bound holds on all of R^d), then difference-quotient ascent."""
    generator = torch.Generator().manual_seed(seed)
    inside = torch.rand(samples, *input_shape, generator=generator, dtype=torch.float64)
    outside = torch.randn(samples, *input_shape, generator=generator, dtype=torch.float64) * 3 * scale
    found = max(jacobian_norm_lower_bound(model, inside, norm, iters=20),
                jacobian_norm_lower_bound(model, outside, norm, iters=20))
    return max(found, difference_quotient_ascent(model, norm, outside[:16], seed=seed))
