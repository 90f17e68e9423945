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


def _float64(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A number or tensor as a detached float64 tensor on `device`."""
    return torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64,
                           device=device)


def _class_table(table: torch.Tensor, name: str) -> tuple[int, int]:
    """(N, C) of an (N, C >= 2) per-class table, else ValueError naming it."""
    if table.dim() != 2 or table.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, C) with C >= 2, got {tuple(table.shape)}")
    return table.shape[0], table.shape[1]


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
    num_samples, num_classes = _class_table(probs_h, "probs_h")
    device = probs_h.device
    probs = probs_h.detach().to(torch.float64)
    lip = _float64(lipschitz, device)
    if lip.dim() == 0:
        lip = lip.expand(num_classes)
    if lip.shape != (num_classes,):
        raise ValueError(f"lipschitz must be a number or a ({num_classes},) tensor, got {tuple(lip.shape)}")
    if bool((lip < 0).any()) or bool(torch.isnan(lip).any()):
        raise ValueError("Lipschitz constants must be non-negative")
    error = _float64(probability_error, device)
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


LOGARITHM_RELATIVE_ERROR = 1e-13
"""Stated relative error bound of float64 `torch.exp` and `torch.log` (both within a few ulp,
about 4e-16; this is 200 times that, and a test checks both against mpmath)."""

LOGIT_DIFFERENCE_FACTOR = {"l2": float(np.nextafter(math.sqrt(2.0), math.inf)), "linf": 2.0}
"""`max |u_j - u_y|` over logit changes `u` with `||u|| <= 1`: sqrt(2) in l2 (rounded up), 2 in linf."""


def _widened_up(value: torch.Tensor, relative_error: float) -> torch.Tensor:
    """An upper bound of the exact value of a function computed as `value` within `relative_error`."""
    return _up(value + _up(value.abs() * relative_error))


def _widened_down(value: torch.Tensor, relative_error: float) -> torch.Tensor:
    """A lower bound of the exact value of a function computed as `value` within `relative_error`."""
    return _down(value - _up(value.abs() * relative_error))


def _exp_up(value: torch.Tensor) -> torch.Tensor:
    return _widened_up(torch.exp(value), LOGARITHM_RELATIVE_ERROR)


def _log_up(value: torch.Tensor) -> torch.Tensor:
    return _widened_up(torch.log(value), LOGARITHM_RELATIVE_ERROR)


def _log_down(value: torch.Tensor) -> torch.Tensor:
    return _widened_down(torch.log(value), LOGARITHM_RELATIVE_ERROR)


def logit_margin_radius(logits: torch.Tensor, logit_lipschitz: float, alpha: Alpha, norm: str,
                        logit_error: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Certified radius of the mixture from the robust model's logits: Lemma 1 through a Lipschitz
    bound of the logits rather than of each probability (Theorem 1).

    Lemma 1 asks `h_y(x') - h_i(x') > mu = (1 - alpha) / alpha` for all i != y on the ball. With
    `d_j = z_j - z_y` (z the logits at x) and `||z(x') - z(x)|| <= L ||x' - x||` (L the logits'
    operator norm, `lipschitz.logit_lipschitz_bound`), every `d_j` grows by at most `k L r`
    (`k = LOGIT_DIFFERENCE_FACTOR[norm]`: sqrt(2) in l2, 2 in linf), and

        h_y - h_i = (1 - exp(d_i)) / (1 + sum_{j != y} exp(d_j))

    falls as any `d_j` grows while its numerator is positive. So the condition holds on the whole
    ball if `k L r < ln(1 - mu) - ln(exp(d_i) + mu sum_{j != y} exp(d_j))` for every i != y:

        r = min_{i != y} [ln(1 - mu) - ln(exp(d_i) + mu sum_{j != y} exp(d_j))] / (k L).

    At alpha = 1 this is the logit-margin radius `min_i (z_y - z_i) / (k L)`; it never needs the
    softmax's own Lipschitz factor, so it is usually far larger than Theorem 1's. Both are sound;
    the runtime issues the larger (`best_lipschitz_radius`). alpha = 1/2 (mu = 1) certifies nothing.

    Args:
        logits: (N, C) logits of h at x (any float dtype; evaluated in float64).
        logit_lipschitz: L > 0, operator norm `norm -> norm` of the logits per [0,1] pixel at the
            model input (a sound bound; a constant declared for the probabilities is no such bound).
        alpha: weight of h in the mixture, a number or an (N,) tensor.
        norm: "l2" or "linf", the attack norm.
        logit_error: bounds of `|computed z_j - exact z_j|`: a number, (N,) or (N, C) tensor. Each
            `d_j` is taken at its worst, `d_j + e_j + e_y`, so the radius holds for the exact logits.

    Returns:
        (N,) radii in `norm`, [0,1]-pixel units, dtype of `logits`, rounded outward like
        `lipschitz_radius`; 0 where not certified, NaN inputs or alpha < 1/2.
    """
    _check_norm(norm)
    num_samples, num_classes = _class_table(logits, "logits")
    if not (logit_lipschitz > 0 and math.isfinite(logit_lipschitz)):
        raise ValueError(f"logit_lipschitz must be positive and finite, got {logit_lipschitz}")
    device = logits.device
    z = logits.detach().to(torch.float64)
    error = _float64(logit_error, device)
    if error.dim() < 2:
        error = error.reshape(-1, 1).expand(num_samples, num_classes) if error.dim() == 1 \
            else error.expand(num_samples, num_classes)
    if error.shape != (num_samples, num_classes) or bool((error < 0).any()):
        raise ValueError("logit_error must be a non-negative number, (N,) or (N, C) tensor")
    alpha = _alpha_tensor(alpha, num_samples, device)[:, None]
    with torch.no_grad():
        top = z.argmax(dim=1, keepdim=True)
        is_top = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)
        # Worst-case logit differences d_j + e_j + e_y, rounded up; -inf at y (no term).
        worst = _up(_up(_up(z - z.gather(1, top)) + error) + error.gather(1, top))
        worst = torch.where(is_top, torch.full_like(worst, -math.inf), worst)
        mu = _up((1.0 - alpha) / alpha)  # 1 - alpha is exact for alpha in [1/2, 1]
        log_mu = torch.where(mu > 0, _log_up(mu.clamp_min(torch.finfo(torch.float64).tiny)),
                             torch.full_like(mu, -math.inf))
        # ln(exp(d_i) + mu S) <= m + ln(exp(d_i - m) + exp(b - m) Q), b = ln(mu) + max_j d_j,
        # Q >= sum_j exp(d_j - max_j d_j), m = max(d_i, b): exponents <= 0, no overflow.
        largest = worst.max(dim=1, keepdim=True).values
        terms = _exp_up(_up(worst - largest))
        total = _up(_up(terms.sum(dim=1, keepdim=True)) * (1.0 + num_classes * torch.finfo(torch.float64).eps))
        shifted = _up(log_mu + largest)
        peak = torch.maximum(worst, shifted)
        inner = _up(_exp_up(_up(worst - peak)) + _up(_exp_up(_up(shifted - peak)) * total))
        log_sum = _up(peak + _log_up(inner))
        one_minus_mu = _down(1.0 - mu)
        slack = torch.where(one_minus_mu > 0, _log_down(one_minus_mu.clamp_min(torch.finfo(torch.float64).tiny)),
                            torch.full_like(mu, -math.inf))
        denominator = _up(torch.tensor(LOGIT_DIFFERENCE_FACTOR[norm], dtype=torch.float64, device=device)
                          * float(logit_lipschitz))
        per_class = _down(_down(slack - log_sum) / denominator)
        per_class = torch.where(is_top, torch.full_like(per_class, math.inf), per_class)
        radius = per_class.min(dim=1).values
    valid = (alpha[:, 0] >= 0.5) & torch.isfinite(z).all(dim=1) & torch.isfinite(error).all(dim=1)
    valid &= (z.topk(2, dim=1).values.diff(dim=1)[:, 0] < 0)  # a tie certifies nothing
    return _finish_radius(radius, valid, _output_dtype(logits))


def best_lipschitz_radius(probs: torch.Tensor, probability_error: float | torch.Tensor,
                          probability_lipschitz: float | torch.Tensor, alpha: Alpha,
                          logits: torch.Tensor | None = None, logit_error: float | torch.Tensor = 0.0,
                          logit_lipschitz: float = 0.0, norm: str = "l2") -> torch.Tensor:
    """The larger of two sound radii of a Lipschitz robust model: Theorem 1 on the probabilities
    (`lipschitz_radius`) and, where the logits and a computed bound L of their Lipschitz constant
    are given, Lemma 1 through the logits (`logit_margin_radius`). (N,) radii, dtype of `probs`."""
    radius = lipschitz_radius(probs, probability_lipschitz, alpha, probability_error=probability_error)
    if logits is None or not logit_lipschitz > 0:
        return radius
    through_logits = logit_margin_radius(logits, logit_lipschitz, alpha, norm, logit_error).to(radius.dtype)
    # both certify h's top class: where rounding made the softmax pick another one, only Theorem 1's
    same_class = logits.argmax(dim=1).to(probs.device) == probs.argmax(dim=1)
    return torch.where(same_class, torch.maximum(radius, through_logits), radius)


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
    sigma64 = _float64(sigma, device)
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
        lower_value = _widened_down(lower_value, NDTRI_RELATIVE_ERROR)
        upper_value = _widened_up(upper_value, NDTRI_RELATIVE_ERROR)
        gap = _down(lower_value - upper_value)
        product = sigma64 * gap
        radius = 0.5 * torch.where(torch.isfinite(product) & (product > 0), _down(product), product)
    valid = (alpha >= 0.5) & ~torch.isnan(p_lower) & ~torch.isnan(p_upper)
    return _finish_radius(radius, valid, _output_dtype(p_lower, p_upper))


def max_lipschitz_radius(lipschitz: float | torch.Tensor, alpha: Alpha, num_classes: int,
                         logit_lipschitz: float = 0.0) -> float:
    """The largest radius a Lipschitz robust model can ever get at this alpha, in the norm and
    units of `lipschitz`. Theorem 1 alone (`logit_lipschitz` 0): the radius at the best possible
    robust output, a one-hot `h(x)` (top-1 margin 1), maximised over the class y; with one constant
    L for all classes, `(2 alpha - 1) / (2 alpha L)`. With a computed logit bound, the logit margin
    (`logit_margin_radius`) is unbounded: inf for alpha > 1/2. No frame gets a larger
    `best_lipschitz_radius`, so a `safe` threshold above it can never be met.

    Args:
        lipschitz: as in `lipschitz_radius` (a number, or a (num_classes,) tensor).
        alpha: weight of h in the mixture (a number).
        num_classes: C >= 2.
        logit_lipschitz: as in `best_lipschitz_radius` (0: none).

    Returns:
        float64 radius (rounded like `lipschitz_radius`).
    """
    if logit_lipschitz > 0 and float(validate_alpha(alpha)) > 0.5:
        return math.inf
    best_outputs = torch.eye(num_classes, dtype=torch.float64)
    return float(lipschitz_radius(best_outputs, lipschitz, alpha).max())
