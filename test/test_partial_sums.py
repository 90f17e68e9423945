"""The float32 certificate's rounding model (`core.partial_sums`) and the l2 bound of |W|
(`layer_bounds.magnitude_l2_bound`): the split maps compute the layer's map, every output within
the stated bound of the exact value (exact rational arithmetic on hard cases, float64 with its own
error allowed on random ones), and the |W| bound never below the exact operator norm."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mixclf_ros.core import layer_bounds as lb
from mixclf_ros.core.numerics import gamma
from mixclf_ros.core.partial_sums import SplitConv, SplitLinear, split_affine, split_error_factors
from mixclf_ros.core.rules_layers import schur_bound

U32 = 2.0 ** -24
CONV_CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=0, dilation=1, groups=1),
    dict(stride=1, padding="same", dilation=(1, 2), groups=1),
    dict(stride=(2, 1), padding=(2, 1), dilation=2, groups=4),
    dict(stride=1, padding="valid", dilation=1, groups=2),
]


def reference(op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, options: dict):
    """(float64 value, float64 |W| |x| + |b|, a bound of the float64 value's own error)."""
    value = op(x.double(), weight.double(), None if bias is None else bias.double(), **options)
    magnitude = op(x.double().abs(), weight.double().abs(), None if bias is None else bias.double().abs(), **options)
    return value, magnitude, gamma(weight[0].numel() + 2, 2.0 ** -53) * magnitude * 1.01


def assert_within_bound(split, op, x, weight, bias, options):
    out = split(x)
    value, magnitude, own_error = reference(op, x, weight, bias, options)
    relative, final = split_error_factors(split, weight[0].numel(), U32)
    bound = relative * magnitude + final * out.double().abs() + own_error
    assert out.dtype == torch.float32 and out.shape == value.shape
    assert ((out.double() - value).abs() <= bound).all()
    return out, value


@pytest.mark.parametrize("options", CONV_CASES, ids=str)
def test_a_split_convolution_is_the_convolution_within_its_bound(options):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32 // options["groups"], 3, 3, generator=generator)
    bias = torch.randn(16, generator=generator)
    x = torch.randn(2, 32, 11, 9, generator=generator)
    split = split_affine(weight, bias, options, linear=False)
    assert isinstance(split, SplitConv) and split.terms <= 16 < weight[0].numel()
    assert split.parts * split.terms == weight[0].numel()
    out, value = assert_within_bound(split, F.conv2d, x, weight, bias, options)
    torch.testing.assert_close(out.double(), value, rtol=1e-5, atol=1e-5)


def test_a_split_conv1d_and_linear_on_batched_features():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 12, 5, generator=generator)
    x = torch.randn(3, 12, 20, generator=generator)
    options = dict(stride=2, padding=2)
    split = split_affine(weight, None, options, linear=False)
    assert isinstance(split, SplitConv)
    assert_within_bound(split, F.conv1d, x, weight, None, options)
    weight, bias = torch.randn(10, 100, generator=generator), torch.randn(10, generator=generator)
    split = split_affine(weight, bias, {}, linear=True)
    assert isinstance(split, SplitLinear) and split.parts == 7 and split.terms == 16  # 100 = 6 x 16 + 4 (padded)
    assert_within_bound(split, F.linear, torch.randn(4, 3, 100, generator=generator), weight, bias, {})


def test_short_dot_products_are_not_split():
    assert split_affine(torch.randn(5, 16), None, {}, linear=True) is None
    assert split_affine(torch.randn(8, 1, 3, 3), None, {"padding": 1}, linear=False) is None  # one channel
    assert split_affine(torch.randn(8, 1, 3, 3), None, {"groups": 8}, linear=False) is None  # depthwise
    relative, final = split_error_factors(None, 9, U32)
    assert relative == gamma(10, U32) and final == 0.0


@settings(max_examples=60, deadline=None)
@given(width=st.integers(17, 300), out=st.integers(1, 6), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([1e-15, 1e-3, 1.0, 1e3, 1e15]))  # no float32 underflow or overflow
def test_every_split_linear_output_is_within_the_bound_of_its_exact_value(width, out, seed, scale):
    """Against exact rational arithmetic, with heavy cancellation: each row's terms nearly sum to 0."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=generator) * scale
    x = torch.randn(1, width, generator=generator)
    x[0, -1] = 0.0
    # the last input cancels the first output's sum of the others, up to float32 rounding
    weight[0, -1] = 1.0
    x[0, -1] = -float((weight[0, :-1].double() * x[0, :-1].double()).sum())
    bias = torch.randn(out, generator=generator) * scale
    split = split_affine(weight, bias, {}, linear=True)
    assert split is not None
    computed = split(x)[0].double().tolist()
    relative, final = split_error_factors(split, width, U32)
    for row in range(out):
        terms = [Fraction(float(w)) * Fraction(float(v)) for w, v in zip(weight[row].tolist(), x[0].tolist())]
        exact = sum(terms, Fraction(float(bias[row])))
        magnitude = sum((abs(t) for t in terms), abs(Fraction(float(bias[row]))))
        bound = Fraction(relative) * magnitude + Fraction(final) * abs(Fraction(computed[row]))
        assert abs(Fraction(computed[row]) - exact) <= bound, row


def explicit_matrix(map_, shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a linear map on inputs of `shape` (one batch element), in float64."""
    basis = torch.eye(math.prod(shape), dtype=torch.float64).view(-1, *shape)
    return map_(basis).flatten(1).T


@pytest.mark.parametrize("case", [
    dict(shape=(4, 9, 9), weight=(6, 4, 3, 3), options=dict(padding=1)),
    dict(shape=(4, 8, 8), weight=(6, 4, 2, 2), options=dict(stride=2)),
    dict(shape=(4, 9, 7), weight=(6, 2, 3, 3), options=dict(stride=(2, 1), padding=1, groups=2)),
    dict(shape=(4, 9, 9), weight=(6, 4, 3, 3), options=dict(dilation=2, padding=2)),
    dict(shape=(3, 12), weight=(5, 3, 4), options=dict(stride=2, padding=1)),
    dict(shape=(30,), weight=(7, 30), options={}),
], ids=lambda case: f"{case['weight']}-{case['options']}")
def test_the_magnitude_bound_is_never_below_the_norm_of_the_map_with_abs_weight(case):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(*case["weight"], generator=generator, dtype=torch.float64)
    options = case["options"]
    op = {2: F.linear, 3: F.conv1d, 4: F.conv2d}[weight.dim()]
    exact = float(torch.linalg.matrix_norm(explicit_matrix(lambda x: op(x, weight.abs(), **options),
                                                           case["shape"]), 2))
    dims = weight.dim() - 2
    bound = lb.magnitude_l2_bound(weight, options.get("groups", 1), lb.as_tuple(options.get("stride", 1), dims),
                                  lb.as_tuple(options.get("dilation", 1), dims))
    assert exact <= bound <= schur_bound(weight.abs()) * 1.0001
    if options.get("stride", 1) == 1 and "padding" not in options:  # valid, stride 1: within the border effect
        assert bound <= 1.5 * exact


def test_partials_beyond_the_memory_cap_are_summed_a_run_at_a_time(monkeypatch):
    """The same outputs within the same bound when at most a few parts are held at once."""
    from mixclf_ros.core import partial_sums

    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(16, 32, 3, 3, generator=generator), torch.randn(16, generator=generator)
    x = torch.randn(2, 32, 9, 9, generator=generator)
    linear_weight, linear_x = torch.randn(10, 200, generator=generator), torch.randn(3, 200, generator=generator)
    whole = split_affine(weight, bias, {"padding": 1}, linear=False)(x), \
        split_affine(linear_weight, None, {}, linear=True)(linear_x)
    monkeypatch.setattr(partial_sums, "PARTIALS_AT_ONCE", 3 * 16 * 81 * 2)  # three parts of the convolution
    conv = split_affine(weight, bias, {"padding": 1}, linear=False)
    assert conv.parts == 32
    assert_within_bound(conv, F.conv2d, x, weight, bias, {"padding": 1})
    monkeypatch.setattr(partial_sums, "PARTIALS_AT_ONCE", 1)  # one part at a time
    linear = split_affine(linear_weight, None, {}, linear=True)
    assert_within_bound(linear, F.linear, linear_x, linear_weight, None, {})
    torch.testing.assert_close(conv(x), whole[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(linear(linear_x), whole[1], rtol=1e-6, atol=1e-5)
