"""Certified radii of the mixed classifier (paper section "Certified robustness": Lemma 1, Theorems 1 and 2).

All radii are in the attack norm, in [0,1]-pixel units at the model input (the models take [0,1]
pixels and normalise internally). A radius `r > 0` for sample x means: for every perturbation
`||delta|| <= r` (strictly: `< r` at the boundary) the mixture `h_alpha` (eq. 4) predicts the
robust model's class `argmax h(x)` (Lemma 1). Radius 0 means "no certificate".

Soundness conventions (all functions):
- arithmetic in float64 with outward rounding: every +, -, *, / is correctly rounded (IEEE 754),
  so the exact result lies between the neighbours of the computed one, and each step takes the
  neighbour towards the safe side (`_down`, `_up`); `1 - alpha` is exact for alpha in [1/2, 1];
  `ndtri` values are widened by `NDTRI_RELATIVE_ERROR`. The result is a lower bound of the exact
  real-number radius of the given (float) inputs. It is then shrunk by `ROUNDING_MARGIN` and
  converted to the input's floating dtype rounding towards zero, so no step enlarges a radius;
- NaN anywhere in a sample's inputs gives radius 0 for that sample;
- alpha < 1/2 gives radius 0 (Lemma 1: nothing can be certified);
- ties give radius 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mixclf_ros.core.mixing import Alpha, validate_alpha

NORMS = ("l2", "linf")

ROUNDING_MARGIN = 1e-12
"""Relative amount by which every float64 radius is shrunk before it is returned (extra slack on
top of the outward rounding)."""

NDTRI_RELATIVE_ERROR = 1e-13
"""Stated relative error bound of float64 `torch.special.ndtri` (Cephes algorithm, documented peak
relative error below 5e-16; this is 200 times that, and a test checks it against mpmath)."""


def _down(value: torch.Tensor) -> torch.Tensor:
    """The next float below `value` (a lower bound of the exact result of the last rounded op)."""
    return torch.nextafter(value, torch.full_like(value, -math.inf))


def _up(value: torch.Tensor) -> torch.Tensor:
    """The next float above `value`."""
    return torch.nextafter(value, torch.full_like(value, math.inf))


def float32_toward_zero(value: float) -> float:
    """`value` rounded to a float32 towards zero (never to nearest), returned as a Python float.

    For publishing radii in float32 message fields: the float32 assigned is then exactly this
    value, never larger in magnitude. NaN stays NaN; values beyond the float32 range become the
    largest float32 (infinities stay infinite).
    """
    value = float(value)
    if not math.isfinite(value):
        return value
    single = np.float32(value) if abs(value) <= float(np.finfo(np.float32).max) else \
        np.float32(math.copysign(float(np.finfo(np.float32).max), value))
    if abs(float(single)) > abs(value):
        single = np.nextafter(single, np.float32(0.0))
    return float(single)


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def softmax_lipschitz_factor(norm: str) -> float:
    """Lipschitz constant of one softmax probability `p_i(z)` w.r.t. the logits z, in `norm`.

    The gradient is `grad_z p_i = p_i (e_i - p)`, so
      - l2:   `||grad p_i||_2^2 = p_i^2 ((1 - p_i)^2 + sum_{j!=i} p_j^2)
                                <= p_i^2 ((1 - p_i)^2 + (1 - p_i)^2)`
              (since `sum_{j!=i} p_j^2 <= (sum_{j!=i} p_j)^2 = (1 - p_i)^2`), hence
              `||grad p_i||_2 <= sqrt(2) p_i (1 - p_i) <= sqrt(2)/4`;
      - linf: logits measured in `||.||_inf`, the Lipschitz constant is the dual (l1) norm of the
              gradient: `||grad p_i||_1 = p_i (1 - p_i) + p_i sum_{j!=i} p_j = 2 p_i (1 - p_i)
              <= 1/2` (maximum at p_i = 1/2, attained in the limit, so 1/2 is tight).

    Combined with an operator-norm bound `L` of the logits (`norm` -> `norm`, see
    `lipschitz.logit_lipschitz_bound`), `factor * L` is the per-class constant `Lip_p(h_i)` of the
    probability outputs used by Theorem 1.
    """
    _check_norm(norm)
    return math.sqrt(2.0) / 4.0 if norm == "l2" else 0.5


def smoothed_lipschitz_constant(sigma: float) -> float:
    """l2 Lipschitz constant `sqrt(2 / (pi sigma^2))` of each output of a Gaussian-smoothed model.

    For `h(x) = E[hbar(x + xi)]`, `xi ~ N(0, sigma^2 I)` and `hbar` valued in [0, 1] (the paper,
    after Theorem 1). Units: per unit of l2 distance in [0,1]-pixel space. Lets Theorem 1 be
    applied to a smoothed robust model (with sound bounds on `h`, see `smoothing.Smooth`).
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    return math.sqrt(2.0 / (math.pi * sigma * sigma))


def _alpha_tensor(alpha: Alpha, batch: int, device: torch.device) -> torch.Tensor:
    alpha = validate_alpha(alpha)
    if isinstance(alpha, torch.Tensor):
        alpha64 = alpha.detach().to(device=device, dtype=torch.float64)
        if alpha64.dim() == 0:
            return alpha64.expand(batch)
        if alpha64.shape != (batch,):
            raise ValueError(f"per-sample alpha must have shape ({batch},), got {tuple(alpha64.shape)}")
        return alpha64
    return torch.full((batch,), alpha, dtype=torch.float64, device=device)


def _output_dtype(*tensors: torch.Tensor) -> torch.dtype:
    for tensor in tensors:
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return torch.float32


def _finish_radius(radius: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Zero where invalid/NaN/non-positive; convert to `dtype` rounding towards zero."""
    radius = torch.where(valid & (radius > 0), radius * (1.0 - ROUNDING_MARGIN), torch.zeros_like(radius))
    radius = torch.nan_to_num(radius, nan=0.0, posinf=math.inf, neginf=0.0)
    converted = radius.to(dtype)
    if dtype != torch.float64:
        too_big = converted.to(torch.float64) > radius
        converted = torch.where(too_big, torch.nextafter(converted, torch.zeros_like(converted)), converted)
    return converted


def lipschitz_radius(probs_h: torch.Tensor, lipschitz: float | torch.Tensor, alpha: Alpha,
                     probability_error: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Certified radius of the mixture for a Lipschitz robust model, Theorem 1.

        r = min_{i != y} [alpha (h_y - h_i - 2 e) + alpha - 1] / [alpha (Lip(h_y) + Lip(h_i))],
        y = argmax_i h_i(x),

    clipped at 0 (non-positive = no certificate; alpha < 1/2 always gives 0). `e` is a bound on
    the floating-point error of `probs_h` (|computed - exact| <= e for every class): Theorem 1 is
    applied to the worst exact probabilities consistent with the computed ones (h_y lowered and h_i
    raised by e), so a positive radius also proves that the exact h has the same top class.

    Args:
        probs_h: (N, C) probability outputs of the robust model h at x.
        lipschitz: Lipschitz constant(s) of the probability outputs w.r.t. the model input, in the
            attack norm (l2 or linf, [0,1]-pixel units): a number for all classes, or a (C,)
            tensor `Lip(h_i)`. E.g. `lipschitz.probability_lipschitz_bound(...)`, or
            `smoothed_lipschitz_constant(sigma)` for a smoothed model (l2).
        alpha: weight of h in the mixture, a number or an (N,) tensor.
        probability_error: e >= 0, a number or an (N,) tensor (e.g. from
            `forward_error.robust_probabilities`). 0 takes `probs_h` as exact.

    Returns:
        (N,) radii in the same norm as `lipschitz`, [0,1]-pixel units, dtype of `probs_h`, never
        above the exact real-number value of the formula at these inputs (outward rounding).
        `inf` where the margin is positive and both constants are 0 (a constant model).
    """
    if probs_h.dim() != 2 or probs_h.shape[1] < 2:
        raise ValueError(f"probs_h must have shape (N, C) with C >= 2, got {tuple(probs_h.shape)}")
    num_samples, num_classes = probs_h.shape
    device = probs_h.device
    probs = probs_h.detach().to(torch.float64)
    lip = torch.as_tensor(lipschitz.detach() if isinstance(lipschitz, torch.Tensor) else lipschitz,
                          dtype=torch.float64, device=device)
    if lip.dim() == 0:
        lip = lip.expand(num_classes)
    if lip.shape != (num_classes,):
        raise ValueError(f"lipschitz must be a number or a ({num_classes},) tensor, got {tuple(lip.shape)}")
    if bool((lip < 0).any()) or bool(torch.isnan(lip).any()):
        raise ValueError("Lipschitz constants must be non-negative")
    error = torch.as_tensor(probability_error.detach() if isinstance(probability_error, torch.Tensor)
                            else probability_error, dtype=torch.float64, device=device)
    if error.dim() == 0:
        error = error.expand(num_samples)
    if error.shape != (num_samples,) or bool((error < 0).any()) or bool(torch.isnan(error).any()):
        raise ValueError(f"probability_error must be a non-negative number or an ({num_samples},) tensor")
    alpha = _alpha_tensor(alpha, num_samples, device)

    top = probs.argmax(dim=1)
    p_top = probs.gather(1, top[:, None])
    lip_top = lip[top][:, None]
    a = alpha[:, None]
    with torch.no_grad():
        # Lower bound of the numerator, upper bound of the denominator, lower bound of the quotient.
        gap = _down(_down(p_top - probs) - 2.0 * error[:, None])
        numerator = _down(_down(a * gap) - (1.0 - a))
        constants = lip_top + lip[None, :]  # 0 only if both constants are 0 (non-negative terms)
        denominator = torch.where(constants == 0, constants, _up(a * _up(constants)))
        per_class = numerator / denominator
        per_class = torch.where(torch.isfinite(per_class) & (per_class > 0), _down(per_class), per_class)
        # Overflow with positive constants: the largest float, not inf (reserved for constant models).
        per_class = torch.where((per_class == math.inf) & (constants > 0),
                                torch.full_like(per_class, torch.finfo(torch.float64).max), per_class)
        # 0/0 (zero margin at alpha = 1 with zero constants) certifies nothing.
        per_class = torch.where(torch.isnan(per_class), torch.full_like(per_class, -math.inf), per_class)
        per_class.scatter_(1, top[:, None], math.inf)
        radius = per_class.min(dim=1).values
    valid = (alpha >= 0.5) & torch.isfinite(probs).all(dim=1) & torch.isfinite(error)
    return _finish_radius(radius, valid, _output_dtype(probs_h))


def smoothing_radius(p_lower: torch.Tensor, p_upper: torch.Tensor, sigma: float | torch.Tensor,
                     alpha: Alpha) -> torch.Tensor:
    """Certified l2 radius of the mixture for a randomized-smoothing robust model, Theorem 2.

        r = (sigma / 2) (Phi^-1(alpha p_lower) - Phi^-1(alpha p_upper + 1 - alpha))

    with `p_lower <= h_y(x)` a lower bound of the top class's smoothed probability and
    `p_upper >= max_{i != y} h_i(x)` an upper bound of the other classes'. Sound because
    `Phi^-1(alpha h_y(.))` and `Phi^-1(alpha h_i(.) + 1 - alpha)` are smoothings of [0,1]-valued
    functions and hence `1/sigma`-Lipschitz in l2, and `Phi^-1` is increasing. Clipped at 0;
    alpha < 1/2 gives 0.

    Args:
        p_lower: (N,) lower confidence bounds of `h_y(x)`.
        p_upper: (N,) upper confidence bounds of `max_{i != y} h_i(x)`.
        sigma: noise standard deviation in [0,1]-pixel units (number or (N,) tensor), > 0.
        alpha: weight of h in the mixture, a number or an (N,) tensor.

    Returns:
        (N,) l2 radii in [0,1]-pixel units at the model input, dtype of `p_lower`. With
        confidence bounds valid with probability 1 - beta, the radius holds with that probability.
    """
    if p_lower.dim() != 1 or p_upper.shape != p_lower.shape:
        raise ValueError(f"p_lower and p_upper must both have shape (N,), got {tuple(p_lower.shape)} "
                         f"and {tuple(p_upper.shape)}")
    num_samples = p_lower.shape[0]
    device = p_lower.device
    sigma64 = torch.as_tensor(sigma.detach() if isinstance(sigma, torch.Tensor) else sigma,
                              dtype=torch.float64, device=device)
    if bool((sigma64 <= 0).any()) or not bool(torch.isfinite(sigma64).all()):
        raise ValueError("sigma must be positive and finite")
    alpha = _alpha_tensor(alpha, num_samples, device)
    lower = p_lower.detach().to(torch.float64).clamp(max=1.0)
    upper = p_upper.detach().to(torch.float64).clamp(min=0.0)
    with torch.no_grad():
        # Written as alpha p + (1 - alpha), never (alpha p + 1) - alpha, which would cancel a tiny
        # p_upper to 0 (and an infinite radius). Outward rounding of each argument and of each
        # ndtri value (`NDTRI_RELATIVE_ERROR`), then of the difference and the product.
        # ndtri(<=0) = -inf, ndtri(>=1) = +inf: both give a non-positive radius, i.e. 0.
        lower_arg = _down(alpha * lower).clamp(min=0.0)
        upper_arg = _up(_up(alpha * upper) + (1.0 - alpha)).clamp(max=1.0)
        lower_value = torch.special.ndtri(lower_arg)
        upper_value = torch.special.ndtri(upper_arg)
        lower_value = _down(lower_value - _up(NDTRI_RELATIVE_ERROR * lower_value.abs()))
        upper_value = _up(upper_value + _up(NDTRI_RELATIVE_ERROR * upper_value.abs()))
        gap = _down(lower_value - upper_value)
        product = sigma64 * gap
        radius = 0.5 * torch.where(torch.isfinite(product) & (product > 0), _down(product), product)
    valid = (alpha >= 0.5) & ~torch.isnan(p_lower) & ~torch.isnan(p_upper)
    return _finish_radius(radius, valid, _output_dtype(p_lower, p_upper))


def max_lipschitz_radius(lipschitz: float | torch.Tensor, alpha: Alpha, num_classes: int) -> float:
    """The largest radius Theorem 1 can ever certify for this robust model and alpha: the radius at
    the best possible robust output, a one-hot `h(x)` (top-1 margin 1), maximised over the class y.

    With one constant L for all classes this is `(2 alpha - 1) / (2 alpha L)`. No frame gets a
    larger `lipschitz_radius`, so a `safe` threshold above it can never be met.

    Args:
        lipschitz: as in `lipschitz_radius` (a number, or a (num_classes,) tensor).
        alpha: weight of h in the mixture (a number).
        num_classes: C >= 2.

    Returns:
        float64 radius (rounded like `lipschitz_radius`), in the norm and units of `lipschitz`.
    """
    best_outputs = torch.eye(num_classes, dtype=torch.float64)
    return float(lipschitz_radius(best_outputs, lipschitz, alpha).max())
