"""Gaussian randomized smoothing with sound Monte Carlo bounds (Theorem 2 of the paper; the
sampling protocol of Cohen et al. 2019, "Certified adversarial robustness via randomized
smoothing").

The smoothed robust model is `h(x) = E[softmax(base(x + xi))]`, `xi ~ N(0, sigma^2 I)`, in
[0,1]-pixel units. `Smooth.certify` estimates it with two independent sets of noise samples: n0
samples choose the class y, n fresh samples bound `h_y(x)` from below and every other `h_i(x)`
from above. All c one-sided bounds hold jointly with probability >= 1 - beta, per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy import stats
from torch import nn

from mixclf_ros.core.certify import smoothing_radius
from mixclf_ros.core.mixing import Alpha
from mixclf_ros.core.numerics import FLOAT64_UNIT_ROUNDOFF, gamma

BOUNDS = ("bernstein", "hoeffding")

QUANTILE_RELATIVE_ERROR = 1e-10
"""Stated relative error bound of scipy's Beta quantile (accurate to about 1e-15 in practice)."""


# ----------------------------------------------------------------------------- confidence bounds


def hoeffding_width(n: int, delta: float) -> float:
    """One-sided Hoeffding deviation for the mean of n i.i.d. [0,1] variables:
    `P(E Z > mean + w) <= delta` with `w = sqrt(ln(1/delta) / (2n))` (and symmetrically below)."""
    return math.sqrt(math.log(1.0 / delta) / (2.0 * n))


def bernstein_width(sample_variance: torch.Tensor, n: int, delta: float) -> torch.Tensor:
    """One-sided empirical Bernstein deviation (Maurer & Pontil 2009, Theorem 4) for the mean of
    n >= 2 i.i.d. [0,1] variables with unbiased sample variance V_n:
    `P(E Z > mean + sqrt(2 V_n ln(2/delta) / n) + 7 ln(2/delta) / (3 (n - 1))) <= delta`.
    Applied to 1 - Z it gives the lower bound with the same width."""
    if n < 2:
        raise ValueError("the empirical Bernstein bound needs n >= 2")
    log_term = math.log(2.0 / delta)
    return torch.sqrt(2.0 * sample_variance.clamp_min(0.0) * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))


def clopper_pearson_lower(successes: torch.Tensor, trials: int, beta: float) -> torch.Tensor:
    """One-sided Clopper-Pearson lower bound p_L with `P(p < p_L) <= beta` (Beta quantile)."""
    k = successes.detach().cpu().double().numpy()
    bound = stats.beta.ppf(beta, k, trials - k + 1)
    bound[k == 0] = 0.0
    return torch.as_tensor(bound, dtype=torch.float64, device=successes.device).nan_to_num(0.0)


def clopper_pearson_upper(successes: torch.Tensor, trials: int, beta: float) -> torch.Tensor:
    """One-sided Clopper-Pearson upper bound p_U with `P(p > p_U) <= beta` (Beta quantile)."""
    k = successes.detach().cpu().double().numpy()
    bound = stats.beta.ppf(1.0 - beta, k + 1, trials - k)
    bound[k == trials] = 1.0
    return torch.as_tensor(bound, dtype=torch.float64, device=successes.device).nan_to_num(1.0)


def best_case_bounds(n: int, beta: float, num_classes: int, bound: str = "bernstein") -> tuple[float, float]:
    """(p_lower, p_upper) that `Smooth.certify` derives when every one of the n estimation samples
    gives the top class probability 1 (the best possible Monte Carlo outcome): the widths at zero
    sample variance, with the same union bound (beta / num_classes per one-sided bound). For
    `bound="hard"` (`Smooth.certify_hard`), the Clopper-Pearson bound of n votes out of n. No frame
    gets tighter bounds, hence no larger Theorem 2 radius."""
    if bound == "hard":
        p_lower = float(clopper_pearson_lower(torch.tensor([float(n)]), n, beta)[0])
        return p_lower, 1.0 - p_lower
    delta = beta / num_classes
    if bound == "hoeffding":
        width = hoeffding_width(n, delta)
    elif bound == "bernstein":
        width = float(bernstein_width(torch.zeros(()), n, delta))
    else:
        raise ValueError(f"bound must be one of {BOUNDS + ('hard',)}, got {bound!r}")
    p_lower = min(max(1.0 - width, 0.0), 1.0)
    return p_lower, min(width, 1.0 - p_lower)


def max_smoothing_radius(sigma: float, n: int, beta: float, alpha: Alpha, num_classes: int,
                         bound: str = "bernstein") -> float:
    """The largest l2 radius (Theorem 2, [0,1]-pixel units at the model input) a smoothing
    certificate with these settings can ever give: `smoothing_radius` at `best_case_bounds`."""
    p_lower, p_upper = best_case_bounds(n, beta, num_classes, bound)
    radius = smoothing_radius(torch.tensor([p_lower], dtype=torch.float64),
                              torch.tensor([p_upper], dtype=torch.float64), sigma, float(alpha))
    return float(radius[0])


# ----------------------------------------------------------------------------- certificates


@dataclass
class SmoothingCertificate:
    """Per-image certificate for a batch (all tensors have leading dimension N).

    predicted_class: (N,) int64, the certified class y of the smoothed robust model, -1 = abstain.
    p_lower: (N,) float64 lower confidence bound of h_y(x).
    p_upper: (N,) float64 upper confidence bound of max_{i != y} h_i(x).
    radius: (N,) float64 l2 radius (Theorem 2) in [0,1]-pixel units at the model input; 0 when
        abstaining. Holds with probability >= 1 - beta for each image.
    probs: (N, C) float64 estimate of h(x) from the n estimation samples (an estimate, not a bound).
    selection_probs: (N, C) float64 estimate from the n0 selection samples (they chose y).
    selected_class: (N,) int64 argmax of selection_probs (y before abstention).
    """

    predicted_class: torch.Tensor
    p_lower: torch.Tensor
    p_upper: torch.Tensor
    radius: torch.Tensor
    probs: torch.Tensor
    selection_probs: torch.Tensor
    selected_class: torch.Tensor


class Smooth:
    """Gaussian smoothing of `base_model` ([0,1] pixels (N, C, H, W) -> logits (N, num_classes)).

    `sigma` is the noise standard deviation in [0,1]-pixel units. The base model is used as given
    (put it in eval mode yourself). Noise is drawn with the optional `torch.Generator`, which must
    live on the device of the inputs.
    """

    def __init__(self, base_model: nn.Module, num_classes: int, sigma: float):
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        self.base_model = base_model
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)

    def _sample(self, x: torch.Tensor, n: int, batch_size: int, generator: torch.Generator | None,
                want_votes: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sums over n noise samples per image of softmax outputs and of their squares, (N, C)
        float64 each, and optionally hard-vote counts (N, C) int64."""
        if n < 1 or batch_size < 1:
            raise ValueError("n and batch_size must be >= 1")
        num_images = x.shape[0]
        sums = torch.zeros(num_images, self.num_classes, dtype=torch.float64, device=x.device)
        square_sums = torch.zeros_like(sums)
        votes = (torch.zeros(num_images, self.num_classes, dtype=torch.int64, device=x.device)
                 if want_votes else None)
        total = num_images * n
        with torch.inference_mode():
            # Rows of the virtual (image, sample) grid are processed in chunks that may span
            # several images, so small n still fills large batches.
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                image_index = torch.arange(start, stop, device=x.device) // n
                clean = x[image_index]
                noise = torch.randn(clean.shape, generator=generator, device=x.device, dtype=x.dtype)
                logits = self.base_model(clean + self.sigma * noise)
                if logits.shape != (stop - start, self.num_classes):
                    raise ValueError(f"base model returned shape {tuple(logits.shape)}, expected "
                                     f"({stop - start}, {self.num_classes})")
                probs = torch.softmax(logits.to(torch.float64), dim=1)
                sums.index_add_(0, image_index, probs)
                square_sums.index_add_(0, image_index, probs * probs)
                if votes is not None:
                    votes.index_add_(0, image_index, nn.functional.one_hot(
                        logits.argmax(dim=1), self.num_classes))
        # Cloned outside inference mode: callers get ordinary tensors they may modify in place.
        return sums.clone(), square_sums.clone(), votes.clone() if votes is not None else None

    def predict_probs(self, x: torch.Tensor, n: int, batch_size: int = 1000,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Monte Carlo estimate of h(x): (N, num_classes) float64 mean of softmax(base(x + noise))
        over n samples per image. An estimate, not a bound."""
        sums, _, _ = self._sample(x, n, batch_size, generator)
        return sums / n

    def certify(self, x: torch.Tensor, n0: int, n: int, beta: float, batch_size: int = 1000,
                alpha: Alpha = 1.0, generator: torch.Generator | None = None,
                bound: str = "bernstein") -> SmoothingCertificate:
        """Certifies each image of the batch x (N, C, H, W) for the mixture with weight alpha.

        1. y = argmax of the mean softmax over n0 noise samples (selection).
        2. Over n fresh samples: a lower bound of h_y and upper bounds of every h_i, i != y, for
           [0,1]-valued soft outputs, with `bound` = "bernstein" (empirical Bernstein, Maurer &
           Pontil) or "hoeffding". Union bound: each of the c one-sided bounds gets failure
           probability beta / c, so all hold jointly with probability >= 1 - beta (per image).
           p_upper = min(max_{i != y} upper_i, 1 - p_lower): valid on the same event since the
           outputs sum to 1.
        3. radius = certify.smoothing_radius(p_lower, p_upper, sigma, alpha) (Theorem 2);
           class -1 and radius 0 where the radius is 0 (bounds do not separate, or alpha < 1/2).
        """
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        if bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
        if n0 < 1 or n < 2:
            raise ValueError("need n0 >= 1 and n >= 2")
        selection_sums, _, _ = self._sample(x, n0, batch_size, generator)
        selection_probs = selection_sums / n0
        selected = selection_probs.argmax(dim=1)

        sums, square_sums, _ = self._sample(x, n, batch_size, generator)
        means = sums / n
        delta = beta / self.num_classes
        # Float64 rounding, bounded and added outwards: the sums of n terms in [0, 1] (any order)
        # and the division put `means` within gamma_{n+1} of the exact mean of the computed
        # outputs; the variance's rounding is added to it before the square root; the widths'
        # own (few-ulp) rounding is covered by a relative 1e-12.
        rounding = gamma(n + 1, FLOAT64_UNIT_ROUNDOFF) * means.abs() + 2.0 ** -1074
        if bound == "hoeffding":
            width = torch.full_like(means, hoeffding_width(n, delta))
        else:
            variance = (square_sums - n * means * means) / (n - 1)
            variance = variance + gamma(n + 4, FLOAT64_UNIT_ROUNDOFF) * (square_sums + n * means * means) / (n - 1)
            width = bernstein_width(variance, n, delta)
        width = width * (1.0 + 1e-12) + rounding
        lower_all = torch.nextafter(means - width, torch.full_like(means, -math.inf)).clamp(0.0, 1.0)
        upper_all = torch.nextafter(means + width, torch.full_like(means, math.inf)).clamp(0.0, 1.0)
        p_lower = lower_all.gather(1, selected[:, None]).squeeze(1)
        others = upper_all.scatter(1, selected[:, None], -math.inf)
        p_upper = torch.minimum(others.max(dim=1).values,
                                torch.nextafter(1.0 - p_lower, torch.full_like(p_lower, 2.0)).clamp(max=1.0))
        return self._finish(selected, p_lower, p_upper, alpha, means, selection_probs)

    def certify_hard(self, x: torch.Tensor, n0: int, n: int, beta: float, batch_size: int = 1000,
                     alpha: Alpha = 1.0, generator: torch.Generator | None = None) -> SmoothingCertificate:
        """Like `certify` for the hard-vote smoothed classifier h_i(x) = P(argmax base(x + xi) = i)
        (Cohen et al.): Clopper-Pearson lower bound of h_y at level beta, and p_upper = 1 - p_lower
        (valid on the same event because the vote probabilities sum to 1). Theorem 2 applies with
        the one-hot base classifier. `probs` / `selection_probs` hold vote frequencies."""
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        _, _, selection_votes = self._sample(x, n0, batch_size, generator, want_votes=True)
        selected = selection_votes.argmax(dim=1)
        _, _, votes = self._sample(x, n, batch_size, generator, want_votes=True)
        p_lower = clopper_pearson_lower(votes.gather(1, selected[:, None]).squeeze(1), n, beta)
        p_lower = p_lower * (1.0 - QUANTILE_RELATIVE_ERROR)
        p_upper = torch.nextafter(1.0 - p_lower, torch.full_like(p_lower, 2.0)).clamp(max=1.0)
        return self._finish(selected, p_lower, p_upper, alpha, votes.double() / n,
                            selection_votes.double() / n0)

    def _finish(self, selected: torch.Tensor, p_lower: torch.Tensor, p_upper: torch.Tensor, alpha: Alpha,
                probs: torch.Tensor, selection_probs: torch.Tensor) -> SmoothingCertificate:
        radius = smoothing_radius(p_lower, p_upper, self.sigma, alpha)
        certified = radius > 0
        return SmoothingCertificate(
            predicted_class=torch.where(certified, selected, torch.full_like(selected, -1)),
            p_lower=p_lower,
            p_upper=p_upper,
            radius=torch.where(certified, radius, torch.zeros_like(radius)),
            probs=probs,
            selection_probs=selection_probs,
            selected_class=selected,
        )
