"""The certificate at the price of one pass (issue 21): the cheap per-sample l2 rounding bound, and
the switch to the componentwise bound where the cheap one would change `safe` or cost more than
`RADIUS_FRACTION` of the radius. Every radius is checked against Theorem 1 recomputed from the
same probabilities with the componentwise bound, so a radius from a bound that does not hold, or
a switch that does not happen, fails."""

from __future__ import annotations

import pytest
import torch

from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward
from mixclf_ros.core.numerics import probabilities_with_error
from mixclf_ros.models.loading import load_model, zoo_config
from mixclf_ros.runtime import lipschitz_pass
from mixclf_ros.runtime.lipschitz_pass import LipschitzPass

ALPHA = 0.6


@pytest.fixture(scope="module")
def robust():
    model = load_model(zoo_config("robust_lipschitz"))
    bounded = ErrorBoundedForward(model.network, input_shape=model.input_shape, plan=model.bound_plan)
    return model, bounded


@pytest.fixture(scope="module")
def frames():
    from mixclf_ros.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return torch.from_numpy(images[:64]).float().div(255).unsqueeze(1)


def componentwise_radius(model, bounded, x):
    logits, error = bounded(x, componentwise=True)
    probs, probability_error = probabilities_with_error(logits, error)
    return certify.lipschitz_radius(probs, model.lipschitz_constant, ALPHA, probability_error=probability_error)


def never(radii: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(radii, dtype=torch.bool)


def test_the_cheap_bound_holds_and_costs_less_than_the_stated_fraction(robust, frames):
    model, bounded = robust
    cheap_logits, cheap_error = bounded(frames, componentwise=False)
    full_logits, full_error = bounded(frames, componentwise=True)
    assert torch.equal(cheap_logits, full_logits)  # one pass computes the logits; only the bound differs
    assert (cheap_error >= full_error).all()  # the componentwise result is the smaller of both bounds
    certificate = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        _, probs, _, radius = certificate(frames, ALPHA, never)
    best = certify.lipschitz_radius(probs, model.lipschitz_constant, ALPHA)
    assert certificate.componentwise_frames == 0  # the zoo model's cheap bound is 1e-11: no frame needs more
    assert (radius <= best).all() and (radius >= (1 - lipschitz_pass.RADIUS_FRACTION) * best).all()
    assert (radius > 0).sum() > 10


def test_frames_whose_radius_the_cheap_bound_lowers_too_much_get_the_componentwise_bound(robust, frames,
                                                                                         monkeypatch):
    model, bounded = robust
    monkeypatch.setattr(lipschitz_pass, "RADIUS_FRACTION", 0.0)  # any loss at all is too much
    certificate = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        _, _, _, radius = certificate(frames, ALPHA, never)
        expected = componentwise_radius(model, bounded, frames)
    certified = int((expected > 0).sum())
    assert certificate.componentwise_frames >= certified > 10
    torch.testing.assert_close(radius, expected, rtol=0, atol=0)


def test_a_frame_whose_safe_the_cheap_bound_would_change_gets_the_componentwise_bound(robust, frames):
    model, bounded = robust
    certificate = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        cheap = certificate(frames, ALPHA, never)[3]
        tight = componentwise_radius(model, bounded, frames)
    gaps = (tight - cheap).clamp_min(0)
    frame = int(gaps.argmax())
    assert float(gaps[frame]) > 0
    threshold = float(cheap[frame] + tight[frame]) / 2  # met by the tight radius only

    def meets(radii: torch.Tensor) -> torch.Tensor:
        return radii >= threshold

    switched = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        _, _, _, radius = switched(frames, ALPHA, meets)
    assert switched.componentwise_frames >= 1
    assert float(radius[frame]) == float(tight[frame]) >= threshold


def test_with_the_logits_bound_the_radius_is_the_larger_sound_one(frames):
    """The 1-Lipschitz zoo model, whose logit bound is computed: the pass issues the logit-margin
    radius where it is larger, never above the error-free radius of the same logits, and never
    below Theorem 1 with the componentwise bound."""
    model = load_model(zoo_config("robust_lipschitz_gnp"))
    bounded = ErrorBoundedForward(model.network, input_shape=model.input_shape, plan=model.bound_plan)
    certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm)
    with torch.inference_mode():
        logits, probs, _, radius = certificate(frames, ALPHA, never)
    error_free = certify.best_lipschitz_radius(probs, 0.0, model.lipschitz_constant, ALPHA, logits=logits,
                                               logit_lipschitz=model.logit_lipschitz_constant)
    assert (radius <= error_free).all() and (radius >= (1 - lipschitz_pass.RADIUS_FRACTION) * error_free).all()
    assert (radius >= componentwise_radius(model, bounded, frames)).all()
    assert (radius > 2 * componentwise_radius(model, bounded, frames)).sum() > 10


class CheapRefused:
    """A bounded forward whose cheap domain fails, as a rule that breaks only there would."""

    def __init__(self, bounded: ErrorBoundedForward):
        self.bounded = bounded

    def __call__(self, x: torch.Tensor, componentwise: bool = True):
        if not componentwise:
            raise lipschitz_pass.UnboundedForwardError("a rule fails in the cheap domain")
        return self.bounded(x, componentwise=True)


def test_a_model_the_cheap_domain_fails_on_gets_the_componentwise_bound_on_every_frame(robust, frames):
    model, bounded = robust
    certificate = LipschitzPass(CheapRefused(bounded), model.lipschitz_constant)
    with torch.inference_mode():
        _, _, _, radius = certificate(frames, ALPHA, never)
        _, _, _, again = certificate(frames, ALPHA, never)
    assert "cheap domain" in certificate.cheap_refusal
    assert torch.equal(radius, componentwise_radius(model, bounded, frames)) and torch.equal(radius, again)
