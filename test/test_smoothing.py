"""Tests of randomized smoothing: Monte Carlo estimates, confidence bounds and certificates.

The statistical tests use synthetic base models whose smoothed outputs are known exactly: the
model reads back the Gaussian noise added to a constant image and turns it into softmax outputs
with a chosen distribution. Each image of a batch is an independent repetition, so one certify
call gives thousands of repetitions. A violation count is accepted up to the 1 - 1e-6 quantile of
Binomial(repetitions, beta): a sound bound fails this with probability < 1e-6 (and the seeds are
fixed), while an unsound one (checked by a negative control) exceeds it by far.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from mixclf_ros.core import certify, smoothing
from mixclf_ros.core.smoothing import Smooth

CENTER = 0.5


def violation_threshold(repetitions: int, beta: float) -> int:
    return int(stats.binom.ppf(1 - 1e-6, repetitions, beta))


class NoiseReader(nn.Module):
    """Base model for images equal to CENTER everywhere: z = (input - CENTER) / sigma is the
    standard normal noise, U = Phi(z) is uniform, and the softmax outputs are a fixed function of U."""

    def __init__(self, sigma: float, kind: str):
        super().__init__()
        self.sigma, self.kind = sigma, kind

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1).double() - CENTER) / self.sigma
        u = torch.special.ndtr(z)
        if self.kind == "bernoulli":  # hard outputs: class 0 w.p. 0.55, 1 w.p. 0.3, 2 w.p. 0.15
            cls = (u[:, 0] > 0.55).long() + (u[:, 0] > 0.85).long()
            return nn.functional.one_hot(cls, 3).double()
        if self.kind == "beta":  # p0 = U0^3 (mean 1/4), p1 = (1 - p0) U1^2 (mean 1/4), p2 = rest (1/2)
            p0 = u[:, 0] ** 3
            p1 = (1 - p0) * u[:, 1] ** 2
            return torch.stack([p0, p1, 1 - p0 - p1], dim=1)
        if self.kind == "rare":  # class 0 w.p. 0.97: variance small, where Bernstein is tight
            cls = (u[:, 0] > 0.97).long() + (u[:, 0] > 0.99).long()
            return nn.functional.one_hot(cls, 3).double()
        raise ValueError(self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.probabilities(x)
        return torch.log(probs.clamp_min(1e-40)).float() if self.kind == "beta" else (60.0 * probs).float()


TRUE_MEANS = {
    "bernoulli": torch.tensor([0.55, 0.30, 0.15], dtype=torch.float64),
    "beta": torch.tensor([0.25, 0.25, 0.50], dtype=torch.float64),
    "rare": torch.tensor([0.97, 0.02, 0.01], dtype=torch.float64),
}


def constant_images(count: int, pixels: int = 2) -> torch.Tensor:
    return torch.full((count, 1, 1, pixels), CENTER)


def violations(certificate: smoothing.SmoothingCertificate, means: torch.Tensor) -> torch.Tensor:
    """Per repetition: did p_lower exceed h_y or p_upper fall below max_{i != y} h_i?"""
    y = certificate.selected_class
    true_top = means[y]
    others = means.expand(len(y), -1).clone()
    others[torch.arange(len(y)), y] = -1.0
    return (certificate.p_lower > true_top) | (certificate.p_upper < others.max(dim=1).values)


# ----------------------------------------------------------------------------- bounds


def test_hoeffding_and_bernstein_widths_values():
    assert smoothing.hoeffding_width(100, 0.05) == pytest.approx(math.sqrt(math.log(20) / 200))
    width = smoothing.bernstein_width(torch.tensor([0.25]), 100, 0.05)
    expected = math.sqrt(2 * 0.25 * math.log(40) / 100) + 7 * math.log(40) / (3 * 99)
    assert width.item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        smoothing.bernstein_width(torch.tensor([0.1]), 1, 0.05)


@pytest.mark.parametrize("p, n", [(0.5, 30), (0.05, 200), (0.98, 100)])
def test_one_sided_widths_cover_bernoulli_means(p, n):
    delta, repetitions = 0.1, 4000
    generator = torch.Generator().manual_seed(11)
    samples = (torch.rand(repetitions, n, generator=generator, dtype=torch.float64) < p).double()
    means = samples.mean(1)
    variances = samples.var(1, unbiased=True)
    threshold = violation_threshold(repetitions, delta)
    hoeffding = smoothing.hoeffding_width(n, delta)
    bernstein = smoothing.bernstein_width(variances, n, delta)
    for width in (hoeffding, bernstein):
        assert int((means + width < p).sum()) <= threshold  # upper bound below the truth
        assert int((means - width > p).sum()) <= threshold  # lower bound above the truth
    # Negative control: the harness detects a "bound" without a confidence width.
    assert int((means < p).sum()) + int((means > p).sum()) > threshold


def test_clopper_pearson_values_and_edges():
    successes = torch.tensor([0, 3, 50, 97, 100])
    lower = smoothing.clopper_pearson_lower(successes, 100, 0.01)
    upper = smoothing.clopper_pearson_upper(successes, 100, 0.01)
    assert lower[0] == 0 and upper[-1] == 1
    for k, low, high in zip(successes.tolist(), lower.tolist(), upper.tolist()):
        if k > 0:  # P(X >= k | p = low) = beta
            assert stats.binom.sf(k - 1, 100, low) == pytest.approx(0.01, rel=1e-6)
        if k < 100:  # P(X <= k | p = high) = beta
            assert stats.binom.cdf(k, 100, high) == pytest.approx(0.01, rel=1e-6)
        assert low <= k / 100 <= high


# ----------------------------------------------------------------------------- Smooth


def test_predict_probs_estimates_known_means_and_is_seedable():
    sigma = 0.3
    smooth = Smooth(NoiseReader(sigma, "beta"), 3, sigma)
    x = constant_images(40)
    estimate = smooth.predict_probs(x, n=500, batch_size=3000, generator=torch.Generator().manual_seed(0))
    assert estimate.shape == (40, 3) and estimate.dtype == torch.float64
    pooled = estimate.mean(0)  # 20000 samples: standard error < 0.004
    torch.testing.assert_close(pooled, TRUE_MEANS["beta"], rtol=0, atol=0.02)
    again = smooth.predict_probs(x, n=500, batch_size=3000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(estimate, again)
    other = smooth.predict_probs(x, n=500, batch_size=3000, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(estimate, other)


def test_batches_spanning_several_images_keep_images_apart():
    """Chunks of 7 rows mix samples of different images; each image must get only its own."""

    class ClassFromBrightness(nn.Module):
        def forward(self, x):
            brightness_class = (x.mean(dim=(1, 2, 3)) * 4).floor().long().clamp(0, 3)
            return 50.0 * nn.functional.one_hot(brightness_class, 4).float()

    images = torch.tensor([0.1, 0.6, 0.35, 0.9, 0.6]).view(5, 1, 1, 1).expand(5, 1, 3, 3).contiguous()
    smooth = Smooth(ClassFromBrightness(), 4, sigma=1e-4)
    estimate = smooth.predict_probs(images, n=5, batch_size=7)
    torch.testing.assert_close(estimate.argmax(1), torch.tensor([0, 2, 1, 3, 2]))
    torch.testing.assert_close(estimate.max(1).values, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["bernoulli", "beta", "rare"])
@pytest.mark.parametrize("bound", ["bernstein", "hoeffding"])
def test_certificate_bounds_hold_at_the_stated_confidence(kind, bound):
    sigma, beta, repetitions = 0.25, 0.2, 2000
    smooth = Smooth(NoiseReader(sigma, kind), 3, sigma)
    generator = torch.Generator().manual_seed(len(kind) * 7 + len(bound))
    certificate = smooth.certify(constant_images(repetitions), n0=10, n=100, beta=beta, batch_size=20000,
                                 generator=generator, bound=bound)
    failed = violations(certificate, TRUE_MEANS[kind])
    assert int(failed.sum()) <= violation_threshold(repetitions, beta)
    # The bounds are not vacuous.
    assert float(certificate.p_lower.mean()) > 0.0 and float(certificate.p_upper.mean()) < 1.0
    # Negative control: point estimates used as "bounds" violate far more often.
    means = certificate.probs
    y = certificate.selected_class
    naive = smoothing.SmoothingCertificate(
        predicted_class=y, p_lower=means.gather(1, y[:, None]).squeeze(1),
        p_upper=means.scatter(1, y[:, None], -1.0).max(1).values, radius=torch.zeros(repetitions),
        probs=means, selection_probs=certificate.selection_probs, selected_class=y)
    assert int(violations(naive, TRUE_MEANS[kind]).sum()) > violation_threshold(repetitions, beta)


def test_hard_certificate_bounds_hold_at_the_stated_confidence():
    sigma, beta, repetitions = 0.25, 0.2, 2000
    smooth = Smooth(NoiseReader(sigma, "bernoulli"), 3, sigma)
    certificate = smooth.certify_hard(constant_images(repetitions), n0=10, n=100, beta=beta, batch_size=20000,
                                      generator=torch.Generator().manual_seed(5))
    failed = violations(certificate, TRUE_MEANS["bernoulli"])
    assert int(failed.sum()) <= violation_threshold(repetitions, beta)
    assert float(certificate.p_lower.mean()) > 0.3


def test_certify_constant_model_exact_arithmetic():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[8.0, 0.0, 0.0]]).expand(len(x), 3)

    sigma, n, beta = 0.5, 1000, 0.001
    smooth = Smooth(Constant(), 3, sigma)
    x = torch.rand(4, 1, 2, 2)
    certificate = smooth.certify(x, n0=10, n=n, beta=beta, batch_size=256, alpha=0.8)
    p0 = torch.softmax(torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64), 0)
    width = smoothing.bernstein_width(torch.zeros(1, dtype=torch.float64), n, beta / 3)
    expected_lower = p0[0] - width
    # The bounds are widened by a bound of their float64 rounding (at zero variance its square
    # root dominates: about 6e-8 here), never narrowed.
    torch.testing.assert_close(certificate.p_lower, expected_lower.expand(4), rtol=0, atol=1e-7)
    assert (certificate.p_lower <= expected_lower).all()
    expected_upper = torch.minimum(p0[1] + width, 1 - expected_lower)
    torch.testing.assert_close(certificate.p_upper, expected_upper.expand(4), rtol=0, atol=1e-7)
    assert (certificate.p_upper >= expected_upper).all()
    expected_radius = certify.smoothing_radius(certificate.p_lower, certificate.p_upper, sigma, 0.8)
    assert torch.equal(certificate.radius, expected_radius) and (certificate.radius > 0).all()
    assert torch.equal(certificate.predicted_class, torch.zeros(4, dtype=torch.long))

    low_alpha = smooth.certify(x, n0=10, n=n, beta=beta, batch_size=256, alpha=0.45)
    assert (low_alpha.predicted_class == -1).all() and (low_alpha.radius == 0).all()
    assert torch.equal(low_alpha.selected_class, torch.zeros(4, dtype=torch.long))


def test_certify_abstains_when_classes_are_balanced():
    sigma = 0.25
    smooth = Smooth(NoiseReader(sigma, "beta"), 3, sigma)  # top class has mean 1/2, runner-up 1/4
    certificate = smooth.certify(constant_images(50), n0=10, n=20, beta=0.001, batch_size=5000,
                                 generator=torch.Generator().manual_seed(2))
    assert (certificate.predicted_class == -1).all() and (certificate.radius == 0).all()


def halfspace_model(w: torch.Tensor, b: float) -> nn.Module:
    class HalfSpace(nn.Module):
        def forward(self, x):
            side = (x.flatten(1).double() @ w.double() > b).long()
            return 50.0 * nn.functional.one_hot(side, 2).float()

    return HalfSpace()


@pytest.mark.parametrize("alpha", [0.6, 1.0])
@pytest.mark.parametrize("hard", [False, True])
def test_theorem2_certificate_is_sound_for_a_smoothed_halfspace(alpha, hard):
    """Base 1[w.x > b]: the smoothed h_1(x) = Phi((w.x - b) / (sigma ||w||)) is known exactly. At
    distance r (the certified radius) in the worst direction, h must still have Lemma 1's margin."""
    sigma, beta = 0.25, 0.001
    generator = torch.Generator().manual_seed(9)
    w = torch.randn(4, generator=generator, dtype=torch.float64)
    b = 0.5 * float(w.sum())
    x = torch.rand(60, 1, 2, 2, generator=generator)
    smooth = Smooth(halfspace_model(w, b), 2, sigma)
    method = smooth.certify_hard if hard else smooth.certify
    certificate = method(x, n0=50, n=2000, beta=beta, batch_size=20000, alpha=alpha, generator=generator)
    certified = certificate.predicted_class >= 0
    assert int(certified.sum()) >= 10

    def h1(points: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr((points.flatten(1).double() @ w - b) / (sigma * w.norm()))

    exact = h1(x)
    y = certificate.predicted_class[certified]
    assert torch.equal(y, (exact[certified] > 0.5).long())
    # Worst direction: towards the boundary, by the certified radius.
    direction = torch.where(y == 1, -1.0, 1.0)[:, None].double() * w / w.norm()
    moved = x[certified].flatten(1).double() + certificate.radius[certified, None] * direction
    h_y = torch.where(y == 1, h1(moved), 1 - h1(moved))
    assert (h_y - (1 - h_y) >= (1 - alpha) / alpha - 1e-9).all()


def test_validation():
    smooth = Smooth(halfspace_model(torch.ones(4), 2.0), 2, 0.25)
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError):
        smooth.certify(x, 10, 100, beta=0.0)
    with pytest.raises(ValueError):
        smooth.certify(x, 10, 100, beta=0.01, bound="chernoff")
    with pytest.raises(ValueError):
        smooth.certify(x, 10, 1, beta=0.01)
    with pytest.raises(ValueError):
        Smooth(halfspace_model(torch.ones(4), 2.0), 2, 0.0)
    with pytest.raises(ValueError):
        Smooth(halfspace_model(torch.ones(4), 2.0), 3, 0.25).predict_probs(x, 10)
