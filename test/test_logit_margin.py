"""The logit-margin radius (`certify.logit_margin_radius`: Lemma 1 through a Lipschitz bound of the
logits): never above its exact real-number value, exact where it is tight (two classes), never
certifying a move of the logits that changes the mixture, and issued by the runtime and the
evaluation where the logits' bound is computed."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixclf_ros.core import certify
from mixclf_ros.core.mixing import mix_log_probs

mpmath.mp.dps = 60


def exact_logit_radius(logits: list[float], lipschitz: float, alpha: float, norm: str,
                       error: list[float]) -> mpmath.mpf:
    """The radius formula in 60-digit arithmetic, from the float inputs taken as exact numbers."""
    z = [mpmath.mpf(v) for v in logits]
    e = [mpmath.mpf(v) for v in error]
    y = max(range(len(z)), key=lambda j: z[j])
    mu = (1 - mpmath.mpf(alpha)) / mpmath.mpf(alpha)
    if mu >= 1:
        return mpmath.mpf(0)
    worst = {j: z[j] - z[y] + e[j] + e[y] for j in range(len(z)) if j != y}
    total = sum(mpmath.exp(d) for d in worst.values())
    factor = mpmath.sqrt(2) if norm == "l2" else mpmath.mpf(2)
    radius = min((mpmath.log(1 - mu) - mpmath.log(mpmath.exp(d) + mu * total)) / (factor * mpmath.mpf(lipschitz))
                 for d in worst.values())
    return max(radius, mpmath.mpf(0))


def test_alpha_one_is_the_logit_margin_and_alpha_half_certifies_nothing():
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, -1.0]], dtype=torch.float64)
    radius = certify.logit_margin_radius(z, 0.5, 1.0, "l2")
    assert radius.tolist() == pytest.approx([2.0 / (math.sqrt(2) * 0.5), 2.0 / (math.sqrt(2) * 0.5)], rel=1e-11)
    assert (radius <= torch.tensor([2.0, 2.0], dtype=torch.float64) / (math.sqrt(2) * 0.5)).all()
    assert certify.logit_margin_radius(z, 0.5, 1.0, "linf").tolist() == pytest.approx([2.0, 2.0], rel=1e-11)
    assert (certify.logit_margin_radius(z, 0.5, 0.5, "l2") == 0).all()
    assert (certify.logit_margin_radius(z, 0.5, 0.3, "l2") == 0).all()


def test_ties_nan_infinite_error_and_bad_arguments():
    z = torch.tensor([[1.0, 1.0, 0.0], [1.0, float("nan"), 0.0], [5.0, 0.0, 0.0]])
    error = torch.tensor([0.0, 0.0, math.inf])
    assert (certify.logit_margin_radius(z, 1.0, 0.9, "l2", error) == 0).all()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            certify.logit_margin_radius(z, bad, 0.9, "l2")
    with pytest.raises(ValueError):
        certify.logit_margin_radius(z, 1.0, 0.9, "l1")
    with pytest.raises(ValueError):
        certify.logit_margin_radius(z, 1.0, 0.9, "l2", -1.0)


@st.composite
def logit_cases(draw):
    rows, classes = draw(st.integers(1, 5)), draw(st.integers(2, 8))
    scale = draw(st.sampled_from([1e-3, 0.3, 3.0, 30.0, 300.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = (torch.randn(rows, classes, generator=generator, dtype=torch.float64) * scale).to(dtype)
    error = torch.rand(rows, classes, generator=generator, dtype=torch.float64) * draw(
        st.sampled_from([0.0, 1e-12, 1e-3, 0.5]))
    return logits, error


@settings(max_examples=150, deadline=None)
@given(logit_cases(), st.floats(0.5, 1.0), st.floats(1e-3, 50.0), st.sampled_from(["l2", "linf"]))
def test_never_above_the_exact_radius_and_within_1e_9_or_1e_12_of_it(case, alpha, lipschitz, norm):
    logits, error = case
    radius = certify.logit_margin_radius(logits, lipschitz, alpha, norm, error)
    assert radius.dtype == logits.dtype and (radius >= 0).all()
    for row in range(len(logits)):
        exact = exact_logit_radius(logits[row].double().tolist(), lipschitz, alpha, norm, error[row].tolist())
        computed = mpmath.mpf(float(radius[row]))
        assert computed <= exact
        tolerance = 1e-9 if logits.dtype == torch.float64 else 1e-6
        # exp and log are widened by 1e-13 relative: up to a few 1e-13 of the log-sum, i.e. of k L r
        assert computed >= exact * (1 - tolerance) - mpmath.mpf(1e-12) / lipschitz
        if float(radius[row]) > 0:  # Lemma 1 at delta = 0, for any g: the mixture predicts h's class
            g = torch.zeros_like(logits[row:row + 1], dtype=torch.float64)
            for worst_class in range(logits.shape[1]):
                g_row = g.clone()
                g_row[0, worst_class] = 60.0
                mixed = mix_log_probs(g_row, torch.log_softmax(logits[row:row + 1].double(), 1), alpha)
                assert int(mixed.argmax(1)) == int(logits[row].argmax())


@pytest.mark.parametrize("alpha", [0.55, 0.75, 1.0])
def test_tight_for_two_classes_against_the_worst_logit_move(alpha):
    """With two classes the worst move of the logits within `L r` in l2 is `L r / sqrt(2) (-1, +1)`:
    the mixture, with g all on the other class, keeps h's class just inside the radius and loses
    it just outside."""
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(200, 2, generator=generator, dtype=torch.float64) * 4
    lipschitz = 0.7
    radius = certify.logit_margin_radius(z, lipschitz, alpha, "l2")
    certified = (radius > 0).nonzero().flatten()
    assert len(certified) > 50
    for n in certified.tolist():
        y = int(z[n].argmax())
        other = 1 - y
        g = torch.zeros(1, 2, dtype=torch.float64)
        g[0, other] = 80.0  # all of g's mass on the other class
        for scale, keeps in ((1 - 1e-9, True), (1 + 1e-6, False)):
            step = lipschitz * float(radius[n]) * scale / math.sqrt(2)
            moved = z[n:n + 1].clone()
            moved[0, y] -= step
            moved[0, other] += step
            mixed = mix_log_probs(g, torch.log_softmax(moved, 1), alpha)
            assert (int(mixed.argmax(1)) == y) == keeps


def test_no_logit_move_inside_the_radius_changes_the_mixture():
    """Projected gradient descent over logit moves `||u||_2 <= L r` (and over g's worst class)
    minimises the mixture's gap; it stays positive for many classes and alphas."""
    generator = torch.Generator().manual_seed(6)
    z = torch.randn(64, 10, generator=generator, dtype=torch.float64) * 3
    for alpha in (0.6, 0.8, 1.0):
        radius = certify.logit_margin_radius(z, 1.0, alpha, "l2")
        keep = radius > 0
        zc, rc = z[keep], radius[keep]
        y = zc.argmax(1)
        for other in range(10):
            u = (torch.randn(zc.shape, generator=generator, dtype=torch.float64) * 1e-3).requires_grad_(True)
            for _ in range(100):
                probs = torch.softmax(zc + u, 1)
                gap = alpha * (probs.gather(1, y[:, None])[:, 0] - probs[:, other]) - (1 - alpha)
                gap = torch.where(y == other, torch.ones_like(gap), gap)
                (grad,) = torch.autograd.grad(gap.sum(), u)
                with torch.no_grad():
                    u -= 0.1 * rc[:, None] * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30)
                    u *= (rc[:, None] / u.norm(dim=1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
            assert (gap.detach() > 0).all()


def test_the_float64_exp_and_log_meet_their_stated_error():
    generator = torch.Generator().manual_seed(7)
    points = torch.cat([-torch.rand(2000, generator=generator, dtype=torch.float64) * 700,
                        -torch.rand(500, generator=generator, dtype=torch.float64) * 1e-6])
    for value, computed in zip(points.tolist(), torch.exp(points).tolist()):
        exact = mpmath.exp(mpmath.mpf(value))
        assert abs(mpmath.mpf(computed) - exact) <= exact * certify.LOGARITHM_RELATIVE_ERROR
    positives = torch.exp(points) + torch.rand(len(points), generator=generator, dtype=torch.float64) * 10
    for value, computed in zip(positives.tolist(), torch.log(positives).tolist()):
        exact = mpmath.log(mpmath.mpf(value))
        assert abs(mpmath.mpf(computed) - exact) <= abs(exact) * certify.LOGARITHM_RELATIVE_ERROR


def test_the_best_radius_is_the_larger_of_both_and_needs_a_computed_bound():
    generator = torch.Generator().manual_seed(8)
    z = torch.randn(300, 10, generator=generator, dtype=torch.float64) * 5
    probs = torch.softmax(z, 1)
    probability_constant = 2.0 * certify.softmax_lipschitz_factor("l2")
    theorem1 = certify.lipschitz_radius(probs, probability_constant, 0.8)
    through_logits = certify.logit_margin_radius(z, 2.0, 0.8, "l2")
    best = certify.best_lipschitz_radius(probs, 0.0, probability_constant, 0.8, logits=z, logit_lipschitz=2.0)
    assert torch.equal(best, torch.maximum(theorem1, through_logits))
    assert (through_logits > theorem1).float().mean() > 0.5
    assert torch.equal(certify.best_lipschitz_radius(probs, 0.0, probability_constant, 0.8, logits=z), theorem1)
    assert certify.max_lipschitz_radius(probability_constant, 0.8, 10, 2.0) == math.inf
    assert certify.max_lipschitz_radius(probability_constant, 0.5, 10, 2.0) == 0.0


def test_no_ceiling_means_every_threshold_is_reachable_in_the_node():
    """With a computed logit bound the largest certifiable radius is inf at alpha > 1/2, at the model
    input and in the image: the node must not warn that no frame can be safe (it did once)."""
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
    from mixclf_ros.runtime.reachability import threshold_reachable, unreachable_warning
    from mixclf_ros.vision.preprocess import PreprocessConfig

    assert threshold_reachable(math.inf, 0.5) and not threshold_reachable(math.nan, 0.5)
    assert not threshold_reachable(0.3, 0.5) and threshold_reachable(0.3, 0.0)
    classifier = CertifiedClassifier(load_model(zoo_config("standard")), load_model(zoo_config("robust_lipschitz_gnp")),
                                     PreprocessConfig(1, 28, 28, 476, 476), torch.device("cpu"))
    settings = LiveSettings(alpha=0.6, safe_radius=0.5, safe_image_radius=5.0)
    assert classifier.max_certified_radius(settings) == math.inf
    assert classifier.max_image_radius(settings, 480, 640, "rgb") == math.inf
    assert unreachable_warning("image 640x480 rgb8", classifier.max_image_radius(settings, 480, 640, "rgb"),
                               "safe_image_radius", 5.0, "l2") == ""
    half = LiveSettings(alpha=0.5, safe_radius=0.5)
    assert classifier.max_certified_radius(half) == 0.0
    assert unreachable_warning("model input", 0.0, "safe_radius", 0.5, "l2") != ""


def test_the_logit_radius_counts_only_for_the_class_the_probabilities_name():
    """Where rounding made the softmax name another top class than the logits, the logit radius
    (which certifies the logits' class) is not used: Theorem 1's alone."""
    logits = torch.tensor([[5.0, 0.0, -1.0], [0.0, 5.0, -1.0]], dtype=torch.float64)
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.01, 0.98, 0.01]], dtype=torch.float64)  # row 0 disagrees
    theorem1 = certify.lipschitz_radius(probs, 0.5, 1.0)
    best = certify.best_lipschitz_radius(probs, 0.0, 0.5, 1.0, logits=logits, logit_lipschitz=1.0)
    assert best[0] == theorem1[0]
    assert best[1] == certify.logit_margin_radius(logits[1:], 1.0, 1.0, "l2")[0] > theorem1[1]
