"""Empirical LOWER bounds of Lipschitz constants, by searching for large local slopes.

Any local gradient norm is a lower bound of the Lipschitz constant, so a declared (or computed)
constant below what these searches find is wrong. Used by tests against the sound upper bounds of
`lipschitz`, and at model-load time to check declared constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mixclf_ros.core.certify import NORMS


def jacobian_norm_lower_bound(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, norm: str,
                              iters: int = 30) -> float:
    """An empirical LOWER bound of the Lipschitz constant (for tests): the largest local operator
    norm `||J(x_n)||_{norm -> norm}` of the logits' Jacobian over the batch x.

    linf: exact, `max_i ||grad z_i(x_n)||_1` (one backward pass per class). l2: the larger of the
    largest row norm `max_i ||grad z_i||_2` and a power-iteration estimate `||J v|| / ||v||`, both
    of which are <= sigma_max(J). Requires samples to be processed independently (eval mode).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel has forward-mode AD
        out = model(x)
        flat_out = out.reshape(out.shape[0], -1)
        row_norms = []
        for i in range(flat_out.shape[1]):
            (grad,) = torch.autograd.grad(flat_out[:, i].sum(), x, retain_graph=True)
            row_norms.append(grad.flatten(1).norm(p=1 if norm == "linf" else 2, dim=1))
        best = float(torch.stack(row_norms, dim=1).max())
        if norm == "linf":
            return best
        generator = torch.Generator(device=x.device).manual_seed(0)
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        for _ in range(iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
            _, jv = torch.func.jvp(model, (x.detach(),), (v,))
            (jtjv,) = torch.autograd.grad(out, x, grad_outputs=jv, retain_graph=True)
            estimate = jv.flatten(1).norm(dim=1)
            best = max(best, float(estimate.detach().max()))
            v = jtjv
    return best


def top_class_probability_gradients(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                                    classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `softmax(model(x))_c` for each sample's `classes` most probable classes c:
    (gradients (N, k, *x.shape[1:]), class indices (N, k)). One backward pass per rank; the other
    classes have small probabilities, hence small gradients (`grad p_c = p_c (grad z_c - sum_j p_j
    grad z_j)`)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        probabilities = torch.softmax(model(x), dim=1)
        k = min(classes, probabilities.shape[1])
        top = probabilities.detach().topk(k, dim=1).indices
        rows = [torch.autograd.grad(probabilities.gather(1, top[:, r:r + 1]).sum(), x, retain_graph=r < k - 1)[0]
                for r in range(k)]
    return torch.stack(rows, dim=1), top


def data_like_points(points: int, input_shape: Sequence[int], generator: torch.Generator,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """`points` float64 inputs in [0,1] (N, *input_shape) that look more like images than uniform
    noise does: a quarter each of uniform noise, piecewise-constant images (random 4x4 or 7x7
    blocks, upsampled), the same thresholded to black and white, and Gaussian noise around the
    per-channel `mean` with the per-channel `std` (both in [0,1]-pixel units; 0.5 and 0.25 when
    not given), clipped. Networks are often saturated on uniform noise, where slopes are small."""
    shape = tuple(input_shape)
    image = len(shape) == 3  # (C, H, W): blocks and per-channel mean/std; otherwise flat noise
    kinds = [points - 3 * (points // 4), points // 4, points // 4, points // 4]
    parts = [torch.rand((kinds[0], *shape), generator=generator, dtype=torch.float64)]
    if image:
        blocks = []
        for k in range(kinds[1] + kinds[2]):
            cells = 4 if k % 2 else 7
            low = torch.rand((1, shape[0], cells, cells), generator=generator, dtype=torch.float64)
            blocks.append(torch.nn.functional.interpolate(low, size=shape[1:], mode="nearest"))
        blocky = torch.cat(blocks) if blocks else torch.zeros((0, *shape), dtype=torch.float64)
    else:
        blocky = torch.rand((kinds[1] + kinds[2], *shape), generator=generator, dtype=torch.float64)
    parts += [blocky[:kinds[1]], (blocky[kinds[1]:] > 0.5).to(torch.float64)]
    view = (1, -1, 1, 1) if image else (1,) * (len(shape) + 1)
    centre = torch.as_tensor(list(mean) if mean is not None else [0.5], dtype=torch.float64)
    spread = torch.as_tensor(list(std) if std is not None else [0.25], dtype=torch.float64)
    centre = (centre.expand(shape[0]) if image else centre[:1]).reshape(view)
    spread = (spread.expand(shape[0]) if image else spread[:1]).reshape(view)
    noise = torch.randn((kinds[3], *shape), generator=generator, dtype=torch.float64)
    parts.append((centre + spread * noise).clamp(0.0, 1.0))
    return torch.cat(parts)


def _steepest_slopes(model: nn.Module, x: torch.Tensor, dual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point: the largest `||grad_x p_c||_dual` over its top classes, and that class."""
    gradients, classes = top_class_probability_gradients(model, x)
    slopes = gradients.flatten(2).norm(p=dual, dim=2)  # (points, k)
    best, rank = slopes.max(dim=1)
    return best.detach(), classes.gather(1, rank[:, None]).squeeze(1)


def _slope_and_ascent(model: nn.Module, x: torch.Tensor, classes: torch.Tensor,
                      dual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per point: `||grad_x p_c||_dual` for its class c, and the gradient of that norm (double
    backward; zero where the network is piecewise linear and the softmax saturated)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        chosen = torch.softmax(model(x), dim=1).gather(1, classes[:, None]).sum()
        (gradient,) = torch.autograd.grad(chosen, x, create_graph=True)
        slopes = gradient.flatten(1).norm(p=dual, dim=1)
        ascent = torch.autograd.grad(slopes.sum(), x)[0] if slopes.requires_grad else torch.zeros_like(x)
    return slopes.detach(), ascent


def probability_gradient_norm_search(model: nn.Module, norm: str, input_shape: Sequence[int], points: int = 32,
                                     steps: int = 24, step_size: float = 0.05, seed: int = 0,
                                     starts: torch.Tensor | None = None, mean: Sequence[float] | None = None,
                                     std: Sequence[float] | None = None) -> float:
    """Largest `||grad_x softmax(model(x))_i||_dual` found (dual of `norm`: l2 -> l2, linf -> l1),
    a LOWER bound of the probability outputs' per-class Lipschitz constant `Lip_norm(h_i)` in
    [0,1]-pixel units (the constant Theorem 1 uses).

    Search: `points` starting inputs in [0,1] (`data_like_points` with `mean`/`std`, deterministic
    `seed`), plus `starts` if given (e.g. real images, (N, *input_shape) in [0,1]); then `steps`
    signed ascent steps on the gradient norm of each point's steepest class (double backward for
    that class only), clipped to [0,1], with a step size per point that starts at `step_size`,
    grows 1.5x after a step that raised the slope and halves (the step undone) after one that did
    not. Scaled dot-product attention runs on its math kernel, the one with a double backward
    (the fused CPU kernels have none). Runs in the model's dtype and device; the model should be
    in eval mode.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    reference = next(iter(model.parameters()), None)
    dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    x = data_like_points(points, input_shape, generator, mean, std)
    if starts is not None:
        x = torch.cat([starts.detach().to(torch.float64).reshape(-1, *input_shape).clamp(0.0, 1.0), x])
    x = x.to(device=device, dtype=dtype)
    dual = 2 if norm == "l2" else 1
    with sdpa_kernel(SDPBackend.MATH):
        best_slopes, steepest = _steepest_slopes(model, x, dual)
        best = float(best_slopes.max())
        sizes = torch.full((x.shape[0],) + (1,) * (x.dim() - 1), step_size, dtype=dtype, device=device)
        candidate, ascent = x, torch.zeros_like(x)
        for step in range(steps + 1):
            slopes, candidate_ascent = _slope_and_ascent(model, candidate, steepest, dual)
            best = max(best, float(slopes.max()))
            better = slopes >= best_slopes if step == 0 else slopes > best_slopes
            keep = better.view(-1, *[1] * (x.dim() - 1))
            x, ascent = torch.where(keep, candidate, x), torch.where(keep, candidate_ascent, ascent)
            best_slopes = torch.where(better, slopes, best_slopes)
            if step > 0:  # a step that raised the slope grows, one that did not is undone and halved
                sizes = torch.where(keep, sizes * 1.5, sizes * 0.5)
            candidate = (x + sizes * ascent.sign()).clamp(0.0, 1.0)
        best = max(best, float(_steepest_slopes(model, x, dual)[0].max()))
    return best
