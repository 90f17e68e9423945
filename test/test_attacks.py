"""Tests of the attacks, and the end-to-end check that certified radii (Theorem 1 with the computed
Lipschitz bounds) survive strong attacks on the mixed classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixclf_ros import attacks
from mixclf_ros.core import certify, lipschitz
from mixclf_ros.core.layers import Normalize, Residual
from mixclf_ros.core.mixing import MixedClassifier


def distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    flat = (a - b).flatten(1).double()
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def two_class_linear(w: torch.Tensor, b: float, extra_classes: int = 0) -> nn.Module:
    """Logits (s, -s) with s = w.x + b: p_0 = sigmoid(2 s). Its Lipschitz bound is tight.
    `extra_classes` adds classes with constant logit -20 that never win (APGD-T needs 4)."""
    layer = nn.Linear(w.numel(), 2 + extra_classes)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:2] = torch.stack([w, -w])
        layer.bias.fill_(-20.0)
        layer.bias[:2] = torch.tensor([b, -b])
    return nn.Sequential(nn.Flatten(), layer).eval()


# ----------------------------------------------------------------------------- PGD basics


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_stays_in_the_ball_and_the_box(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.rand(30, 1, 4, 4)
    x[:5] = 0.0
    x[5:10] = 1.0
    y = torch.randint(0, 5, (30,))
    eps = torch.linspace(0.01, 0.5, 30)
    for epsilon in (0.3, eps):
        generator = torch.Generator().manual_seed(1)
        x_adv = attacks.pgd(model, x, y, epsilon, norm, steps=10, restarts=2, generator=generator)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
        assert (x_adv >= 0).all() and (x_adv <= 1).all()
        assert (distance(x_adv, x, norm) <= torch.as_tensor(epsilon).double()).all()  # exactly
    assert torch.equal(attacks.pgd(model, x, y, 0.0, norm, steps=5), x)
    with pytest.raises(ValueError):
        attacks.pgd(model, x, y, 0.1, "l1", steps=5)
    with torch.inference_mode(), pytest.raises(RuntimeError):
        attacks.pgd(model, x, y, 0.1, norm, steps=5)


def test_pgd_is_seedable_and_does_not_touch_parameter_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    first = attacks.pgd(model, x, y, 0.1, "l2", steps=5, generator=torch.Generator().manual_seed(3))
    second = attacks.pgd(model, x, y, 0.1, "l2", steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_finds_the_minimal_adversarial_example_of_a_linear_model(norm):
    """For logits (s, -s), s = w.x + b, the closest adversarial example is at |s| / ||w||_dual."""
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(16, generator=generator)
    x = 0.4 + 0.2 * torch.rand(200, 1, 4, 4, generator=generator)
    b = -float((x.flatten(1) @ w).mean())
    model = two_class_linear(w, b)
    s = (x.flatten(1) @ w + b).double()
    minimal = s.abs() / w.double().norm(p=1 if norm == "linf" else 2)
    keep = minimal < 0.1  # the box [0, 1] does not bind
    x, minimal = x[keep], minimal[keep]
    y = model(x).argmax(1)
    assert len(x) > 50
    x_adv = attacks.pgd(model, x, y, (minimal * 1.05).float(), norm, steps=20, generator=generator)
    assert (model(x_adv).argmax(1) != y).float().mean() >= 0.99
    x_adv = attacks.pgd(model, x, y, (minimal * 0.95).float(), norm, steps=20, generator=generator)
    assert (model(x_adv).argmax(1) == y).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_classic_pgd_is_torchattacks_final_iterate(norm):
    """keep="final": torchattacks PGD / PGDL2 as is (global RNG), or seeded by a generator without
    touching the global RNG; in the ball and the box; stronger than the clean model allows."""
    import torchattacks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x, y = torch.rand(30, 1, 4, 4), torch.randint(0, 5, (30,))
    eps = 0.3 if norm == "linf" else 1.0
    torch.manual_seed(11)
    ours = attacks.pgd(model, x, y, eps, norm, steps=7, step_size=eps / 4, keep="final")
    torch.manual_seed(11)
    library = (torchattacks.PGD if norm == "linf" else torchattacks.PGDL2)(model, eps=eps, alpha=eps / 4, steps=7)
    assert torch.equal(ours, library(x, y))
    state = torch.get_rng_state()
    first = attacks.pgd(model, x, y, eps, norm, steps=7, restarts=2, keep="final",
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())
    second = attacks.pgd(model, x, y, eps, norm, steps=7, restarts=2, keep="final",
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert (first >= 0).all() and (first <= 1).all()
    assert (distance(first, x, norm) <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        assert (model(first).argmax(1) != y).float().mean() > (model(x).argmax(1) != y).float().mean()
    with pytest.raises(ValueError, match="keep='final'"):
        attacks.pgd(model, x, y, torch.full((30,), eps), norm, steps=3, keep="final")
    with pytest.raises(ValueError, match="keep"):
        attacks.pgd(model, x, y, eps, norm, steps=3, keep="best")


def test_targeted_pgd_reaches_the_target():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.rand(40, 1, 4, 4)
    target = (model(x).argmax(1) + 1) % 4
    x_adv = attacks.pgd(model, x, target, 1.0, "linf", steps=30, targeted=True)
    assert (model(x_adv).argmax(1) == target).float().mean() >= 0.95


# ----------------------------------------------------------------------------- certified radii vs attacks


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_theorem1_radius_is_tight_and_unbreakable_for_a_two_class_linear_model(norm):
    """Here the Lipschitz bound is exact and, near p = 1/2, so is the radius: PGD must fail at
    0.999 r and succeed at 1.1 r. This checks the radius, the bound and the attack together."""
    generator = torch.Generator().manual_seed(6)
    w = torch.randn(16, generator=generator, dtype=torch.float64)
    x = 0.4 + 0.2 * torch.rand(400, 1, 4, 4, generator=generator, dtype=torch.float64)
    b = -float((x.flatten(1) @ w).mean())
    h = two_class_linear(w, b).double()  # float64: the certificate is for exact arithmetic
    probability_lipschitz = lipschitz.probability_lipschitz_bound(h, norm, (1, 4, 4))
    dual = w.double().norm(p=1 if norm == "linf" else 2)
    # p_0 = sigmoid(2 s) has gradient norm at most 2 * 1/4 * ||w||_dual: the bound is exact.
    assert probability_lipschitz == pytest.approx(float(dual) / 2, rel=1e-6)
    with torch.no_grad():
        probs = torch.softmax(h(x), 1)
    radius = certify.lipschitz_radius(probs, probability_lipschitz, 1.0)
    margin = (probs.max(1).values - 0.5).double()
    keep = (radius > 0) & (margin < 0.05) & (radius < 0.1)
    x, radius = x[keep], radius[keep]
    y = h(x).argmax(1)
    assert len(x) > 30
    x_adv = attacks.pgd(h, x, y, radius * 0.999, norm, steps=30, restarts=2, generator=generator)
    assert (h(x_adv).argmax(1) == y).all()
    x_adv = attacks.pgd(h, x, y, radius * 1.1, norm, steps=30, generator=generator)
    assert (h(x_adv).argmax(1) != y).float().mean() >= 0.95


def mlp(scale: float) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        net[3].weight.mul_(scale)
        net[3].bias.mul_(scale)
    return net.eval()


def cnn(scale: float) -> nn.Module:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.1, 0.1)
    net = nn.Sequential(
        Normalize([0.5], [0.5]), nn.Conv2d(1, 4, 3, stride=2, padding=1), bn, nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
        nn.AvgPool2d(3, stride=1, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10))
    with torch.no_grad():
        net[-1].weight.mul_(scale)
        net[-1].bias.mul_(scale)
    return net.eval()


def linear(scale: float) -> nn.Module:
    """Two classes, logits (s, -s), s = w.x + b, centred on the inputs torch.rand draws: the Lipschitz
    bound is exact, so at alpha = 1 the Theorem 1 radius is tight and a constant 2x too small shows."""
    w = torch.randn(64) * scale / 200
    return two_class_linear(w, -0.5 * float(w.sum()))


# (name, builder, input shape, alphas): the exact linear model is not confident enough to certify
# 40 samples at alpha = 0.6.
ROBUSTNESS_CASES = [("mlp", mlp, (1, 8, 8), (0.6, 0.8, 1.0)), ("cnn", cnn, (1, 12, 12), (0.6, 0.8, 1.0)),
                    ("linear", linear, (1, 8, 8), (0.8, 1.0))]


def attack_certified_samples(builder, shape: tuple[int, ...], norm: str, alpha: float,
                             constant_factor: float = 1.0) -> tuple[int, torch.Tensor]:
    """The harness: float64 h (scaled to be confident) and an unrelated confident g, 200 random
    inputs, Theorem 1 radii of the mixture with the computed bound divided by `constant_factor`, then
    PGD-40 with 2 restarts at 0.999 r aimed at the mixture and at h. Returns (number certified,
    (certified,) bool: the mixture's prediction changed under either attack)."""
    torch.manual_seed(7)
    # float64 throughout: the certificate is for exact arithmetic, float32 rounding of the forward
    # pass is not what this test is about.
    robust = builder(30.0).double()  # scaled logits: confident, so radii exist for alpha < 1 too
    standard = builder(20.0).double()  # an unrelated, confident g that the attack can exploit
    probability_lipschitz = lipschitz.probability_lipschitz_bound(robust, norm, shape) / constant_factor
    generator = torch.Generator().manual_seed(8)
    x = torch.rand(200, *shape, generator=generator, dtype=torch.float64)
    mixed = MixedClassifier(standard, robust, alpha)
    with torch.no_grad():
        _, logits_h, log_probs = mixed.forward_all(x)
    radius = certify.lipschitz_radius(torch.softmax(logits_h, 1), probability_lipschitz, alpha)
    certified = (radius > 0).nonzero().flatten()
    prediction = log_probs.argmax(1)
    # Lemma 1 at delta = 0.
    assert torch.equal(prediction[certified], logits_h.argmax(1)[certified])
    xc, yc, rc = x[certified], prediction[certified], radius[certified] * 0.999
    broken = torch.zeros(len(certified), dtype=torch.bool)
    for attacked in (mixed, robust):
        x_adv = attacks.pgd(attacked, xc, yc, rc, norm, steps=40, restarts=2, generator=generator)
        assert (distance(x_adv, xc, norm) <= rc).all()
        with torch.no_grad():
            broken |= mixed(x_adv).argmax(1) != yc
    return len(certified), broken


@pytest.mark.slow
@pytest.mark.parametrize("name, builder, shape, alphas", ROBUSTNESS_CASES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_strong_pgd_never_changes_a_certified_mixed_prediction(name, builder, shape, alphas, norm):
    for alpha in alphas:
        count, broken = attack_certified_samples(builder, shape, norm, alpha)
        assert count >= 40, f"{name} alpha={alpha}: only {count} certified"
        assert not broken.any(), f"{name} {norm} alpha={alpha}: certificate broken"


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_attack_harness_catches_a_lipschitz_constant_two_times_too_small(norm):
    """Negative control for the test above: the same harness, on the model whose bound is exact,
    breaks nearly every (unsound) radius made with half the constant."""
    count, broken = attack_certified_samples(linear, (1, 8, 8), norm, 1.0, constant_factor=2.0)
    assert count >= 100 and broken.float().mean() >= 0.95


# ----------------------------------------------------------------------------- torchattacks wrappers


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_and_square(norm):
    generator = torch.Generator().manual_seed(9)
    w = torch.randn(64, generator=generator)
    x = 0.45 + 0.1 * torch.rand(60, 1, 8, 8, generator=generator)  # Square l2 needs H, W >= 5
    b = -float((x.flatten(1) @ w).mean())
    model = two_class_linear(w, b, extra_classes=2)
    s = (x.flatten(1) @ w + b).double()
    minimal = s.abs() / w.double().norm(p=1 if norm == "linf" else 2)
    keep = minimal < 0.05
    x, minimal = x[keep], minimal[keep]
    y = model(x).argmax(1)
    eps = 0.06
    state = torch.get_rng_state()
    results = attacks.apgd_and_square(model, x, y, eps, norm, n_iter=20, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # torchattacks reseeds; we fork the RNG
    assert set(results) == {"apgd-ce", "apgd-t", "square"}
    for name, x_adv in results.items():
        assert x_adv.shape == x.shape and (x_adv >= 0).all() and (x_adv <= 1).all()
        assert (distance(x_adv, x, norm) <= eps * (1 + 1e-5) + 1e-6).all(), name
    with torch.no_grad():
        assert (model(results["apgd-ce"]).argmax(1) != y).float().mean() >= 0.95
        assert (model(results["apgd-t"]).argmax(1) != y).float().mean() >= 0.95


def test_apgd_and_square_never_break_a_certified_mixture():
    torch.manual_seed(7)
    robust, standard = mlp(30.0), mlp(20.0)
    probability_lipschitz = lipschitz.probability_lipschitz_bound(robust, "l2", (1, 8, 8))
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    mixed = MixedClassifier(standard, robust, 0.8)
    with torch.no_grad():
        _, logits_h, log_probs = mixed.forward_all(x)
    radius = certify.lipschitz_radius(torch.softmax(logits_h, 1), probability_lipschitz, 0.8)
    certified = radius > 0
    eps = float(radius[certified].min()) * 0.999
    xc, yc = x[certified], log_probs.argmax(1)[certified]
    results = attacks.apgd_and_square(mixed, xc, yc, eps, "l2", n_iter=20, n_target_classes=3)
    with torch.no_grad():
        for x_adv in results.values():
            assert torch.equal(mixed(x_adv).argmax(1), yc)
