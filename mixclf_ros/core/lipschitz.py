"""Sound upper bounds of a network's Lipschitz constant, layer by layer, in l2 and linf.

`logit_lipschitz_bound(model, norm, input_shape)` bounds the operator norm of the logits map,
`||z(x) - z(x')||_p <= L ||x - x'||_p` for all x, x' (p = `norm`, inputs in [0,1]-pixel units),
by the product of per-layer bounds along a chain of layers (composition: Lipschitz constants
multiply). The bound is for the model in eval mode, in exact arithmetic.

The walker only trusts structures whose forward it knows: `nn.Sequential` (forward not
overridden), `layers.Residual` and the leaf layers listed in `SUPPORTED_LAYERS` (matched by exact
type, so subclasses with a different forward are rejected). Anything else, and any module with
forward hooks, raises `UnsupportedLayerError` naming it: the walker never guesses. Layer input
shapes are tracked by running a dummy input through the chain.

Per-layer bounds (operator norm p -> p):
- Linear: l2 exact spectral norm (float64 SVD); linf exact max absolute row sum.
- Conv2d: l2 exact spectral norm of the circular convolution on the zero-padded canvas (FFT,
  Sedghi et al. 2019), an upper bound of the zero-padded and strided conv (see
  `conv2d_l2_bound`); linf max over output channels of the sum of |w| (each output pixel sums at
  most all its taps). groups and dilation supported; padding_mode must be "zeros".
- BatchNorm1d/2d (eval, running statistics): max |gamma / sqrt(var + eps)|.
- elementwise activations: sup |phi'| (ReLU, ReLU6, LeakyReLU, ELU, Tanh, Hardtanh, Softsign,
  Softplus: 1 (or the slope/alpha when larger than 1); Sigmoid: 1/4); GroupSort: 1.
- MaxPool1d/2d and adaptive versions: l2 sqrt(max number of windows containing one input pixel),
  linf 1 (|max a - max b| <= max |a - b|).
- AvgPool1d/2d and adaptive versions (non-negative linear maps A): l2 sqrt(||A||_1 ||A||_inf)
  (Riesz-Thorin), linf ||A||_inf, with the row/column sums computed exactly from the layer itself.
- Flatten, Unflatten, Identity, Dropout* (eval): 1. `layers.Normalize`: max 1/|std|.
- `layers.Residual(block)`: 1 + L(block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from mixclf_ros.core.certify import softmax_lipschitz_factor
from mixclf_ros.core.layers import GroupSort, Normalize, Residual

NORMS = ("l2", "linf")

NUMERIC_SLACK = 1e-9
"""Relative enlargement of bounds computed by SVD/FFT in float64 (their rounding error is ~1e-15)."""


class UnsupportedLayerError(ValueError):
    """The walker met a layer or structure whose Lipschitz constant it cannot soundly bound."""


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# ----------------------------------------------------------------------------- linear layers


def linear_bound(weight: torch.Tensor, norm: str) -> float:
    """Operator norm of `x -> W x` (W of shape (out, in)): l2 spectral norm, linf max row l1 sum."""
    _check_norm(norm)
    matrix = weight.detach().to(torch.float64)
    if norm == "l2":
        return float(torch.linalg.matrix_norm(matrix, ord=2)) * (1.0 + NUMERIC_SLACK)
    return float(matrix.abs().sum(dim=1).max()) * (1.0 + NUMERIC_SLACK)


def _conv_padding(conv: nn.Conv2d, kernel_extent: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0, 0, 0
        # "same": PyTorch puts the extra pixel (odd total) on the bottom/right.
        total_h, total_w = kernel_extent[0] - 1, kernel_extent[1] - 1
        return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2
    pad_h, pad_w = conv.padding
    return pad_h, pad_h, pad_w, pad_w


def circular_conv_spectral_norm(weight: torch.Tensor, canvas: tuple[int, int], groups: int = 1,
                                dilation: tuple[int, int] = (1, 1), frequency_chunk: int = 16) -> float:
    """Exact l2 operator norm of the circular 2-D convolution (cross-correlation) with `weight`
    (out, in/groups, kh, kw) on an `canvas = (n1, n2)` torus (Sedghi et al., 2019).

    The operator is block-circulant, diagonalised by the 2-D DFT: its singular values are those of
    the (out x in) matrices `W_hat(u, v) = sum_{a,b} W[:, :, a, b] exp(-2 pi i (u a / n1 + v b / n2))`
    over all frequencies, so the norm is `max_{u,v} sigma_max(W_hat(u, v))`. Real weights make
    `W_hat(-u,-v)` the conjugate of `W_hat(u,v)`, so half of the v range suffices. Groups make the
    operator block diagonal (maximum over groups). The DFT is evaluated on the kernel support
    only, in chunks of `frequency_chunk` rows u, to bound memory.
    """
    out_channels, in_per_group, kh, kw = weight.shape
    dh, dw = dilation
    n1, n2 = canvas
    extent_h, extent_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if n1 < extent_h or n2 < extent_w:
        raise ValueError(f"canvas {canvas} is smaller than the dilated kernel ({extent_h}, {extent_w})")
    w = weight.detach().to(torch.float64).reshape(groups, out_channels // groups, in_per_group, kh, kw)
    device = w.device
    tap_h = torch.arange(kh, device=device, dtype=torch.float64) * dh
    tap_w = torch.arange(kw, device=device, dtype=torch.float64) * dw
    freq_w = torch.arange(n2 // 2 + 1, device=device, dtype=torch.float64)
    phase_w = torch.exp(-2j * math.pi * torch.outer(freq_w, tap_w) / n2)  # (n2/2+1, kw)
    w_complex = w.to(torch.complex128)
    best = 0.0
    for start in range(0, n1, frequency_chunk):
        freq_h = torch.arange(start, min(start + frequency_chunk, n1), device=device, dtype=torch.float64)
        phase_h = torch.exp(-2j * math.pi * torch.outer(freq_h, tap_h) / n1)  # (chunk, kh)
        spectrum = torch.einsum("ua,goiab,vb->guvoi", phase_h, w_complex, phase_w)
        best = max(best, float(torch.linalg.matrix_norm(spectrum, ord=2).max()))
    return best * (1.0 + NUMERIC_SLACK)


def conv2d_l2_bound(conv: nn.Conv2d, input_hw: tuple[int, int]) -> float:
    """Sound l2 bound of a zero-padded (possibly strided/dilated/grouped) Conv2d on H x W inputs.

    Why it is an upper bound: let P be the zero-padded input on the canvas
    `(H + pad_top + pad_bottom) x (W + pad_left + pad_right)` and k the dilated kernel extent. The
    stride-1 conv output at (i, j) reads `P[i + a, j + b]` with `i + a <= n1 - 1` for every valid
    output, i.e. it coincides with the circular convolution on that canvas at those positions (no
    wrap-around happens there). So conv = restriction o circular conv o zero-embedding; embedding
    is an isometry and restricting to a subset of coordinates (valid outputs, and the stride's
    subsampling) has norm <= 1. Hence `||conv||_2 <= ||circular conv||_2`, computed exactly by
    `circular_conv_spectral_norm`. (The canvas is always >= the kernel extent, so the circular
    conv does not alias the kernel.)
    """
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported")
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    extent = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    top, bottom, left, right = _conv_padding(conv, extent)
    canvas = (input_hw[0] + top + bottom, input_hw[1] + left + right)
    return circular_conv_spectral_norm(conv.weight, canvas, conv.groups, conv.dilation)


def conv_linf_bound(weight: torch.Tensor) -> float:
    """linf operator norm bound of a convolution: max over output channels of sum |w| (the row sum
    of an interior output pixel; border pixels have fewer taps)."""
    w = weight.detach().to(torch.float64)
    return float(w.abs().flatten(1).sum(dim=1).max()) * (1.0 + NUMERIC_SLACK)


# ----------------------------------------------------------------------------- pooling


def _window_counts_1d(length: int, out_length: int, window_of: Callable[[int], Sequence[int]]) -> int:
    """Largest number of windows (over the `out_length` outputs) containing one input position."""
    counts = [0] * length
    for index in range(out_length):
        for position in window_of(index):
            if 0 <= position < length:
                counts[position] += 1
    return max(counts) if counts else 0


def _as_tuple(value: int | Sequence[int] | None, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def _max_pool_overlap(module: nn.Module, x: torch.Tensor, out: torch.Tensor, dims: int) -> int:
    """Max number of pooling windows that contain one input position (product over dims)."""
    in_sizes, out_sizes = x.shape[-dims:], out.shape[-dims:]
    total = 1
    if isinstance(module, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d):
        for length, out_length in zip(in_sizes, out_sizes):
            def window(i: int, length: int = length, out_length: int = out_length) -> range:
                return range((i * length) // out_length, -((-(i + 1) * length) // out_length))
            total *= _window_counts_1d(length, out_length, window)
        return total
    kernel = _as_tuple(module.kernel_size, dims)
    stride = _as_tuple(module.stride if module.stride is not None else module.kernel_size, dims)
    padding = _as_tuple(module.padding, dims)
    dilation = _as_tuple(module.dilation, dims)
    for d, (length, out_length) in enumerate(zip(in_sizes, out_sizes)):
        def window(i: int, d: int = d) -> list[int]:
            return [i * stride[d] - padding[d] + j * dilation[d] for j in range(kernel[d])]
        total *= _window_counts_1d(length, out_length, window)
    return total


def _nonnegative_linear_norms(module: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(||A||_1, ||A||_inf) of a non-negative linear map A (average pooling), computed exactly:
    the max column sum is max(A^T 1), the max row sum is max(A 1)."""
    ones = torch.ones(x.shape, dtype=torch.float64, device=x.device, requires_grad=True)
    with torch.enable_grad():
        row_sums = module(ones)
        (column_sums,) = torch.autograd.grad(row_sums.sum(), ones)
    return float(column_sums.max()), float(row_sums.detach().max())


# ----------------------------------------------------------------------------- the walker

_ELEMENTWISE_CONSTANTS: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: lambda m: 1.0,
    nn.ReLU6: lambda m: 1.0,
    nn.Tanh: lambda m: 1.0,
    nn.Hardtanh: lambda m: 1.0,
    nn.Softsign: lambda m: 1.0,
    nn.Softplus: lambda m: 1.0,  # derivative sigmoid(beta x) <= 1 for any beta
    nn.Sigmoid: lambda m: 0.25,
    nn.LeakyReLU: lambda m: max(1.0, abs(float(m.negative_slope))),
    nn.ELU: lambda m: max(1.0, abs(float(m.alpha))),  # derivative alpha e^x < alpha for x < 0
    GroupSort: lambda m: 1.0,
}

_SHAPE_OR_IDENTITY = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                      nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


_LEAF_TYPES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, Normalize, *_ELEMENTWISE_CONSTANTS,
               *_SHAPE_OR_IDENTITY, *_MAX_POOLS, *_AVG_POOLS)


def _layer_type(module: nn.Module) -> type:
    """The layer's class; for a layer with `torch.nn.utils.parametrize` parametrizations (e.g. the
    new-style spectral_norm or weight_norm), the original class: parametrize only swaps the class
    for a generated subclass whose weight is computed on access, the forward is the original one."""
    kind = type(module)
    if parametrize.is_parametrized(module) and len(kind.__bases__) == 1:
        base = kind.__bases__[0]
        if kind.__name__ == f"Parametrized{base.__name__}" and kind.forward is base.forward:
            return base
    return kind


def _check_leaf(module: nn.Module, name: str) -> None:
    """Refuses a leaf before it is run: unknown type or a configuration that is not bounded."""
    kind = _layer_type(module)
    if kind not in _LEAF_TYPES:
        raise UnsupportedLayerError(f"{name}: unsupported layer {kind.__module__}.{kind.__qualname__}")
    if kind is nn.Conv2d and module.padding_mode != "zeros":
        raise UnsupportedLayerError(f"{name}: Conv2d padding_mode={module.padding_mode!r} is not supported")
    batch_statistics = (not getattr(module, "track_running_stats", True)
                        or getattr(module, "running_var", 0) is None)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d) and batch_statistics:
        raise UnsupportedLayerError(f"{name}: BatchNorm without running statistics uses batch statistics")
    if kind in _MAX_POOLS and getattr(module, "return_indices", False):
        raise UnsupportedLayerError(f"{name}: max pooling with return_indices")


def _leaf_bound(module: nn.Module, x: torch.Tensor, out: torch.Tensor, norm: str, name: str) -> float:
    kind = _layer_type(module)
    if kind is nn.Linear:
        return linear_bound(module.weight, norm)
    if kind is nn.Conv2d:
        if norm == "linf":
            return conv_linf_bound(module.weight)
        return conv2d_l2_bound(module, (x.shape[-2], x.shape[-1]))
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        scale = 1.0 / torch.sqrt(module.running_var.detach().double() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach().double()
        return float(scale.abs().max()) * (1.0 + NUMERIC_SLACK)
    if kind in _ELEMENTWISE_CONSTANTS:
        return _ELEMENTWISE_CONSTANTS[kind](module)
    if kind in _SHAPE_OR_IDENTITY:
        return 1.0
    if kind is Normalize:
        return module.lipschitz_constant() * (1.0 + NUMERIC_SLACK)
    if kind in _MAX_POOLS:
        if norm == "linf":
            return 1.0
        return math.sqrt(_max_pool_overlap(module, x, out, _MAX_POOLS[kind]))
    if kind in _AVG_POOLS:
        column_max, row_max = _nonnegative_linear_norms(module, x)
        bound = math.sqrt(column_max * row_max) if norm == "l2" else row_max
        return bound * (1.0 + NUMERIC_SLACK)
    raise UnsupportedLayerError(f"{name}: unsupported layer {kind.__module__}.{kind.__qualname__}")


def _check_no_hooks(module: nn.Module, name: str) -> None:
    if module._forward_hooks or module._forward_pre_hooks:
        raise UnsupportedLayerError(f"{name}: has forward hooks that may change its output")


def _walk(module: nn.Module, x: torch.Tensor, norm: str, name: str) -> tuple[float, torch.Tensor]:
    """(Lipschitz bound, output) of `module` at the dummy input `x`."""
    _check_no_hooks(module, name)
    kind = type(module)
    if isinstance(module, nn.Sequential):
        if kind.forward is not nn.Sequential.forward:
            raise UnsupportedLayerError(f"{name}: {kind.__qualname__} overrides Sequential.forward")
        bound = 1.0
        for child_name, child in module.named_children():
            child_bound, x = _walk(child, x, norm, f"{name}.{child_name}")
            bound *= child_bound
        return bound, x
    if kind is Residual:
        block_bound, block_out = _walk(module.block, x, norm, f"{name}.block")
        if block_out.shape != x.shape:
            raise UnsupportedLayerError(f"{name}: residual block changes the shape")
        return 1.0 + block_bound, x + block_out
    children = [child_name for child_name, _ in module.named_children()]
    if parametrize.is_parametrized(module) and children == ["parametrizations"]:
        children = []
    if children:
        raise UnsupportedLayerError(
            f"{name}: container {kind.__qualname__} with a custom forward cannot be walked soundly")
    _check_leaf(module, name)
    out = module(x)
    if not isinstance(out, torch.Tensor):
        raise UnsupportedLayerError(f"{name}: {kind.__qualname__} does not return a tensor")
    return _leaf_bound(module, x, out, norm, name), out


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def logit_lipschitz_bound(model: nn.Module, norm: str, input_shape: Sequence[int]) -> float:
    """Sound upper bound of the logits' Lipschitz constant, operator norm `norm` -> `norm`.

    Args:
        model: a chain the walker understands (see the module docstring), taking (N, *input_shape)
            inputs in [0,1]-pixel units. Evaluated in eval mode (its modes are restored after).
        norm: "l2" or "linf".
        input_shape: (C, H, W) (or (features,)) without the batch dimension.

    Returns:
        L with `||z(x) - z(x')||_norm <= L ||x - x'||_norm` for all inputs (eval mode, exact
        arithmetic). Raises `UnsupportedLayerError` naming the first layer it cannot bound.
    """
    _check_norm(norm)
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        raise UnsupportedLayerError("global forward hooks are registered; they may change outputs")
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), None)
    dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    dummy = torch.rand((1, *input_shape), generator=generator, dtype=torch.float64)
    dummy = dummy.to(device=device, dtype=dtype)
    with _eval_mode(model), torch.no_grad():
        bound, walked = _walk(model, dummy, norm, type(model).__qualname__)
        direct = model(dummy)
    if not isinstance(direct, torch.Tensor) or direct.shape != walked.shape or not torch.allclose(
            direct, walked, rtol=1e-4, atol=1e-5):
        raise UnsupportedLayerError("the model's forward does not match the chain of its layers")
    return bound


def probability_lipschitz_bound(model: nn.Module, norm: str, input_shape: Sequence[int]) -> float:
    """Per-class Lipschitz bound of the softmax probability outputs `Lip_p(h_i)` (Theorem 1),
    in `norm`, [0,1]-pixel units: `logit_lipschitz_bound * certify.softmax_lipschitz_factor(norm)`."""
    return logit_lipschitz_bound(model, norm, input_shape) * softmax_lipschitz_factor(norm)


# ----------------------------------------------------------------------------- test helper


def jacobian_norm_lower_bound(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, norm: str,
                              iters: int = 30) -> float:
    """An empirical LOWER bound of the Lipschitz constant (for tests): the largest local operator
    norm `||J(x_n)||_{norm -> norm}` of the logits' Jacobian over the batch x.

    linf: exact, `max_i ||grad z_i(x_n)||_1` (one backward pass per class). l2: the larger of the
    largest row norm `max_i ||grad z_i||_2` and a power-iteration estimate `||J v|| / ||v||`, both
    of which are <= sigma_max(J). Requires samples to be processed independently (eval mode).
    """
    _check_norm(norm)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        flat_out = out.reshape(out.shape[0], -1)
        row_norms = []
        for i in range(flat_out.shape[1]):
            (grad,) = torch.autograd.grad(flat_out[:, i].sum(), x, retain_graph=True)
            row_norms.append(grad.flatten(1).norm(p=1 if norm == "linf" else 2, dim=1))
        best = float(torch.stack(row_norms, dim=1).max())
        if norm == "linf":
            return best
        generator = torch.Generator(device=x.device).manual_seed(0)
        v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        for _ in range(iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
            _, jv = torch.func.jvp(model, (x.detach(),), (v,))
            (jtjv,) = torch.autograd.grad(out, x, grad_outputs=jv, retain_graph=True)
            estimate = jv.flatten(1).norm(dim=1)
            best = max(best, float(estimate.detach().max()))
            v = jtjv
    return best
