"""Sound per-operation bounds of operator norms (p -> p, p = l2 or linf), from the actual weights.

Used by the bound engine's rules (`rules_*`), which compose them over a traced graph. Every bound here is
an upper bound of the exact operator (or Lipschitz) norm, in exact arithmetic; values computed in
float64 are enlarged by `NUMERIC_SLACK`.

- Linear `x -> W x`: l2 spectral norm (`spectral_norms.spectral_norm_bound`: an upper bound proved
  in floating point, within 1e-9 of the exact norm); linf exact max absolute row sum.
- Conv2d: l2 spectral norm of the circular convolution on the zero-padded canvas (its spectrum,
  Sedghi et al. 2019, bounded by `spectral_norms.circular_conv_norm_bound` like a dense layer's),
  an upper bound of the zero-padded and strided conv (`conv2d_l2_bound`);
  linf max over output channels of the sum of |w| (each output pixel sums at most all its taps).
- BatchNorm (eval, running statistics): max |gamma / sqrt(var + eps)|.
- elementwise activations: sup |phi'| (`ACTIVATION_CONSTANTS`); an elementwise map with
  per-coordinate constant c has operator norm <= c in every lp norm.
- Max pooling: l2 sqrt(max number of windows containing one input pixel), linf 1.
- Average pooling (non-negative linear maps A): l2 sqrt(||A||_1 ||A||_inf) (Riesz-Thorin), linf
  ||A||_inf, with the row/column sums computed exactly from the layer itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixclf_ros.core.bound_rules import UnsupportedLayerError
from mixclf_ros.core.certify import NORMS
from mixclf_ros.core.layers import GroupSort
from mixclf_ros.core.spectral_norms import circular_conv_norm_bound, spectral_norm_bound

NUMERIC_SLACK = 1e-9
"""Relative enlargement of bounds computed in float64 (their rounding error is ~1e-15; the spectral
norms' own rounding is bounded in `spectral_norms`, this slack comes on top)."""


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# ----------------------------------------------------------------------------- linear maps


def linear_bound(weight: torch.Tensor, norm: str) -> float:
    """Operator norm of `x -> W x` (W of shape (out, in)): l2 spectral norm (a sound upper bound
    within 1e-9 relative, `spectral_norm_bound`), linf max row l1 sum."""
    check_norm(norm)
    matrix = weight.detach().to(torch.float64)
    if norm == "l2":
        return spectral_norm_bound(matrix) * (1.0 + NUMERIC_SLACK)
    return float(matrix.abs().sum(dim=1).max()) * (1.0 + NUMERIC_SLACK)


def conv_padding(padding: str | int | Sequence[int], kernel_extent: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a 2-D convolution with `padding` (as Conv2d takes it)."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        # "same": PyTorch puts the extra pixel (odd total) on the bottom/right.
        total_h, total_w = kernel_extent[0] - 1, kernel_extent[1] - 1
        return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return pad_h, pad_h, pad_w, pad_w


def circular_conv_spectral_norm(weight: torch.Tensor, canvas: tuple[int, int], groups: int = 1,
                                dilation: tuple[int, int] = (1, 1), *, at_most: float = math.inf) -> float:
    """l2 operator norm of the circular 2-D convolution (cross-correlation) with `weight`
    (out, in/groups, kh, kw) on an `canvas = (n1, n2)` torus (Sedghi et al., 2019): a sound upper
    bound, within about 1e-9 relative of the exact norm; or `at_most`, another bound of the caller's,
    where that is smaller (computing stops as soon as the norm is found above it).

    The operator is block-circulant, diagonalised by the 2-D DFT: its singular values are those of
    the (out x in) matrices `W_hat(u, v) = sum_{a,b} W[:, :, a, b] exp(-2 pi i (u a / n1 + v b / n2))`
    over all frequencies, so the norm is `max_{u,v} sigma_max(W_hat(u, v))`; groups make the
    operator block diagonal (maximum over groups). `spectral_norms.circular_conv_norm_bound` bounds
    that maximum (Gram matrices of the spectrum, certified by Cholesky factorisations).
    """
    kh, kw = weight.shape[-2:]
    dh, dw = dilation
    extent_h, extent_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if canvas[0] < extent_h or canvas[1] < extent_w:
        raise ValueError(f"canvas {canvas} is smaller than the dilated kernel ({extent_h}, {extent_w})")
    bound = circular_conv_norm_bound(weight, canvas, groups, dilation, at_most=at_most / (1.0 + NUMERIC_SLACK))
    return min(bound * (1.0 + NUMERIC_SLACK), at_most)


def strided_circular_conv_spectral_norm(weight: torch.Tensor, canvas: tuple[int, int], stride: tuple[int, int],
                                        groups: int = 1) -> float | None:
    """l2 operator norm of the circular convolution with `weight` (dilation 1) on the `canvas`
    torus, sampled every `stride` outputs (a sound upper bound, within about 1e-9 relative); None
    where a canvas side is not a multiple of the stride.

    Polyphase decomposition: output i reads `x[s i + a]`; with `a = s a' + r` that is
    `X_r[i + a']`, where `X_r[m] = x[s m + r]` is the r-th phase of x on the `canvas / s` torus.
    Rearranging x into its s1 s2 phases (as extra channels) permutes coordinates, an isometry, so
    the strided convolution has the norm of the stride-1 circular convolution with the rearranged
    kernel `W'[o, (c, r1, r2), a1', a2'] = W[o, c, s1 a1' + r1, s2 a2' + r2]` on the smaller torus
    (`circular_conv_spectral_norm`)."""
    (s1, s2), (n1, n2) = stride, canvas
    if n1 % s1 or n2 % s2:
        return None
    out_channels, in_per_group, kh, kw = weight.shape
    kh2, kw2 = -(-kh // s1), -(-kw // s2)
    padded = weight.new_zeros(out_channels, in_per_group, kh2 * s1, kw2 * s2)
    padded[:, :, :kh, :kw] = weight
    phases = padded.reshape(out_channels, in_per_group, kh2, s1, kw2, s2).permute(0, 1, 3, 5, 2, 4)
    rearranged = phases.reshape(out_channels, in_per_group * s1 * s2, kh2, kw2)
    if n1 // s1 < kh2 or n2 // s2 < kw2:
        return None
    return circular_conv_spectral_norm(rearranged, (n1 // s1, n2 // s2), groups)


def circular_conv_l2_bound(weight: torch.Tensor, canvas: tuple[int, int], groups: int, dilation: tuple[int, int],
                           stride: tuple[int, int], strided_canvas: tuple[int, int] | None = None) -> float:
    """Sound l2 bound of the circular convolution with `weight` on the `canvas` torus, sampled every
    `stride` outputs: its stride-1 norm (restricting outputs does not increase it), and with a stride
    and no dilation the smaller of that and the strided norm on `strided_canvas` (default `canvas`;
    `strided_circular_conv_spectral_norm`), computed first: the stride-1 norm's computation stops as
    soon as it is found larger."""
    strided = None
    if tuple(stride) != (1, 1) and tuple(dilation) == (1, 1):
        strided = strided_circular_conv_spectral_norm(weight, strided_canvas or canvas, stride, groups)
    return circular_conv_spectral_norm(weight, canvas, groups, dilation,
                                       at_most=math.inf if strided is None else strided)


def conv2d_weight_l2_bound(weight: torch.Tensor, input_hw: tuple[int, int], padding: str | int | Sequence[int],
                           dilation: int | Sequence[int] = 1, groups: int = 1,
                           stride: int | Sequence[int] = 1) -> float:
    """Sound l2 bound of a zero-padded (possibly strided/dilated/grouped) 2-D convolution with
    `weight` on H x W inputs: the norm of the circular convolution on the padded canvas (see
    `conv2d_l2_bound`); with a stride and no dilation, the smaller of that and the strided
    circular norm on the canvas enlarged to a multiple of the stride (more zeros: still no
    wrap-around; `circular_conv_l2_bound`), which is tight for strided orthogonal convolutions."""
    kh, kw = weight.shape[-2:]
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    extent = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    top, bottom, left, right = conv_padding(padding, extent)
    canvas = (input_hw[0] + top + bottom, input_hw[1] + left + right)
    s1, s2 = as_tuple(stride, 2)
    enlarged = (-(-canvas[0] // s1) * s1, -(-canvas[1] // s2) * s2)
    return circular_conv_l2_bound(weight, canvas, groups, (dh, dw), (s1, s2), enlarged)


def conv2d_l2_bound(conv: nn.Conv2d, input_hw: tuple[int, int]) -> float:
    """Sound l2 bound of a zero-padded (possibly strided/dilated/grouped) Conv2d on H x W inputs.

    Why it is an upper bound: let P be the zero-padded input on the canvas
    `(H + pad_top + pad_bottom) x (W + pad_left + pad_right)` and k the dilated kernel extent. The
    stride-1 conv output at (i, j) reads `P[i + a, j + b]` with `i + a <= n1 - 1` for every valid
    output, i.e. it coincides with the circular convolution on that canvas at those positions (no
    wrap-around happens there). So conv = restriction o circular conv o zero-embedding; embedding
    is an isometry and restricting to a subset of coordinates (valid outputs, and the stride's
    subsampling) has norm <= 1. Hence `||conv||_2 <= ||circular conv||_2`, bounded by
    `circular_conv_spectral_norm`. (The canvas is always >= the kernel extent, so the circular
    conv does not alias the kernel.)
    """
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported")
    return conv2d_weight_l2_bound(conv.weight, input_hw, conv.padding, conv.dilation, conv.groups, conv.stride)


def magnitude_l2_bound(weight: torch.Tensor, groups: int = 1, stride: Sequence[int] = (1, 1),
                       dilation: Sequence[int] = (1, 1)) -> float:
    """Sound l2 bound of the map with the non-negative weight |W|: a dense layer's spectral norm,
    or a convolution's (any padding, any 1-D or 2-D kernel) from one small matrix per group.

    Why: a circular convolution with a non-negative kernel K has spectrum `K_hat(u, v)` with
    `|K_hat(u, v)| <= K_hat(0, 0)` entrywise, and an entrywise-dominated matrix has no larger
    spectral norm, so its norm is `sigma_max` of the kernel's sum over its taps (frequency zero,
    Sedghi et al. 2019); the zero-padded, strided convolution is a restriction of it on a large
    enough canvas (`conv2d_l2_bound`), and with a stride and no dilation, the polyphase kernel
    (`strided_circular_conv_spectral_norm`) gives the smaller of the two. Used for the rounding
    error `gamma || |W| |x| ||_2`, where it is 1.2-2.4 times below Schur's test on the zoo."""
    magnitude = weight.detach().to(torch.float64).abs()
    if magnitude.dim() == 2:
        return spectral_norm_bound(magnitude) * (1.0 + NUMERIC_SLACK)
    out_channels = magnitude.shape[0]

    def tap_sums(kernel: torch.Tensor) -> torch.Tensor:  # (groups, out / groups, in / groups)
        return kernel.flatten(2).sum(dim=2).reshape(groups, out_channels // groups, -1)

    candidates = [tap_sums(magnitude)]
    steps = tuple(stride)
    if any(step > 1 for step in steps) and all(d == 1 for d in dilation):
        kernel = magnitude if magnitude.dim() == 4 else magnitude.unsqueeze(2)
        s1, s2 = (steps[0], steps[1]) if len(steps) == 2 else (1, steps[0])
        kh2, kw2 = -(-kernel.shape[2] // s1), -(-kernel.shape[3] // s2)
        padded = kernel.new_zeros(*kernel.shape[:2], kh2 * s1, kw2 * s2)
        padded[:, :, :kernel.shape[2], :kernel.shape[3]] = kernel
        phases = padded.reshape(*kernel.shape[:2], kh2, s1, kw2, s2).sum(dim=(2, 4))  # (out, in, s1, s2)
        candidates.append(phases.reshape(groups, out_channels // groups, -1))
    return min(spectral_norm_bound(matrix) for matrix in candidates) * (1.0 + NUMERIC_SLACK)


def conv_linf_bound(weight: torch.Tensor) -> float:
    """linf operator norm bound of a convolution: max over output channels of sum |w| (the row sum
    of an interior output pixel; border pixels have fewer taps)."""
    w = weight.detach().to(torch.float64)
    return float(w.abs().flatten(1).sum(dim=1).max()) * (1.0 + NUMERIC_SLACK)


def batch_norm_bound(running_var: torch.Tensor, weight: torch.Tensor | None, eps: float) -> float:
    """Eval-mode batch norm is the diagonal map `x_c -> gamma_c (x_c - mu_c) / sqrt(var_c + eps)`:
    `max_c |gamma_c| / sqrt(var_c + eps)` in every lp norm."""
    scale = 1.0 / torch.sqrt(running_var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    return float(scale.abs().max()) * (1.0 + NUMERIC_SLACK)


# ----------------------------------------------------------------------------- activations


def smooth_derivative_sup(function: Callable[[torch.Tensor], torch.Tensor], margin: float = 1e-3) -> float:
    """sup |f'| of a smooth scalar activation, for those whose derivative tends to 0 or 1 outside
    [-40, 40] monotonically (GELU, SiLU, Mish): max of |f'| (autograd, float64) on a 1e-4 grid of
    [-40, 40] plus `margin`, which exceeds the grid error `h/2 sup|f''|` (sup|f''| < 1 for these)."""
    grid = torch.arange(-400000, 400001, dtype=torch.float64) * 1e-4
    grid.requires_grad_(True)
    with torch.enable_grad():
        (derivative,) = torch.autograd.grad(function(grid).sum(), grid)
    return float(derivative.abs().max()) + margin


_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717
_SUP_CACHE: dict[str, float] = {}


def _cached_sup(key: str, function: Callable[[torch.Tensor], torch.Tensor]) -> float:
    if key not in _SUP_CACHE:
        _SUP_CACHE[key] = smooth_derivative_sup(function)
    return _SUP_CACHE[key]


def gelu_constant(approximate: str = "none") -> float:
    if approximate not in ("none", "tanh"):
        raise UnsupportedLayerError(f"GELU approximate={approximate!r} is not supported")
    return _cached_sup(f"gelu-{approximate}", lambda t: nn.functional.gelu(t, approximate=approximate))


def silu_constant() -> float:
    return _cached_sup("silu", nn.functional.silu)


def mish_constant() -> float:
    return _cached_sup("mish", nn.functional.mish)


def elu_constant(alpha: float) -> float:
    """ELU: slope 1 for x > 0, `alpha e^x` (magnitude < |alpha|) for x < 0."""
    return max(1.0, abs(float(alpha)))


def celu_constant(alpha: float) -> float:
    """CELU: slope 1 for x > 0, `e^{x/alpha}` <= 1 for x < 0 (alpha > 0)."""
    if not float(alpha) > 0:
        raise UnsupportedLayerError(f"CELU with alpha={alpha} is not supported")
    return 1.0


SELU_CONSTANT = _SELU_SCALE * max(1.0, _SELU_ALPHA)
"""SELU: `scale` for x > 0, `scale alpha e^x` < scale alpha for x < 0."""

ACTIVATION_CONSTANTS: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: lambda m: 1.0,
    nn.ReLU6: lambda m: 1.0,
    nn.Tanh: lambda m: 1.0,
    nn.Hardtanh: lambda m: 1.0,
    nn.Softsign: lambda m: 1.0,
    nn.Softplus: lambda m: 1.0,  # derivative sigmoid(beta x) <= 1 for any beta
    nn.LogSigmoid: lambda m: 1.0,  # derivative 1 - sigmoid(x) in (0, 1)
    nn.Tanhshrink: lambda m: 1.0,  # derivative tanh(x)^2 < 1
    nn.Softshrink: lambda m: 1.0,
    nn.Sigmoid: lambda m: 0.25,
    nn.Hardsigmoid: lambda m: 1.0 / 6.0,
    nn.Hardswish: lambda m: 1.5,  # derivative (2x + 3) / 6 on (-3, 3)
    nn.LeakyReLU: lambda m: max(1.0, abs(float(m.negative_slope))),
    nn.ELU: lambda m: elu_constant(m.alpha),
    nn.CELU: lambda m: celu_constant(m.alpha),
    nn.SELU: lambda m: SELU_CONSTANT,
    nn.GELU: lambda m: gelu_constant(m.approximate),
    nn.SiLU: lambda m: silu_constant(),
    nn.Mish: lambda m: mish_constant(),
    nn.PReLU: lambda m: max(1.0, float(m.weight.detach().double().abs().max())),
    GroupSort: lambda m: 1.0,  # piecewise a permutation, continuous
}

# ----------------------------------------------------------------------------- pooling


def _window_counts_1d(length: int, out_length: int, window_of: Callable[[int], Sequence[int]]) -> int:
    """Largest number of windows (over the `out_length` outputs) containing one input position."""
    counts = [0] * length
    for index in range(out_length):
        for position in window_of(index):
            if 0 <= position < length:
                counts[position] += 1
    return max(counts) if counts else 0


def as_tuple(value: int | Sequence[int] | None, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def max_pool_overlap(module: nn.Module, x: torch.Tensor, out: torch.Tensor, dims: int) -> int:
    """Max number of pooling windows that contain one input position (product over dims)."""
    in_sizes, out_sizes = x.shape[-dims:], out.shape[-dims:]
    total = 1
    if isinstance(module, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d):
        for length, out_length in zip(in_sizes, out_sizes):
            def window(i: int, length: int = length, out_length: int = out_length) -> range:
                return range((i * length) // out_length, -((-(i + 1) * length) // out_length))
            total *= _window_counts_1d(length, out_length, window)
        return total
    kernel = as_tuple(module.kernel_size, dims)
    stride = as_tuple(module.stride if module.stride else module.kernel_size, dims)
    padding = as_tuple(module.padding, dims)
    dilation = as_tuple(module.dilation, dims)
    for d, (length, out_length) in enumerate(zip(in_sizes, out_sizes)):
        def window(i: int, d: int = d) -> list[int]:
            return [i * stride[d] - padding[d] + j * dilation[d] for j in range(kernel[d])]
        total *= _window_counts_1d(length, out_length, window)
    return total


def nonnegative_linear_norms(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[float, float]:
    """(||A||_1, ||A||_inf) of a non-negative linear map A (average pooling), computed exactly:
    the max column sum is max(A^T 1), the max row sum is max(A 1)."""
    ones = torch.ones(x.shape, dtype=torch.float64, device=x.device, requires_grad=True)
    with torch.enable_grad():
        row_sums = module(ones)
        (column_sums,) = torch.autograd.grad(row_sums.sum(), ones)
    return float(column_sums.max()), float(row_sums.detach().max())


MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2}
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def pool_bound(module: nn.Module, x: torch.Tensor, out: torch.Tensor, norm: str) -> float:
    kind = type(module)
    if kind in MAX_POOLS:
        if getattr(module, "return_indices", False):
            raise UnsupportedLayerError("max pooling with return_indices")
        return 1.0 if norm == "linf" else math.sqrt(max_pool_overlap(module, x, out, MAX_POOLS[kind]))
    column_max, row_max = nonnegative_linear_norms(module, x)
    bound = math.sqrt(column_max * row_max) if norm == "l2" else row_max
    return bound * (1.0 + NUMERIC_SLACK)
