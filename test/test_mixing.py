"""Tests of the eq. 4 mixture (`mixing`) and the design space of eq. 1-3 (`design`)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mixclf_ros.core import design
from mixclf_ros.core.mixing import MixedClassifier, mix_log_probs, validate_alpha


def reference_mixture(logits_g: torch.Tensor, logits_h: torch.Tensor, alpha: float) -> torch.Tensor:
    """eq. 4 computed naively in float64 (fine for moderate logits)."""
    p_g = torch.softmax(logits_g.double(), dim=-1)
    p_h = torch.softmax(logits_h.double(), dim=-1)
    return torch.log((1 - alpha) * p_g + alpha * p_h)


def test_hand_computed_value():
    logits_g = torch.tensor([[1.0, 2.0, 3.0]])
    logits_h = torch.tensor([[3.0, 2.0, 1.0]])
    # softmax([1,2,3]) = e^k / (e + e^2 + e^3)
    denominator = math.e + math.e**2 + math.e**3
    p_g = [math.e / denominator, math.e**2 / denominator, math.e**3 / denominator]
    p_h = p_g[::-1]
    expected = [math.log(0.75 * a + 0.25 * b) for a, b in zip(p_g, p_h)]
    result = mix_log_probs(logits_g, logits_h, 0.25)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.tensor([expected]), rtol=1e-6, atol=1e-6)


def test_alpha_limits_are_exact():
    generator = torch.Generator().manual_seed(0)
    logits_g = torch.randn(7, 5, generator=generator) * 30
    logits_h = torch.randn(7, 5, generator=generator) * 30
    assert torch.equal(mix_log_probs(logits_g, logits_h, 0.0), torch.log_softmax(logits_g, dim=1))
    assert torch.equal(mix_log_probs(logits_g, logits_h, 1.0), torch.log_softmax(logits_h, dim=1))
    alpha = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0, 0.5, 0.9])
    mixed = mix_log_probs(logits_g, logits_h, alpha)
    assert torch.equal(mixed[0], torch.log_softmax(logits_g[0], dim=0))
    assert torch.equal(mixed[1], torch.log_softmax(logits_h[1], dim=0))
    assert torch.equal(mixed[4], torch.log_softmax(logits_g[4], dim=0))
    for row in (2, 5, 6):
        torch.testing.assert_close(mixed[row], mix_log_probs(logits_g[row:row + 1], logits_h[row:row + 1],
                                                             float(alpha[row]))[0])


def test_extreme_logits_stay_finite_with_finite_gradients():
    logits_g = torch.tensor([[200.0, 0.0, -50.0]], requires_grad=True)
    logits_h = torch.tensor([[0.0, 150.0, 0.0]], requires_grad=True)
    mixed = mix_log_probs(logits_g, logits_h, 0.7)
    assert torch.isfinite(mixed).all()
    # log(0.3 * 1 + 0.7 * e^-150) ~ log 0.3; log(0.7 * 1) for class 1; class 2 ~ log(0.7) - 150.
    expected = torch.tensor([math.log(0.3), math.log(0.7)])
    torch.testing.assert_close(mixed[0, :2], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[0, 2], torch.tensor(math.log(0.7) - 150.0), rtol=1e-6, atol=1e-4)
    mixed[0, 2].backward()
    assert torch.isfinite(logits_g.grad).all() and torch.isfinite(logits_h.grad).all()
    assert logits_h.grad.abs().sum() > 0


def test_per_sample_alpha_gradients_are_finite_at_0_and_1():
    logits_g = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logits_h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    mix_log_probs(logits_g, logits_h, alpha).sum().backward()
    assert torch.isfinite(logits_g.grad).all() and torch.isfinite(logits_h.grad).all()
    assert torch.equal(logits_h.grad[0], torch.zeros(3, dtype=torch.float64))  # alpha = 0: h unused
    assert torch.equal(logits_g.grad[1], torch.zeros(3, dtype=torch.float64))  # alpha = 1: g unused


def test_gradcheck():
    logits_g = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logits_h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mix_log_probs(a, b, 0.3), (logits_g, logits_h))
    alpha = torch.tensor([0.2, 0.6, 0.95], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: mix_log_probs(a, b, alpha), (logits_g, logits_h))


@pytest.mark.parametrize("alpha", [-0.1, 1.0001, math.nan, math.inf, "x"])
def test_invalid_alpha_raises(alpha):
    with pytest.raises(ValueError):
        mix_log_probs(torch.zeros(1, 2), torch.zeros(1, 2), alpha)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        mix_log_probs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, math.nan]))
    with pytest.raises(ValueError):
        mix_log_probs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError):
        mix_log_probs(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    assert validate_alpha(torch.tensor(0.25)) == 0.25


@st.composite
def logits_and_alpha(draw):
    rows = draw(st.integers(1, 5))
    classes = draw(st.integers(2, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    values = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
    logits_g = torch.tensor(draw(st.lists(values, min_size=rows * classes, max_size=rows * classes)),
                            dtype=dtype).view(rows, classes)
    logits_h = torch.tensor(draw(st.lists(values, min_size=rows * classes, max_size=rows * classes)),
                            dtype=dtype).view(rows, classes)
    unit = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))
    if draw(st.booleans()):
        alpha = draw(unit)
    else:
        alpha = torch.tensor(draw(st.lists(unit, min_size=rows, max_size=rows)), dtype=dtype)
    return logits_g, logits_h, alpha


@settings(max_examples=150, deadline=None)
@given(logits_and_alpha())
def test_property_finite_normalised_and_accurate(case):
    logits_g, logits_h, alpha = case
    mixed = mix_log_probs(logits_g, logits_h, alpha)
    assert mixed.shape == logits_g.shape and mixed.dtype == logits_g.dtype
    assert torch.isfinite(mixed).all()
    # A probability vector: logsumexp = 0.
    eps = torch.finfo(logits_g.dtype).eps
    total = torch.logsumexp(mixed.double(), dim=1)
    torch.testing.assert_close(total, torch.zeros(len(mixed), dtype=torch.float64), rtol=0, atol=50 * eps)
    # Against an independent float64 computation, scaled to the logit magnitude.
    if isinstance(alpha, torch.Tensor):
        alpha_rows = alpha
    else:
        alpha_rows = torch.full((len(mixed),), alpha, dtype=torch.float64)
    scale = 1.0 + max(float(logits_g.abs().max()), float(logits_h.abs().max()))
    for row in range(len(mixed)):
        a = float(alpha_rows[row])
        log_p_g = torch.log_softmax(logits_g[row].double(), dim=0)
        log_p_h = torch.log_softmax(logits_h[row].double(), dim=0)
        terms = []
        if a < 1:
            terms.append(log_p_g + math.log1p(-a))
        if a > 0:
            terms.append(log_p_h + math.log(a))
        expected = torch.logsumexp(torch.stack(terms), dim=0)
        torch.testing.assert_close(mixed[row].double(), expected, rtol=0, atol=8 * eps * scale)


@settings(max_examples=60, deadline=None)
@given(logits_and_alpha())
def test_property_argmax_limits(case):
    logits_g, logits_h, _ = case
    assert torch.equal(mix_log_probs(logits_g, logits_h, 1.0), torch.log_softmax(logits_h, 1))
    assert torch.equal(mix_log_probs(logits_g, logits_h, 0.0), torch.log_softmax(logits_g, 1))
    # The predicted class has a maximal logit (up to the rounding of log_softmax).
    for logits, alpha in ((logits_h, 1.0), (logits_g, 0.0)):
        chosen = logits.gather(1, mix_log_probs(logits_g, logits_h, alpha).argmax(1, keepdim=True)).squeeze(1)
        slack = 4 * torch.finfo(logits.dtype).eps * (1 + logits.abs().amax(1))
        assert (chosen >= logits.amax(1) - slack).all()


def small_net(seed: int, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        net[3].weight.mul_(scale)
    return net.eval()


def test_mixed_classifier_matches_function_and_is_differentiable():
    standard, robust = small_net(0, 5.0), small_net(1)
    mixed = MixedClassifier(standard, robust, alpha=0.4)
    x = torch.rand(6, 1, 3, 4, requires_grad=True)
    logits_g, logits_h, mixed_log_probs = mixed.forward_all(x)
    torch.testing.assert_close(logits_g, standard(x))
    torch.testing.assert_close(logits_h, robust(x))
    torch.testing.assert_close(mixed(x), mix_log_probs(standard(x), robust(x), 0.4))
    torch.testing.assert_close(mixed_log_probs, mixed(x))
    mixed(x)[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    mixed.alpha = 1.0
    torch.testing.assert_close(mixed(x), torch.log_softmax(robust(x), dim=1))
    mixed.alpha = torch.linspace(0, 1, 6)
    torch.testing.assert_close(mixed(x), mix_log_probs(standard(x), robust(x), torch.linspace(0, 1, 6)))
    with pytest.raises(ValueError):
        mixed.alpha = 1.5
    with pytest.raises(ValueError):
        MixedClassifier(standard, robust, alpha=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_classifier_cuda_streams_match_sequential():
    standard, robust = small_net(0, 5.0).cuda(), small_net(1).cuda()
    x = torch.rand(64, 1, 3, 4, device="cuda", requires_grad=True)
    concurrent = MixedClassifier(standard, robust, 0.7, concurrent_streams=True)
    sequential = MixedClassifier(standard, robust, 0.7, concurrent_streams=False)
    out_concurrent = concurrent(x)
    (grad_concurrent,) = torch.autograd.grad(out_concurrent[:, 1].sum(), x)
    out_sequential = sequential(x)
    (grad_sequential,) = torch.autograd.grad(out_sequential[:, 1].sum(), x)
    torch.testing.assert_close(out_concurrent, out_sequential)
    torch.testing.assert_close(grad_concurrent, grad_sequential)
    with torch.inference_mode():
        torch.testing.assert_close(concurrent.forward_all(x.detach())[2], out_sequential.detach())


# ----------------------------------------------------------------------------- design space (eq. 1-3)


def test_design_probabilities_with_trust_one_is_eq4():
    standard, robust = small_net(0, 5.0), small_net(1)
    x = torch.rand(5, 1, 3, 4)
    for gamma in (0.0, 0.5, 3.0):
        scores = design.smoothed_outputs(standard, robust, x, gamma, "one", "probabilities", "linf")
        alpha = gamma / (1 + gamma)
        torch.testing.assert_close(scores, mix_log_probs(standard(x), robust(x), alpha), rtol=1e-5, atol=1e-6)
    assert design.gamma_from_alpha(0.75) == pytest.approx(3.0)


class LinearImage(nn.Module):
    """Logits W x + b of a flattened image; grad of logit i is W_i."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_design_gradient_trust_terms_hand_computed(norm):
    generator = torch.Generator().manual_seed(3)
    w_g, w_h = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    b_g, b_h = torch.randn(3, generator=generator), torch.randn(3, generator=generator)
    g, h = LinearImage(w_g, b_g), LinearImage(w_h, b_h)
    x = torch.rand(2, 1, 2, 2, generator=generator)
    order = 1 if norm == "linf" else 2
    gamma = 0.7
    z_g, z_h = g(x).detach(), h(x).detach()
    norm_g = w_g.norm(p=order, dim=1)  # ||grad g_i||_p*, the same for every sample
    norm_h = w_h.norm(p=order, dim=1)
    cases = {
        "grad_g_i": norm_g.expand(2, 3),
        "grad_max_g": norm_g[z_g.argmax(1)][:, None].expand(2, 3),
        "grad_g_i_grad_h_i": (norm_g * norm_h).expand(2, 3),
    }
    for trust, r in cases.items():
        eq3 = (z_g + gamma * r * z_h) / (1 + gamma * r)
        torch.testing.assert_close(design.smoothed_outputs(g, h, x, gamma, trust, "logits", norm), eq3)
        eq1 = z_g + gamma * r * z_h
        eq1_scores = design.smoothed_outputs(g, h, x, gamma, trust, "logits", norm, normalized=False)
        torch.testing.assert_close(eq1_scores, eq1)


def test_design_probability_space_gradient_trust_hand_computed():
    generator = torch.Generator().manual_seed(5)
    w_g, w_h = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    g, h = LinearImage(w_g, torch.zeros(3)), LinearImage(w_h, torch.zeros(3))
    x = torch.rand(2, 1, 2, 2, generator=generator)
    p_g, p_h = torch.softmax(g(x), 1).detach(), torch.softmax(h(x), 1).detach()
    # grad_x p_i = p_i (W_i - sum_j p_j W_j)
    grads = p_g[:, :, None] * (w_g[None] - (p_g @ w_g)[:, None, :])
    r = grads.norm(p=2, dim=2)
    expected = torch.log((p_g + 2.0 * r * p_h) / (1 + 2.0 * r))
    scores = design.smoothed_outputs(g, h, x, 2.0, "grad_g_i", "probabilities", "l2")
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_design_is_differentiable_through_gradient_norms():
    torch.manual_seed(0)
    g = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    h = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    for trust in design.TRUST_TERMS:
        for space in design.SPACES:
            assert torch.autograd.gradcheck(
                lambda inp, t=trust, s=space: design.smoothed_outputs(g, h, inp, 0.8, t, s, "l2"), (x,))
    module = design.SmoothedClassifier(g, h, 0.8, "grad_max_g", "probabilities", "linf")
    assert module(x.detach()).shape == (2, 3) and not module(x.detach()).requires_grad
    with pytest.raises(ValueError):
        design.smoothed_outputs(g, h, x, 1.0, "bogus", "logits", "l2")
    with pytest.raises(ValueError):
        design.smoothed_outputs(g, h, x, -1.0, "one", "logits", "l2")
