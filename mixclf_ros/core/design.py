"""The design space the paper compares (the paper's eq. 1-3), for research and evaluation only.

Locally biased smoothing, eq. 1 (unnormalised) and eq. 3 (normalised, eq. 2 is R_i = ||grad g_i||):

    eq. 1:  smo_i(x) = g_i(x) + gamma R_i(x) h_i(x)
    eq. 3:  smo_i(x) = (g_i(x) + gamma R_i(x) h_i(x)) / (1 + gamma R_i(x))

with the trust term R_i in
    "one":               1
    "grad_g_i":          ||grad_x g_i(x)||_p*
    "grad_max_g":        ||grad_x max_j g_j(x)||_p*
    "grad_g_i_grad_h_i": ||grad_x g_i(x)||_p* ||grad_x h_i(x)||_p*
where p* is the dual of the attack norm (linf -> l1, l2 -> l2), and g, h are either the two
models' logits (space "logits") or their softmax probabilities followed by a natural log of the
result (space "probabilities"). Gradients are taken of g_i, h_i in the chosen space, w.r.t. the
[0,1]-pixel input. "probabilities" with R = 1 and the normalised form is eq. 4 with
alpha = gamma / (1 + gamma).

The outputs are scores usable as logits by attacks: when x requires grad the gradient norms are
computed with create_graph=True so attacks differentiate through them too.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core.certify import NORMS
from mixclf_ros.core.mixing import validate_alpha

TRUST_TERMS = ("one", "grad_g_i", "grad_max_g", "grad_g_i_grad_h_i")
SPACES = ("logits", "probabilities")


def dual_norm_order(norm: str) -> float:
    """Order p* of the dual norm of the attack norm: linf -> 1, l2 -> 2."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return 1.0 if norm == "linf" else 2.0


def gamma_from_alpha(alpha: float) -> float:
    """The paper's reparameterisation alpha = gamma / (1 + gamma), inverted (alpha < 1)."""
    alpha = float(validate_alpha(alpha))
    if alpha == 1.0:
        return math.inf
    return alpha / (1.0 - alpha)


def _gradient_norms(outputs: torch.Tensor, x: torch.Tensor, order: float, create_graph: bool) -> torch.Tensor:
    """(N, K) dual norms of grad_x outputs[:, k], one backward pass per column. Valid per sample
    because the models process samples independently (eval mode)."""
    norms = []
    for k in range(outputs.shape[1]):
        (grad,) = torch.autograd.grad(outputs[:, k].sum(), x, create_graph=create_graph, retain_graph=True)
        norms.append(grad.flatten(1).norm(p=order, dim=1))
    return torch.stack(norms, dim=1)


def smoothed_outputs(g_model: nn.Module, h_model: nn.Module, x: torch.Tensor, gamma: float,
                     trust: str = "one", space: str = "probabilities", norm: str = "linf",
                     normalized: bool = True) -> torch.Tensor:
    """(N, C) scores of eq. 3 (normalized=True) or eq. 1 (normalized=False), usable as logits.

    Args:
        g_model, h_model: standard and robust models, [0,1] pixels -> logits.
        x: (N, C, H, W) inputs in [0, 1]. If it requires grad, the result is differentiable
            w.r.t. it, through the gradient norms as well (create_graph=True).
        gamma: weight of h, >= 0 (finite).
        trust: R_i, one of TRUST_TERMS. space: "logits" or "probabilities" (then log of eq. 3).
        norm: attack norm; gradient norms use its dual p*.
    """
    if trust not in TRUST_TERMS:
        raise ValueError(f"trust must be one of {TRUST_TERMS}, got {trust!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    order = dual_norm_order(norm)
    needs_gradients = trust != "one"
    if needs_gradients and torch.is_inference_mode_enabled():
        raise RuntimeError("gradient-based trust terms need autograd: not under torch.inference_mode()")
    keep_graph = x.requires_grad
    x_in = x if keep_graph or not needs_gradients else x.detach().requires_grad_(True)
    context = torch.enable_grad() if needs_gradients else nullcontext()
    with context:
        logits_g, logits_h = g_model(x_in), h_model(x_in)
        if space == "probabilities":
            out_g, out_h = torch.softmax(logits_g, dim=1), torch.softmax(logits_h, dim=1)
        else:
            out_g, out_h = logits_g, logits_h
        if trust == "one":
            trust_term = torch.ones_like(out_g)
        elif trust == "grad_g_i":
            trust_term = _gradient_norms(out_g, x_in, order, keep_graph)
        elif trust == "grad_max_g":
            trust_term = _gradient_norms(out_g.max(dim=1, keepdim=True).values, x_in, order, keep_graph)
            trust_term = trust_term.expand_as(out_g)
        else:
            trust_term = (_gradient_norms(out_g, x_in, order, keep_graph)
                          * _gradient_norms(out_h, x_in, order, keep_graph))
        weight = gamma * trust_term
        if space == "logits":
            scores = logits_g + weight * logits_h
            if normalized:
                scores = scores / (1.0 + weight)
        else:
            # log(g_i + w_i h_i) in log space; w_i = 0 falls back to log g_i without touching log(0).
            positive = weight > 0
            safe_weight = torch.where(positive, weight, torch.ones_like(weight))
            log_g, log_h = F.log_softmax(logits_g, dim=1), F.log_softmax(logits_h, dim=1)
            scores = torch.where(positive, torch.logaddexp(log_g, torch.log(safe_weight) + log_h), log_g)
            if normalized:
                scores = scores - torch.log1p(weight)
    return scores if keep_graph else scores.detach()


class SmoothedClassifier(nn.Module):
    """`smoothed_outputs` as a module (forward(x) -> (N, C) scores), for attacks and evaluation."""

    def __init__(self, standard: nn.Module, robust: nn.Module, gamma: float, trust: str = "one",
                 space: str = "probabilities", norm: str = "linf", normalized: bool = True):
        super().__init__()
        self.standard = standard
        self.robust = robust
        self.gamma = gamma
        self.trust = trust
        self.space = space
        self.norm = norm
        self.normalized = normalized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smoothed_outputs(self.standard, self.robust, x, self.gamma, self.trust, self.space,
                                self.norm, self.normalized)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, trust={self.trust!r}, space={self.space!r}, norm={self.norm!r}, "
                f"normalized={self.normalized}")
