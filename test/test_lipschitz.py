"""Tests of the layer-wise Lipschitz upper bounds (`lipschitz`) and the layers they know (`layers`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from linear_maps import dense_matrix
from torch import nn

from mixclf_ros.core import certify, layer_bounds, lipschitz
from mixclf_ros.core.layers import GroupSort, Normalize, Residual
from mixclf_ros.core.lipschitz import UnsupportedLayerError, logit_lipschitz_bound


def spectral_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def max_row_sum(matrix: torch.Tensor) -> float:
    return float(matrix.abs().sum(dim=1).max())


# ----------------------------------------------------------------------------- exact per-layer values


def test_linear_bound_equals_svd_and_row_sums():
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    weight = layer.weight.detach().double()
    assert lipschitz.linear_bound(layer.weight, "l2") == pytest.approx(float(torch.linalg.svdvals(weight)[0]),
                                                                      rel=1e-8)
    assert lipschitz.linear_bound(layer.weight, "linf") == pytest.approx(max_row_sum(weight), rel=1e-8)
    model = nn.Sequential(layer).double()  # float64: the bound is for exact arithmetic
    for norm in ("l2", "linf"):
        bound = logit_lipschitz_bound(model, norm, (7,))
        x = torch.rand(3, 7, dtype=torch.float64)
        lower = lipschitz.jacobian_norm_lower_bound(model, x, norm, iters=100)
        assert lower <= bound and lower == pytest.approx(bound, rel=1e-4)  # a linear map: exact


CONV_CASES = [
    # in, out, kernel, stride, padding, dilation, groups, H, W
    (2, 3, 3, 1, 1, 1, 1, 5, 6),
    (2, 3, 3, 2, 1, 1, 1, 5, 6),
    (2, 4, 3, 1, 2, 2, 2, 6, 5),
    (1, 2, 5, 1, 0, 1, 1, 7, 7),
    (3, 2, (2, 3), 1, "same", 1, 1, 5, 4),
    (2, 2, 4, 1, "same", 1, 1, 6, 6),
    (2, 3, 3, 1, "valid", 1, 1, 6, 6),
    (2, 4, 3, 2, 1, 1, 2, 6, 6),
    (3, 2, 4, 2, 1, 1, 1, 7, 5),
    (2, 3, 2, 2, 0, 1, 1, 6, 6),
    (1, 4, 3, 3, 1, 1, 1, 6, 7),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_l2_bound_is_the_circular_norm_and_bounds_the_padded_conv(case):
    c_in, c_out, kernel, stride, padding, dilation, groups, height, width = case
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups).double()
    bound = lipschitz.conv2d_l2_bound(conv, (height, width))

    weight = conv.weight.detach()
    padded = dense_matrix(lambda x: F.conv2d(x, weight, None, stride, padding, dilation, groups),
                          (1, c_in, height, width))
    assert spectral_norm(padded) <= bound * (1 + 1e-12)

    # The circular convolution on the zero-padded canvas, built explicitly.
    kh, kw = conv.kernel_size
    extent_h, extent_w = dilation * (kh - 1) + 1, dilation * (kw - 1) + 1
    top, bottom, left, right = layer_bounds.conv_padding(conv.padding, (extent_h, extent_w))
    canvas = (height + top + bottom, width + left + right)

    def circular(x):
        wrapped = F.pad(x, (0, extent_w - 1, 0, extent_h - 1), mode="circular")
        return F.conv2d(wrapped, weight, None, 1, 0, dilation, groups)

    circular_norm = spectral_norm(dense_matrix(circular, (1, c_in, *canvas)))
    if stride == 1:
        assert bound == pytest.approx(circular_norm, rel=1e-8)
        return
    # strided: also the circular convolution on the canvas enlarged to a multiple of the stride,
    # sampled every `stride` outputs (polyphase); the smaller of the two
    enlarged = tuple(-(-side // stride) * stride for side in canvas)
    strided_norm = spectral_norm(dense_matrix(lambda x: circular(x)[..., ::stride, ::stride], (1, c_in, *enlarged)))
    assert bound == pytest.approx(min(circular_norm, strided_norm), rel=1e-8)
    # Sanity of the construction: restricted to valid outputs, the circular conv is the padded one.
    x = torch.randn(1, c_in, height, width, dtype=torch.float64)
    x_canvas = F.pad(x, (left, right, top, bottom))
    out_padded = F.conv2d(x, weight, None, 1, padding, dilation, groups)
    out_circular = circular(x_canvas)[..., :out_padded.shape[-2], :out_padded.shape[-1]]
    torch.testing.assert_close(out_circular, out_padded)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_linf_bound(case):
    c_in, c_out, kernel, stride, padding, dilation, groups, height, width = case
    torch.manual_seed(2)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups).double()
    weight = conv.weight.detach()
    dense = dense_matrix(lambda x: F.conv2d(x, weight, None, stride, padding, dilation, groups),
                         (1, c_in, height, width))
    bound = lipschitz.conv_linf_bound(conv.weight)
    assert max_row_sum(dense) <= bound * (1 + 1e-12)
    assert bound == pytest.approx(float(weight.abs().flatten(1).sum(1).max()), rel=1e-8)


def test_conv_linf_bound_is_exact_when_an_interior_pixel_exists():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    weight = conv.weight.detach()
    dense = dense_matrix(lambda x: F.conv2d(x, weight, None, 1, 1), (1, 2, 5, 5))
    assert max_row_sum(dense) == pytest.approx(lipschitz.conv_linf_bound(conv.weight), rel=1e-8)


def test_batchnorm_bound_is_exact():
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 0.1]))
        bn.weight.copy_(torch.tensor([1.0, -3.0, 0.5]))
    bn.eval()
    expected = max(abs(w) / math.sqrt(v + bn.eps) for w, v in zip([1.0, -3.0, 0.5], [0.5, 2.0, 0.1]))
    dense = dense_matrix(lambda x: bn(x) - bn(torch.zeros_like(x)), (1, 3, 2, 2))
    for norm in ("l2", "linf"):
        bound = logit_lipschitz_bound(nn.Sequential(bn), norm, (3, 2, 2))
        assert bound == pytest.approx(expected, rel=1e-8)
    assert spectral_norm(dense) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("pool, shape, expected_l2", [
    (nn.MaxPool2d(2), (2, 6, 6), 1.0),
    (nn.MaxPool2d(3, stride=1, padding=1), (1, 6, 6), 3.0),
    (nn.MaxPool2d(3, stride=2), (1, 7, 7), 2.0),
    (nn.MaxPool2d(2, ceil_mode=True), (1, 5, 5), 1.0),
    (nn.MaxPool2d(2, stride=1, dilation=2), (1, 6, 6), 2.0),
    (nn.AdaptiveMaxPool2d(3), (1, 7, 7), 2.0),  # windows [0,3), [2,5), [4,7): pixels 2, 4 in two
    (nn.MaxPool1d(3, stride=1), (2, 8), math.sqrt(3.0)),
])
def test_max_pool_bounds(pool, shape, expected_l2):
    model = nn.Sequential(pool)
    assert logit_lipschitz_bound(model, "l2", shape) == pytest.approx(expected_l2)
    assert logit_lipschitz_bound(model, "linf", shape) == 1.0
    x = torch.randn(64, *shape, dtype=torch.float64)
    assert lipschitz.jacobian_norm_lower_bound(model, x, "l2") <= expected_l2 + 1e-9


@pytest.mark.parametrize("pool, shape", [
    (nn.AvgPool2d(2), (2, 6, 6)),
    (nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 5)),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), (1, 5, 5)),
    (nn.AvgPool2d(3, stride=2, ceil_mode=True), (1, 6, 6)),
    (nn.AdaptiveAvgPool2d(1), (3, 4, 5)),
    (nn.AdaptiveAvgPool2d((2, 3)), (1, 5, 7)),
    (nn.AvgPool1d(2, stride=1), (1, 6)),
])
def test_avg_pool_bounds(pool, shape):
    model = nn.Sequential(pool)
    dense = dense_matrix(pool, (1, *shape))
    l2 = logit_lipschitz_bound(model, "l2", shape)
    linf = logit_lipschitz_bound(model, "linf", shape)
    assert spectral_norm(dense) <= l2 * (1 + 1e-12)
    assert linf == pytest.approx(max_row_sum(dense), rel=1e-8)
    if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == 1:
        assert l2 == pytest.approx(1 / math.sqrt(shape[1] * shape[2]), rel=1e-8)  # exact
    if isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2:
        assert l2 == pytest.approx(0.5, rel=1e-8)  # non-overlapping: exact


def test_normalize_and_residual():
    layer = Normalize([0.5, 0.2], [0.25, 2.0])
    x = torch.rand(3, 2, 4, 4)
    torch.testing.assert_close(layer(x)[:, 0], (x[:, 0] - 0.5) / 0.25)
    assert logit_lipschitz_bound(nn.Sequential(layer), "l2", (2, 4, 4)) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        Normalize([0.5], [0.0])
    with pytest.raises(ValueError):
        Normalize([0.5, 0.5], [1.0])
    torch.manual_seed(5)
    block = nn.Linear(4, 4)
    residual = Residual(block)
    v = torch.randn(2, 4)
    torch.testing.assert_close(residual(v), v + block(v))
    expected = 1 + float(torch.linalg.svdvals(block.weight.detach().double())[0])
    assert logit_lipschitz_bound(nn.Sequential(residual), "l2", (4,)) == pytest.approx(expected, rel=1e-8)


def test_group_sort():
    layer = GroupSort(2)
    x = torch.tensor([[3.0, 1.0, -1.0, 2.0]])
    torch.testing.assert_close(layer(x), torch.tensor([[1.0, 3.0, -1.0, 2.0]]))
    with pytest.raises(ValueError):
        GroupSort(3)(x)


# ----------------------------------------------------------------------------- whole networks


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), GroupSort(2),
                         nn.Linear(16, 12), nn.LeakyReLU(0.1), nn.Dropout(0.5), nn.Linear(12, 10), nn.Tanh(),
                         nn.Linear(10, 5))


def cnn() -> nn.Module:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    return nn.Sequential(
        Normalize([0.4], [0.3]),
        nn.Conv2d(1, 4, 3, stride=2, padding=1), bn, nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ELU(), nn.Conv2d(4, 4, 1))),
        nn.AvgPool2d(3, stride=1, padding=1), nn.MaxPool2d(2), nn.Sigmoid(),
        nn.Sequential(nn.Flatten(), nn.Identity()), nn.Linear(36, 10))


@pytest.mark.parametrize("builder, shape", [(mlp, (1, 6, 6)), (cnn, (1, 12, 12))])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_bound_is_never_below_the_searched_gradient_norm(builder, shape, norm):
    torch.manual_seed(6)
    model = builder().double().eval()  # float64: the bound is for exact arithmetic
    bound = logit_lipschitz_bound(model, norm, shape)
    generator = torch.Generator().manual_seed(7)
    inside = torch.rand(200, *shape, generator=generator, dtype=torch.float64)
    outside = torch.randn(200, *shape, generator=generator, dtype=torch.float64) * 3  # bound holds on R^d
    lower = max(lipschitz.jacobian_norm_lower_bound(model, inside, norm, iters=20),
                lipschitz.jacobian_norm_lower_bound(model, outside, norm, iters=20))
    assert 0 < lower <= bound
    # Difference quotients along the steepest direction found by a few ascent steps.
    x = inside[:20].clone()
    delta = (torch.randn(x.shape, generator=generator, dtype=torch.float64) * 1e-2).requires_grad_(True)
    for _ in range(20):
        diff = model(x + delta) - model(x)
        size = delta.flatten(1).norm(p=math.inf if norm == "linf" else 2, dim=1)
        quotient = diff.norm(p=math.inf if norm == "linf" else 2, dim=1) / size
        assert float(quotient.detach().max()) <= bound * (1 + 1e-9)
        (grad,) = torch.autograd.grad(quotient.sum(), delta)
        with torch.no_grad():
            delta += 1e-3 * grad.sign()
    assert lipschitz.probability_lipschitz_bound(model, norm, shape) == pytest.approx(
        bound * certify.softmax_lipschitz_factor(norm))


def test_modes_are_restored_and_dtype_device_follow_the_model():
    model = cnn().double().train()
    logit_lipschitz_bound(model, "l2", (1, 12, 12))
    assert all(m.training for m in model.modules())
    model.eval()
    logit_lipschitz_bound(model, "linf", (1, 12, 12))
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------- unsupported


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * 10


class DoubledSequential(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


class MyLinear(nn.Linear):
    def forward(self, x):
        return 5 * super().forward(x)


@pytest.mark.parametrize("model, scale", [
    (CustomNet(), 10.0),
    (nn.Sequential(CustomNet()), 10.0),
    (DoubledSequential(nn.Linear(4, 2)), 2.0),
    (nn.Sequential(MyLinear(4, 2)), 5.0),
])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_custom_forwards_are_bounded_as_they_compute(model, scale, norm):
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    expected = scale * lipschitz.linear_bound(linear.weight, norm)
    assert logit_lipschitz_bound(model, norm, (4,)) == pytest.approx(expected, rel=1e-9)


def test_gelu_and_silu_constants_are_their_largest_slopes():
    """GELU: sup of Phi(x) + x phi(x), at x = sqrt(2); SiLU: about 1.0998 (x = 2.3994)."""
    phi = math.exp(-1.0) / math.sqrt(2 * math.pi)
    gelu = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * phi
    assert gelu <= logit_lipschitz_bound(nn.Sequential(nn.GELU()), "l2", (4,)) <= gelu + 2e-3
    x = torch.linspace(-20, 20, 400001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(F.silu(x).sum(), x)
    assert float(slope.abs().max()) <= logit_lipschitz_bound(nn.Sequential(nn.SiLU()), "linf", (4,)) \
        <= float(slope.abs().max()) + 2e-3


@pytest.mark.parametrize("model, shape, name", [
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)), (4,), "Softmax"),
    (nn.Sequential(nn.Conv3d(1, 2, 3)), (1, 4, 4, 4), "Conv3d"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=2, padding_mode="circular")), (1, 5, 5), "circular"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), (1, 5, 5), "reflect"),
    (nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)), (4,), "running statistics"),
    (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), (1, 4, 4), "return_indices"),
    (nn.Sequential(nn.Linear(4, 4), nn.Hardshrink()), (4,), "Hardshrink"),
])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_unsupported_layers_raise_naming_the_layer(model, shape, name, norm):
    with pytest.raises(UnsupportedLayerError, match=name):
        logit_lipschitz_bound(model, norm, shape)


def test_parametrized_layers_are_bounded_with_their_effective_weight():
    torch.manual_seed(8)
    parametrizations = torch.nn.utils.parametrizations
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(6, 4)), nn.ReLU(),
                          parametrizations.weight_norm(nn.Linear(4, 3))).eval()
    expected = (float(torch.linalg.svdvals(model[0].weight.detach().double())[0])
                * float(torch.linalg.svdvals(model[2].weight.detach().double())[0]))
    assert logit_lipschitz_bound(model, "l2", (6,)) == pytest.approx(expected, rel=1e-8)
    assert float(torch.linalg.svdvals(model[0].weight.detach().double())[0]) == pytest.approx(1.0, rel=0.05)
    # The old hook-based spectral_norm changes the weight in a pre-hook: refused.
    with pytest.raises(UnsupportedLayerError, match="hooks"):
        logit_lipschitz_bound(nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(6, 4))), "l2", (6,))


def test_forward_hooks_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    handle = model[0].register_forward_hook(lambda module, inputs, output: output * 100)
    with pytest.raises(UnsupportedLayerError, match="hooks"):
        logit_lipschitz_bound(model, "l2", (4,))
    handle.remove()
    assert logit_lipschitz_bound(model, "l2", (4,)) > 0
    with pytest.raises(ValueError):
        logit_lipschitz_bound(model, "l1", (4,))
