"""Empirical LOWER bounds of Lipschitz constants, by searching for large local slopes.

Any local gradient norm is a lower bound of the Lipschitz constant, so a declared (or computed)
constant below what these searches find is wrong. Used by tests against the sound upper bounds of
`lipschitz`, and at model-load time to check declared constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixclf_ros.core.layer_bounds import check_norm


def jacobian_norm_lower_bound(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, norm: str,
                              iters: int = 30) -> float:
    """An empirical LOWER bound of the Lipschitz constant (for tests): the largest local operator
    norm `||J(x_n)||_{norm -> norm}` of the logits' Jacobian over the batch x.

    linf: exact, `max_i ||grad z_i(x_n)||_1` (one backward pass per class). l2: the larger of the
    largest row norm `max_i ||grad z_i||_2` and a power-iteration estimate `||J v|| / ||v||`, both
    of which are <= sigma_max(J). Requires samples to be processed independently (eval mode).
    """
    check_norm(norm)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
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


def probability_gradient_norm_search(model: nn.Module, norm: str, input_shape: Sequence[int], points: int = 8,
                                     steps: int = 4, step_size: float = 0.05, seed: int = 0) -> float:
    """Largest `||grad_x softmax(model(x))_i||_dual` found (dual of `norm`: l2 -> l2, linf -> l1),
    a LOWER bound of the probability outputs' per-class Lipschitz constant `Lip_norm(h_i)` in
    [0,1]-pixel units (the constant Theorem 1 uses).

    Search: `points` uniform random inputs in [0,1] (deterministic `seed`), then `steps` signed
    ascent steps of size `step_size` on the gradient norm of each point's steepest class (double
    backward for that class only), clipped to [0,1]. Runs in the model's dtype and device; the
    model should be in eval mode.
    """
    check_norm(norm)
    reference = next(iter(model.parameters()), None)
    dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((points, *input_shape), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    dual = 2 if norm == "l2" else 1
    best = 0.0
    for step in range(steps + 1):
        gradients, classes = top_class_probability_gradients(model, x)
        slopes = gradients.flatten(2).norm(p=dual, dim=2)  # (points, k)
        best = max(best, float(slopes.max()))
        if step == steps:
            break
        steepest = classes.gather(1, slopes.argmax(dim=1, keepdim=True)).squeeze(1)
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            chosen = torch.softmax(model(x), dim=1).gather(1, steepest[:, None]).sum()
            (gradient,) = torch.autograd.grad(chosen, x, create_graph=True)
            slope = gradient.flatten(1).norm(p=dual, dim=1).sum()
            ascent = torch.autograd.grad(slope, x)[0] if slope.requires_grad else torch.zeros_like(x)
        x = (x.detach() + step_size * ascent.sign()).clamp(0.0, 1.0)
    return best
