"""Tests of the certified radii (Theorem 1, Theorem 2) and the softmax Lipschitz factor."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mixclf_ros.core import certify
from mixclf_ros.core.mixing import mix_log_probs


def probs(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- softmax factor


def test_softmax_factor_values_and_tightness():
    assert certify.softmax_lipschitz_factor("l2") == pytest.approx(math.sqrt(2) / 4)
    assert certify.softmax_lipschitz_factor("linf") == 0.5
    with pytest.raises(ValueError):
        certify.softmax_lipschitz_factor("l1")
    # Attained at z = (0, 0): grad p_1 = (1/4, -1/4).
    z = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.softmax(z, 0)[0], z)
    assert grad.norm(p=2).item() == pytest.approx(math.sqrt(2) / 4)
    assert grad.norm(p=1).item() == pytest.approx(0.5)


def test_softmax_factor_bounds_gradients_and_differences():
    generator = torch.Generator().manual_seed(0)
    z = (torch.randn(400, 6, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    p = torch.softmax(z, 1)
    for i in range(6):
        (grad,) = torch.autograd.grad(p[:, i].sum(), z, retain_graph=True)
        assert grad.norm(p=2, dim=1).max() <= certify.softmax_lipschitz_factor("l2") + 1e-12
        assert grad.norm(p=1, dim=1).max() <= certify.softmax_lipschitz_factor("linf") + 1e-12
    z2 = z.detach() + torch.randn(400, 6, generator=generator, dtype=torch.float64)
    diff = (torch.softmax(z2, 1) - p.detach()).abs()
    dz = z2 - z.detach()
    assert (diff <= certify.softmax_lipschitz_factor("l2") * dz.norm(dim=1, keepdim=True) + 1e-12).all()
    assert (diff <= 0.5 * dz.abs().amax(dim=1, keepdim=True) + 1e-12).all()


def test_smoothed_lipschitz_constant():
    assert certify.smoothed_lipschitz_constant(0.5) == pytest.approx(math.sqrt(2 / (math.pi * 0.25)))
    with pytest.raises(ValueError):
        certify.smoothed_lipschitz_constant(0.0)


# ----------------------------------------------------------------------------- Theorem 1


def test_lipschitz_radius_hand_computed():
    p = probs([0.7, 0.2, 0.1])
    # alpha = 1: (0.7 - 0.2) / (0.05 + 0.05) = 5
    assert certify.lipschitz_radius(p, 0.05, 1.0).item() == pytest.approx(5.0)
    # alpha = 0.75: (0.75 * 0.5 - 0.25) / (0.75 * 0.1) = 5/3
    assert certify.lipschitz_radius(p, 0.05, 0.75).item() == pytest.approx(5 / 3)
    # alpha = 0.5: 0.5 * 0.5 - 0.5 < 0
    assert certify.lipschitz_radius(p, 0.05, 0.5).item() == 0.0
    # alpha < 1/2: nothing, even with a maximal margin.
    assert certify.lipschitz_radius(probs([1.0, 0.0, 0.0]), 0.05, 0.49).item() == 0.0
    assert certify.lipschitz_radius(probs([1.0, 0.0, 0.0]), 0.05, 0.5).item() == 0.0
    assert certify.lipschitz_radius(probs([1.0, 0.0, 0.0]), 0.05, 0.51).item() > 0


def test_lipschitz_radius_per_class_constants_take_the_minimum_over_all_classes():
    p = probs([0.6, 0.3, 0.1])
    lip = torch.tensor([0.1, 0.01, 1.0])
    # i=1: 0.3 / 0.11 = 2.73; i=2: 0.5 / 1.1 = 0.4545 -> the third class binds, not the runner-up.
    assert certify.lipschitz_radius(p, lip, 1.0).item() == pytest.approx(0.5 / 1.1)
    with pytest.raises(ValueError):
        certify.lipschitz_radius(p, torch.tensor([0.1, 0.2]), 1.0)
    with pytest.raises(ValueError):
        certify.lipschitz_radius(p, -1.0, 1.0)


def test_lipschitz_radius_alpha_one_is_the_usual_margin_radius():
    generator = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(50, 7, generator=generator) * 3, 1)
    top2 = p.double().topk(2, dim=1).values
    expected = (top2[:, 0] - top2[:, 1]) / (2 * 0.3)
    torch.testing.assert_close(certify.lipschitz_radius(p, 0.3, 1.0).double(), expected, rtol=1e-6, atol=1e-7)


def test_lipschitz_radius_ties_nan_zero_constants_and_per_sample_alpha():
    p = probs([0.4, 0.4, 0.2], [math.nan, 0.5, 0.5], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05])
    radius = certify.lipschitz_radius(p, 0.1, torch.tensor([1.0, 1.0, 0.3, 0.8]))
    assert radius[0] == 0 and radius[1] == 0 and radius[2] == 0 and radius[3] > 0
    assert certify.lipschitz_radius(probs([0.9, 0.1]), 0.0, 1.0).item() == math.inf  # constant model
    assert certify.lipschitz_radius(probs([0.5, 0.5]), 0.0, 1.0).item() == 0.0
    with pytest.raises(ValueError):
        certify.lipschitz_radius(p, 0.1, 1.5)


def test_lipschitz_radius_float32_is_rounded_down():
    generator = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(2000, 10, generator=generator) * 4, 1)
    radius32 = certify.lipschitz_radius(p, 0.37, 0.9)
    radius64 = certify.lipschitz_radius(p.double(), 0.37, 0.9)
    assert radius32.dtype == torch.float32 and radius64.dtype == torch.float64
    assert (radius32.double() <= radius64).all()
    torch.testing.assert_close(radius32.double(), radius64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [0.55, 0.6, 0.8, 1.0])
def test_theorem1_is_tight_against_the_worst_case_perturbation(alpha):
    """The worst case allowed by the Lipschitz assumption: h_y falls by Lip_y t, a class i rises by
    Lip_i t, and g puts all its mass on i. The mixture still predicts y for every i just inside the
    radius, and not for the binding class just outside it."""
    generator = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(300, 5, generator=generator, dtype=torch.float64) * 3, 1)
    lip = torch.rand(5, generator=generator, dtype=torch.float64) * 0.5 + 0.05
    radius = certify.lipschitz_radius(p, lip, alpha)
    certified = (radius > 0).nonzero().flatten()
    assert len(certified) > 10
    y = p.argmax(1)

    def mixture_gap(n: int, i: int, t: float) -> float:
        """mixture_y - mixture_i after the worst-case move of size t."""
        return float(alpha * (p[n, y[n]] - lip[y[n]] * t) - ((1 - alpha) + alpha * (p[n, i] + lip[i] * t)))

    for n in certified.tolist():
        r = radius[n].item()
        others = [i for i in range(5) if i != y[n]]
        assert all(mixture_gap(n, i, r * (1 - 1e-9)) > 0 for i in others)
        assert min(mixture_gap(n, i, r * (1 + 1e-6)) for i in others) < 0


@st.composite
def probability_batches(draw):
    rows, classes = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale
    other = torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale
    return logits.to(dtype), other.to(dtype)


@settings(max_examples=150, deadline=None)
@given(probability_batches(), st.floats(0.0, 1.0), st.floats(1e-3, 10.0))
def test_property_lipschitz_radius(batch, alpha, lip):
    logits_h, logits_g = batch
    p = torch.softmax(logits_h, 1)
    radius = certify.lipschitz_radius(p, lip, alpha)
    assert radius.shape == (len(p),) and radius.dtype == p.dtype
    assert (radius >= 0).all() and not torch.isnan(radius).any()
    if alpha < 0.5:
        assert (radius == 0).all()
    # Monotone in alpha (the required margin (1 - alpha) / alpha shrinks as alpha grows).
    assert (certify.lipschitz_radius(p, lip, min(1.0, alpha + 0.1)) >= radius).all()
    # Lemma 1 at delta = 0: a positive radius means the mixture predicts h's class, for any g.
    mixture = mix_log_probs(logits_g, torch.log(p.clamp_min(1e-300)), alpha)
    certified = radius > 0
    assert torch.equal(mixture.argmax(1)[certified], p.argmax(1)[certified])


# ----------------------------------------------------------------------------- Theorem 2


def test_smoothing_radius_hand_computed():
    def radius(lower, upper, sigma, alpha):
        return certify.smoothing_radius(torch.tensor([lower], dtype=torch.float64),
                                        torch.tensor([upper], dtype=torch.float64), sigma, alpha).item()

    ppf = stats.norm.ppf
    assert radius(0.9, 0.1, 0.5, 1.0) == pytest.approx(0.25 * (ppf(0.9) - ppf(0.1)), rel=1e-12)
    assert radius(0.9, 0.1, 0.5, 1.0) == pytest.approx(0.6407757827723, rel=1e-10)
    assert radius(0.9, 0.1, 0.5, 0.75) == pytest.approx(0.25 * (ppf(0.675) - ppf(0.325)), rel=1e-12)
    assert radius(0.9, 0.05, 0.25, 0.6) == pytest.approx(0.125 * (ppf(0.54) - ppf(0.43)), rel=1e-12)
    assert radius(0.99, 0.01, 0.5, 0.49) == 0.0  # alpha < 1/2
    assert radius(0.5, 0.5, 0.5, 1.0) == 0.0  # tie
    assert radius(0.4, 0.5, 0.5, 1.0) == 0.0  # bounds do not separate
    assert radius(0.9, 0.1, 0.5, 0.5) == 0.0  # ppf(0.45) - ppf(0.55) < 0
    # Bounds of exactly 1 and 0: huge but finite (arguments are rounded one ulp outwards).
    assert 10 < radius(1.0, 0.0, 0.5, 1.0) < math.inf
    # A tiny p_upper must not cancel to 0 in alpha p + 1 - alpha (which would give an infinite radius).
    assert radius(2.2250738585e-313, 2.2250738585072014e-308, 1.0, 1.0) == 0.0
    assert radius(0.9, 1e-17, 1.0, 1.0) == pytest.approx(0.5 * (ppf(0.9) - ppf(1e-17)), rel=1e-9)
    assert radius(1.0, 1.0, 0.5, 1.0) == 0.0
    assert radius(math.nan, 0.1, 0.5, 1.0) == 0.0
    with pytest.raises(ValueError):
        radius(0.9, 0.1, 0.0, 1.0)
    with pytest.raises(ValueError):
        certify.smoothing_radius(torch.ones(2), torch.zeros(3), 0.5, 1.0)


@pytest.mark.parametrize("alpha", [0.5, 0.6, 0.8, 1.0])
def test_theorem2_holds_for_a_smoothed_halfspace(alpha):
    """Two classes, base classifier 1[w.x > b]: h_1(x) = Phi((w.x - b) / (sigma ||w||)) exactly.
    Moving against w (the worst direction) by less than the radius keeps h_y - h_i >= (1-alpha)/alpha
    (Lemma 1's margin); at alpha = 1 the radius is exact: sigma Phi^-1(p)."""
    sigma = 0.4
    for p in (0.55, 0.7, 0.9, 0.99, 0.999):
        radius = certify.smoothing_radius(torch.tensor([p], dtype=torch.float64),
                                          torch.tensor([1 - p], dtype=torch.float64), sigma, alpha).item()
        if radius == 0:
            continue
        h_y_after = stats.norm.cdf(stats.norm.ppf(p) - radius * (1 - 1e-9) / sigma)
        assert h_y_after - (1 - h_y_after) >= (1 - alpha) / alpha - 1e-12
        if alpha == 1.0:
            assert radius == pytest.approx(sigma * stats.norm.ppf(p), rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=8),
       st.floats(0.0, 1.0), st.floats(0.01, 2.0), st.sampled_from([torch.float32, torch.float64]))
def test_property_smoothing_radius(pairs, alpha, sigma, dtype):
    lower = torch.tensor([a for a, _ in pairs], dtype=dtype)
    upper = torch.tensor([b for _, b in pairs], dtype=dtype)
    radius = certify.smoothing_radius(lower, upper, sigma, alpha)
    assert radius.shape == lower.shape and radius.dtype == dtype
    assert (radius >= 0).all() and not torch.isnan(radius).any()
    if alpha < 0.5:
        assert (radius == 0).all()
    # Positive radius requires alpha p_lower > alpha p_upper + 1 - alpha, hence p_lower > p_upper.
    assert (lower[radius > 0] > upper[radius > 0]).all()
    # Rounded towards zero: never above the float64 value.
    exact = certify.smoothing_radius(lower.double(), upper.double(), sigma, alpha)
    assert (radius.double() <= exact).all()
