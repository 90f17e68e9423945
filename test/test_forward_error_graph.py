"""The rounding-error bound of the robust forward for networks with their own forward (torch.fx
graphs: ResNet-style blocks, batch norm, functional calls): it must contain the real error, compute
what the forward computes, agree with the chain walk on the same network, and refuse what it cannot
bound by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_lipschitz_graph import FunctionalLipschitzCNN, TinyResNet, randomise_batch_norm
from torch import nn

from mixclf_ros.core.forward_error import ErrorBoundedForward, UnboundedForwardError
from mixclf_ros.core.numerics import probabilities_with_error
from mixclf_ros.models.loading import load_model, zoo_config
from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
from mixclf_ros.vision.decode import DecodedImage
from mixclf_ros.vision.preprocess import PreprocessConfig

pytestmark = pytest.mark.usefixtures("both_rounding_domains")


def _tiny_resnet(depth: int, cat_branches: bool) -> nn.Module:
    torch.manual_seed(depth)
    model = TinyResNet(depth, 4, "relu", cat_branches)
    randomise_batch_norm(model, torch.Generator().manual_seed(depth))
    return model.eval()


@pytest.mark.parametrize("depth, cat_branches", [(1, False), (2, True), (3, True)])
def test_graph_bound_covers_the_float32_error_of_a_resnet_with_its_own_forward(depth, cat_branches):
    model = _tiny_resnet(depth, cat_branches)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    logits32, bound32 = ErrorBoundedForward(model, torch.float32, input_shape=(1, 8, 8))(x)
    logits64, bound64 = ErrorBoundedForward(model, input_shape=(1, 8, 8))(x)
    error = (logits32.double() - logits64).abs()
    assert (error > 0).any()
    assert (error <= bound32.double() + bound64).all()
    assert float(bound64.max()) < 1e-9
    torch.testing.assert_close(logits64, model.double()(x.double()), rtol=1e-12, atol=1e-12)


def test_batch_norm_in_a_chain_is_bounded():
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(256, 6), nn.BatchNorm1d(6)).eval()
    randomise_batch_norm(chain, torch.Generator().manual_seed(0))
    x = torch.rand(16, 1, 8, 8)
    logits32, bound32 = ErrorBoundedForward(chain, torch.float32, input_shape=(1, 8, 8))(x)
    logits64, bound64 = ErrorBoundedForward(chain, input_shape=(1, 8, 8))(x)
    assert ((logits32.double() - logits64).abs() <= bound32.double() + bound64).all()
    torch.testing.assert_close(logits64, chain.double()(x.double()), rtol=1e-12, atol=1e-12)


def test_functional_forward_gets_the_same_logits_and_bound_as_the_zoo_chain():
    chain = load_model(zoo_config("robust_lipschitz")).network
    functional = FunctionalLipschitzCNN()
    with torch.no_grad():
        for mine, theirs in ((functional.conv1, chain[1]), (functional.conv2, chain[4]), (functional.fc1, chain[8]),
                             (functional.fc2, chain[10])):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    logits, bound = ErrorBoundedForward(functional, input_shape=(1, 28, 28))(x)
    chain_logits, chain_bound = ErrorBoundedForward(chain, input_shape=(1, 28, 28))(x)
    assert torch.equal(logits, chain_logits)
    torch.testing.assert_close(bound, chain_bound, rtol=1e-12, atol=0.0)


class Sigmoidal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return torch.sigmoid(self.fc(x.flatten(1)))


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x.mul_(2.0)
        return self.fc(x.flatten(1))


class MeanOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) - self.fc(x.flatten(1)).mean(0)


@pytest.mark.parametrize("model, message", [
    (Sigmoidal(), "sigmoid"),
    (WritesItsInput(), "writes to the model input"),
    (MeanOverBatch(), "reduction over the batch dimension"),
])
def test_what_the_graph_walk_cannot_bound_is_refused_by_name(model, message):
    with pytest.raises(UnboundedForwardError, match=message):
        ErrorBoundedForward(model, input_shape=(1, 4, 4))


def test_a_network_with_its_own_forward_needs_the_input_shape():
    with pytest.raises(UnboundedForwardError, match="no rounding-error bound for TinyResNet"):
        ErrorBoundedForward(_tiny_resnet(1, False))


def test_functional_pooling_is_evaluated_with_its_own_options():
    class Pool(nn.Module):
        def forward(self, x):
            # positional flags (nn.MaxPool2d orders them differently), a kernel from the shape
            pooled = F.max_pool2d(x, 2, 2, 0, 1, True)
            return torch.cat([F.avg_pool2d(pooled, pooled.shape[-1]), F.adaptive_avg_pool2d(x, 1)], 1).flatten(1)

    x = torch.rand(4, 1, 5, 5)
    logits, bound = ErrorBoundedForward(Pool(), input_shape=(1, 5, 5))(x)
    torch.testing.assert_close(logits, Pool()(x.double()), rtol=1e-12, atol=1e-12)
    assert logits.shape == (4, 2) and float(bound.max()) < 1e-14


def test_classifier_bounds_the_error_of_a_robust_model_with_its_own_forward():
    """Was "estimated" (float32/float64 disagreement); now a rigorous bound."""
    model = _tiny_resnet(2, True)
    for key, value in dict(kind="lipschitz", norm="l2", num_classes=5, lipschitz_constant=50.0,
                           input_shape=(1, 8, 8)).items():
        setattr(model, key, value)
    standard = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    classifier = CertifiedClassifier(standard, model, PreprocessConfig(1, 8, 8), torch.device("cpu"))
    assert classifier.forward_error == "bounded"


def _deep_chain(depth: int, weight_scale: float) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
    chain = nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 8 * 8, 5)).eval()
    with torch.no_grad():
        for layer in chain:
            if isinstance(layer, nn.Conv2d):
                layer.weight.mul_(weight_scale)
    return chain


def test_the_l2_part_keeps_the_bound_of_a_deep_network_small():
    """Ten conv layers: the componentwise bound alone reached 2 in probability at a grey frame (|W| E
    grows by each layer's absolute row sums); with the per-sample l2 part it is below 1e-4, and it
    still contains the float32 error."""
    chain = _deep_chain(10, 4.0)
    grey = torch.full((1, 1, 8, 8), 0.5)
    classifier_bound = probabilities_with_error(*ErrorBoundedForward(chain, input_shape=(1, 8, 8))(grey))[1]
    assert float(classifier_bound.max()) < 1e-4
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    logits32, bound32 = ErrorBoundedForward(chain, torch.float32, input_shape=(1, 8, 8))(x)
    logits64, bound64 = ErrorBoundedForward(chain, input_shape=(1, 8, 8))(x)
    assert ((logits32.double() - logits64).abs() <= bound32.double() + bound64).all()


@pytest.mark.ros
@pytest.mark.parametrize("depth, weight_scale, warns", [(1, 1.0, False), (20, 8.0, True)])
def test_a_bound_that_eats_the_margins_is_a_warning_on_diagnostics(depth, weight_scale, warns):
    from diagnostic_msgs.msg import DiagnosticStatus

    from mixclf_ros.ros.certifiable import CertificateMonitor

    robust = _deep_chain(depth, weight_scale)
    for key, value in dict(kind="lipschitz", norm="l2", num_classes=5, lipschitz_constant=50.0,
                           lipschitz_source="computed", input_shape=(1, 8, 8)).items():
        setattr(robust, key, value)
    standard = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    classifier = CertifiedClassifier(standard, robust, PreprocessConfig(1, 8, 8), torch.device("cpu"))
    assert classifier.forward_error == "bounded"
    assert (classifier.forward_error_bound > 1e-3) == warns
    frame = DecodedImage(np.full((8, 8, 1), 128, dtype=np.uint8), "mono", 1 / 255)
    classifier.lipschitz_pass.frames = dict.fromkeys(classifier.lipschitz_pass.frames, 0)  # not the warm-up's
    classifier.classify([frame], LiveSettings(alpha=0.8))
    status = CertificateMonitor(classifier, None, lambda message: None).status("mixclf")
    values = {item.key: item.value for item in status.values}
    routes = dict(part.rsplit(" ", 1) for part in values["certificate_routes"].split(", "))
    assert sum(int(count) for count in routes.values()) == 1  # the one frame, by whichever route certified it
    assert float(values["forward_error_bound"]) == pytest.approx(classifier.forward_error_bound, rel=1e-2)
    assert ("rounding-error bound" in status.message) == warns
    assert (status.level == DiagnosticStatus.WARN) == warns


class ThreePools(nn.Module):
    """The same kernel with three divisors: the l2 operator norms differ (0.67, 0.83, 6), so a
    cache of them keyed by anything less than the whole configuration would understate one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        pooled = [F.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
                  F.avg_pool2d(x, 3, 2, 1, divisor_override=1)]
        return torch.cat([p - 0.5 for p in pooled], 1).flatten(1)


def test_functional_pools_with_different_options_keep_their_own_operator_norms():
    torch.manual_seed(4)
    model = ThreePools().eval()
    x = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    logits32, bound32 = ErrorBoundedForward(model, torch.float32, input_shape=(1, 6, 6))(x)
    logits64, bound64 = ErrorBoundedForward(model, input_shape=(1, 6, 6))(x)
    torch.testing.assert_close(logits64, model.double()(x.double()), rtol=1e-12, atol=1e-12)
    assert ((logits32.double() - logits64).abs() <= bound32.double() + bound64).all()


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 5, 5, padding=2), nn.Conv1d(4, 4, 3, stride=2, groups=2),
                                  nn.Conv1d(2, 3, 3, dilation=2, padding="same")])
def test_conv1d_gets_its_operator_norm_in_l2(conv):
    """A 1-D convolution is bounded as a 2-D one on a 1-pixel-high image (the FFT bound): above
    the exact norm of its linear part (power iteration) and close to it."""
    from mixclf_ros.core.lipschitz import logit_lipschitz_bound

    conv = conv.double().eval()
    shape = (conv.in_channels, 16)
    linear = lambda v: conv(v) - conv(torch.zeros_like(v))  # noqa: E731
    v = torch.randn(1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(200):
            v = torch.func.vjp(linear, v)[1](linear(v))[0]
            v = v / v.norm()
        exact = float(linear(v).norm())
    bound = logit_lipschitz_bound(nn.Sequential(conv), "l2", shape)
    assert exact * (1 - 1e-9) <= bound <= 1.5 * exact


def test_conv1d_chains_get_a_bound_that_holds():
    torch.manual_seed(5)
    chain = nn.Sequential(nn.Flatten(2), nn.Conv1d(1, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 6, 3, stride=2),
                          nn.Flatten(), nn.Linear(6 * 31, 4)).eval()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    logits32, bound32 = ErrorBoundedForward(chain, torch.float32, input_shape=(1, 8, 8))(x)
    logits64, bound64 = ErrorBoundedForward(chain, input_shape=(1, 8, 8))(x)
    assert ((logits32.double() - logits64).abs() <= bound32.double() + bound64).all()


def test_a_dense_layer_on_every_row_of_an_image_gets_a_bound_that_holds():
    """nn.Linear on the last dimension of (N, 1, 8, 8): its bias repeats over 8 rows, not over the
    5 features (the l2 part's broadcast factor)."""
    torch.manual_seed(6)
    chain = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Flatten(), nn.Linear(40, 3)).eval()
    with torch.no_grad():
        chain[0].bias.mul_(1e4)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    logits32, bound32 = ErrorBoundedForward(chain, torch.float32, input_shape=(1, 8, 8))(x)
    logits64, bound64 = ErrorBoundedForward(chain, input_shape=(1, 8, 8))(x)
    assert ((logits32.double() - logits64).abs() <= bound32.double() + bound64).all()


def test_a_python_number_first_in_a_sum_or_difference():
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return 1.0 - self.fc(x.flatten(1)) * 2.0 + 0.5

    torch.manual_seed(7)
    model = Affine().eval()
    x = torch.rand(8, 1, 4, 4)
    logits, bound = ErrorBoundedForward(model, input_shape=(1, 4, 4))(x)
    torch.testing.assert_close(logits, model.double()(x.double()), rtol=1e-12, atol=1e-12)
    logits32, bound32 = ErrorBoundedForward(model, torch.float32, input_shape=(1, 4, 4))(x)
    assert ((logits32.double() - logits).abs() <= bound32.double() + bound).all()
