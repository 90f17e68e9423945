"""The zoo's 1-Lipschitz model `robust_lipschitz_gnp` (issue 23): the bound the loader computes is
the product of its layers' true l2 norms (nothing lost between layers), its logits have a bounded
rounding error, its AOL layers are what the training bounds, and PGD finds no prediction change
inside a certified radius (the node's: Theorem 1 or the logit margin, l2, [0,1] pixels) of h alone
or of the mixture, nor do AutoAttack's components."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mixclf_ros import attacks
from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward
from mixclf_ros.core.layers import AOLRescale, MaxMin
from mixclf_ros.core.mixing import MixedClassifier
from mixclf_ros.core.numerics import probabilities_with_error
from mixclf_ros.data import evaluation_subset, load_fashion_mnist, to_tensor
from mixclf_ros.models.architectures import fmnist_gnp_cnn
from mixclf_ros.models.loading import LoadedModel, load_model, zoo_config

NAME = "robust_lipschitz_gnp"


@pytest.fixture(scope="module")
def gnp() -> LoadedModel:
    return load_model(zoo_config(NAME))


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    """100 images of the fixed evaluation subset and their labels."""
    images, labels = load_fashion_mnist("test")
    subset = torch.from_numpy(evaluation_subset())[:100]
    return to_tensor(images)[subset], torch.from_numpy(labels)[subset]


def power_norm(layer: nn.Module, shape: tuple[int, ...], iterations: int = 100) -> float:
    """l2 operator norm of the linear part of a Conv2d/Linear at inputs of `shape`, by power
    iteration in float64 (a lower bound that converges to the norm)."""
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.Conv2d):
        apply = lambda t: F.conv2d(t, weight, None, layer.stride, layer.padding)  # noqa: E731
    else:
        apply = lambda t: F.linear(t, weight)  # noqa: E731
    v = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        v = torch.autograd.functional.vjp(apply, v, apply(v))[1]
        v = v / v.norm()
    return float(apply(v).norm())


def test_computed_bound_is_the_product_of_the_true_layer_norms(gnp: LoadedModel):
    assert gnp.lipschitz_source == "computed"
    shape, product = (1, 28, 28), 1.0
    for layer in gnp.network:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            product *= power_norm(layer, shape)
        with torch.no_grad():
            shape = tuple(layer(torch.zeros(1, *shape)).shape[1:])
    assert gnp.network[0].lipschitz_constant() == 1.0  # std 1: no gain at the input
    logit_bound = gnp.lipschitz_constant / certify.softmax_lipschitz_factor("l2")
    assert product * (1 - 1e-6) <= logit_bound <= product * 1.005


def test_rounding_error_of_the_logits_is_bounded(gnp: LoadedModel, test_images):
    x, _ = test_images
    logits, error = ErrorBoundedForward(gnp.network, input_shape=(1, 28, 28))(x[:50])
    with torch.no_grad():
        float32 = gnp(x[:50])
    assert torch.isfinite(error).all() and float(error.max()) < 1e-8  # logits up to ~50 (temperature 0.14)
    assert torch.allclose(logits.float(), float32, atol=1e-4)


def test_aol_layers_have_l2_norm_at_most_one():
    """The parametrized network trained by `mixclf_ros.train` (random init) is 1-Lipschitz layer by layer."""
    torch.manual_seed(0)
    network = fmnist_gnp_cnn(trainable=True)
    for layer in network:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                layer.parametrizations.weight.original.normal_()
    shape = (1, 28, 28)
    for layer in network:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            assert parametrize.is_parametrized(layer) and isinstance(layer.parametrizations.weight[0], AOLRescale)
            assert power_norm(layer, shape, 30) <= 1.0 + 1e-9
        with torch.no_grad():
            shape = tuple(layer(torch.zeros(1, *shape)).shape[1:])
    x = torch.randn(6, 8, 3, 3)
    assert torch.equal(MaxMin()(x).sort(1).values, x.sort(1).values)  # a permutation of each pair


def node_radius(gnp: LoadedModel, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, certified radius) as the node computes them: the bounded forward's logits and error,
    the larger of Theorem 1's radius and the logit-margin radius."""
    logits, logit_error = ErrorBoundedForward(gnp.network, input_shape=(1, 28, 28))(x)
    probs, probability_error = probabilities_with_error(logits, logit_error)
    radius = certify.best_lipschitz_radius(probs, probability_error, gnp.lipschitz_constant, alpha, logits=logits,
                                           logit_error=logit_error, logit_lipschitz=gnp.logit_lipschitz_constant)
    return logits, radius


def certified_mixture(gnp: LoadedModel, test_images, alpha: float, needed: int):
    """The float64 mixture with the zoo's standard model, and the correctly classified images it
    certifies (images, labels, radii)."""
    x, y = test_images
    robust = copy.deepcopy(gnp.network).double()
    standard = copy.deepcopy(load_model(zoo_config("standard")).network).double()
    mixed = MixedClassifier(standard, robust, alpha)
    logits_h, radius = node_radius(gnp, x, alpha)
    certified = ((radius > 0) & (logits_h.argmax(1) == y)).nonzero().flatten()
    assert len(certified) >= needed, f"only {len(certified)} of {len(x)} certified at alpha {alpha}"
    with torch.no_grad():
        assert torch.equal(mixed(x.double()[certified]).argmax(1), y[certified])
    return mixed, robust, x.double()[certified], y[certified], radius[certified]


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.6])
def test_pgd_never_changes_a_certified_prediction(gnp: LoadedModel, test_images, alpha: float):
    """PGD-20 (l2, one restart) at 0.999 of each certified radius, aimed at the mixture and at h,
    in float64 (the certificate is for exact arithmetic)."""
    mixed, robust, xc, yc, radius = certified_mixture(gnp, test_images, alpha, 50)
    rc = radius * 0.999
    generator = torch.Generator().manual_seed(1)
    for attacked in (mixed, robust):
        x_adv = attacks.pgd(attacked, xc, yc, rc, "l2", steps=20, generator=generator)
        assert ((x_adv - xc).flatten(1).norm(dim=1) <= rc).all()
        with torch.no_grad():
            assert torch.equal(mixed(x_adv).argmax(1), yc)


def test_autoattack_components_never_change_a_certified_prediction(gnp: LoadedModel, test_images):
    """APGD-CE, APGD-T and Square (torchattacks, 20 iterations) on the mixture at alpha 0.75, at
    0.999 of the certified radius of each of the 6 certified images with the largest radii."""
    mixed, _, xc, yc, radius = certified_mixture(gnp, test_images, 0.75, 6)
    for index in radius.argsort(descending=True)[:6].tolist():
        eps = float(radius[index]) * 0.999
        found = attacks.apgd_and_square(mixed, xc[index:index + 1], yc[index:index + 1], eps, "l2", n_iter=20,
                                        n_target_classes=3)
        for name, x_adv in found.items():
            assert float((x_adv - xc[index:index + 1]).norm()) <= eps * (1 + 1e-6), name
            with torch.no_grad():
                assert int(mixed(x_adv).argmax(1)) == int(yc[index]), name
