"""Affine maps in float32 with short dot products: the float32 certificate's rounding model.

A float32 dot product of n terms, in whatever order a BLAS or convolution kernel sums it, is
within `gamma_n |W| |x|` of the exact value (Higham, "Accuracy and Stability of Numerical
Algorithms", Thm 3.1/3.5), and no tighter bound holds without knowing that order. With n in the
thousands (a 6,272-input linear layer: gamma_n = 3.7e-4) that bound is far too loose to certify.

Here each output is split into partial dot products of at most `PARTIAL_SUM_TERMS` terms, all of
them computed by one float32 batched matrix product (the forward's price in multiply-adds), and
the partials summed in float64, exactly cast. The exact output `y = sum_g p_g + b` and the
computed one `y32 = fl32(fl64(sum_g fl32(p_g) + b))` then differ by at most

    (gamma_t + gamma'_{G+1} (1 + gamma_t)) |W| |x| + gamma'_{G+1} |b| + u |y32| / (1 - u)

with t the terms of a partial, G the partials, gamma' in float64 and u = 2^-24 (the last rounding,
to float32, of a value at most |y32| / (1 - u) in magnitude): `split_error_factors` gives the two
coefficients. With t = 16 the first is 9.5e-7, 390 times smaller than gamma_6272. The price is
memory: G partial outputs per output (G = the input channels for a 3x3 convolution), which on a CPU
costs more than a float64 pass (docs/NUMERICS.md); on GPUs float64 is the slow part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mixclf_ros.core.layer_bounds import as_tuple, conv_padding
from mixclf_ros.core.numerics import FLOAT64_UNIT_ROUNDOFF, gamma

PARTIAL_SUM_TERMS = 16
"""The most terms of one float32 partial dot product (a convolution's partial takes whole input
channels: its channel count times its taps, at most this where one channel's taps fit)."""

PARTIALS_AT_ONCE = 2**24
"""The most float32 partials (64 MiB) held at once: more parts are computed a run at a time, each
run's sum added to the float64 total (any order of the G additions is within gamma'_{G+1})."""


def _summed_partials(partials: Callable[[slice], torch.Tensor], parts: int, per_part: int, dim: int) -> torch.Tensor:
    """The float64 sum over `dim` of `partials(run)` for runs of the parts, `per_part` float32 values
    each, at most `PARTIALS_AT_ONCE` values at once."""
    step = max(1, PARTIALS_AT_ONCE // max(per_part, 1))
    total = partials(slice(0, step)).sum(dim=dim, dtype=torch.float64)
    for start in range(step, parts, step):
        total += partials(slice(start, start + step)).sum(dim=dim, dtype=torch.float64)
    return total


class SplitLinear:
    """`x -> x W^T + b` (W of shape (out, n)) with each output a float64 sum of `parts` float32
    partial dot products of `terms` terms (W padded with zero columns to `parts * terms`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, terms: int):
        out, width = weight.shape
        self.terms, self.parts = terms, math.ceil(width / terms)
        self.padding = self.parts * terms - width
        self.weight = F.pad(weight, (0, self.padding)).view(out, self.parts, terms).permute(1, 2, 0).contiguous()
        self.bias = None if bias is None else bias.to(torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The map at x (float32), rounded to float32 once from the float64 sum of the partials."""
        leading = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        if self.padding:
            rows = F.pad(rows, (0, self.padding))
        chunks = rows.view(rows.shape[0], self.parts, self.terms).transpose(0, 1)
        total = _summed_partials(lambda run: torch.bmm(chunks[run], self.weight[run]), self.parts,
                                 rows.shape[0] * self.weight.shape[-1], dim=0)  # (parts, rows, out) summed
        if self.bias is not None:
            total += self.bias
        return total.to(x.dtype).view(*leading, -1)


class SplitConv:
    """A zero-padded convolution (conv1d as a conv2d one pixel high) with each output a float64 sum
    of `parts` float32 partial dot products: the input channels of each of the layer's groups split
    into `parts` runs of `channels` channels (a divisor of the group's channels), each partial
    `channels * taps` terms. The input is unfolded once (exact copies); the weight is stored as
    (groups, parts, out / groups, channels * taps), so one batched matrix product computes every
    partial."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, options: dict, channels: int):
        self.one_dimensional = weight.dim() == 3
        if self.one_dimensional:
            weight = weight.unsqueeze(2)
        out, group_channels, kh, kw = weight.shape
        groups = int(options.get("groups", 1))
        self.kernel, self.parts, self.terms = (kh, kw), group_channels // channels, channels * kh * kw
        self.stride = _pair(options.get("stride", 1), self.one_dimensional, 1)
        self.dilation = _pair(options.get("dilation", 1), self.one_dimensional, 1)
        padding = options.get("padding", 0)
        extent = tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel))
        if not isinstance(padding, str):
            padding = _pair(padding, self.one_dimensional, 0)
        self.padding = conv_padding(padding, extent)  # (top, bottom, left, right)
        self.weight = (weight.reshape(groups, out // groups, self.parts, self.terms).transpose(1, 2).contiguous())
        self.bias = None if bias is None else bias.to(torch.float64).view(1, groups, out // groups, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution at x (float32), rounded to float32 once from the float64 sum of the partials."""
        if self.one_dimensional:
            x = x.unsqueeze(2)
        top, bottom, left, right = self.padding
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        columns = F.unfold(x, self.kernel, dilation=self.dilation, stride=self.stride)
        groups, parts, out_per_group, terms = self.weight.shape
        columns = columns.view(x.shape[0], groups, parts, terms, columns.shape[-1])
        total = _summed_partials(lambda run: torch.matmul(self.weight[:, run], columns[:, :, run]), parts,
                                 x.shape[0] * groups * out_per_group * columns.shape[-1], dim=2)
        if self.bias is not None:
            total += self.bias
        height, width = ((size - d * (k - 1) - 1) // s + 1 for size, d, k, s in
                         zip(x.shape[-2:], self.dilation, self.kernel, self.stride))
        out = total.to(x.dtype).view(x.shape[0], groups * out_per_group, height, width)
        return out.squeeze(2) if self.one_dimensional else out


def _pair(value: int | Sequence[int], one_dimensional: bool, height: int) -> tuple[int, int]:
    """A conv option as (height, width); a conv1d's height entry is `height`."""
    return (height, as_tuple(value, 1)[0]) if one_dimensional else as_tuple(value, 2)  # type: ignore[return-value]


SplitAffine = SplitLinear | SplitConv


def split_affine(weight: torch.Tensor, bias: torch.Tensor | None, options: dict, linear: bool,
                 terms: int | None = None) -> SplitAffine | None:
    """The affine map (F.linear, or F.conv1d/conv2d with `options`) as a split one, or None where its
    dot products have at most `terms` terms already (or a convolution's group has one channel)."""
    terms = PARTIAL_SUM_TERMS if terms is None else terms
    if linear:
        return SplitLinear(weight, bias, terms) if weight.shape[1] > terms else None
    group_channels, taps = weight.shape[1], math.prod(weight.shape[2:])
    channels = max([c for c in range(1, group_channels + 1) if group_channels % c == 0 and c * taps <= terms],
                   default=1)
    return SplitConv(weight, bias, options, channels) if channels < group_channels else None


def split_error_factors(split: SplitAffine | None, terms: int, unit_roundoff: float) -> tuple[float, float]:
    """(coefficient of |W| |x| and |b|, coefficient of |y32|) of the output's rounding error
    (module docstring); for an unsplit map (None) of `terms`-term dot products, `(gamma_{terms+1}, 0)`."""
    if split is None:
        return gamma(terms + 1, unit_roundoff), 0.0
    partial = gamma(split.terms, unit_roundoff)
    summing = gamma(split.parts + 1, FLOAT64_UNIT_ROUNDOFF)
    return partial + summing * (1.0 + partial), unit_roundoff / (1.0 - unit_roundoff)
