"""Floating-point soundness of the robust model's forward pass.

Theorem 1 holds for the exact function h; the node evaluates a floating-point approximation of
it. Near the alpha threshold the numerator `alpha (h_y - h_i) + alpha - 1` is tiny, and float32
rounding (1e-7 relative) can be larger than it. Two tools close that gap:

- `full_precision()`: a scope in which TF32 and the other reduced-precision float32 paths of
  cuBLAS, cuDNN and oneDNN are off (IEEE float32), restored afterwards;
- `ErrorBoundedForward`: the robust network evaluated (in float64 for the certificate) together
  with a rigorous bound of that evaluation's rounding error, propagated layer by layer (running
  error analysis, Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3): for an affine
  layer `y = W x + b` with n-term dot products, `|fl(W x + b) - (W x + b)| <= gamma_{n+1}
  (|W| |x| + |b|)` (any summation order, FMA or not), with `gamma_k = k u / (1 - k u)` and `u` the
  unit roundoff; an error `E` already in x reaches y as at most `|W| E`. The logit error bound
  becomes a bound of the probability error (softmax: `|d p_i| <= max_j |d z_j| / 2`), which
  `certify.lipschitz_radius(..., probability_error=...)` subtracts from the margin.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core.layers import GroupSort, Normalize, Residual

BOUND_SLACK = 1.01
"""Factor on every propagated error bound: covers the rounding of the bound's own float
arithmetic (relative `gamma_n`, below 1e-3 for the dot-product lengths met here, even in float32)."""


# ----------------------------------------------------------------------------- precision scope


def _precision_settings() -> list[tuple[str, object, str, object]]:
    """(label, owner, attribute, full-precision value) for every reduced-precision switch."""
    backends = torch.backends
    owners = {"cuda.matmul": backends.cuda.matmul, "cudnn.conv": backends.cudnn.conv,
              "cudnn.rnn": backends.cudnn.rnn, "mkldnn.matmul": backends.mkldnn.matmul,
              "mkldnn.conv": backends.mkldnn.conv, "mkldnn.rnn": getattr(backends.mkldnn, "rnn", None)}
    settings = [(f"{label}.fp32_precision", owner, "fp32_precision", "ieee")
                for label, owner in owners.items() if owner is not None and hasattr(owner, "fp32_precision")]
    if not settings:  # older torch: the legacy switches
        settings = [("cuda.matmul.allow_tf32", backends.cuda.matmul, "allow_tf32", False),
                    ("cudnn.allow_tf32", backends.cudnn, "allow_tf32", False)]
    for name in ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction"):
        settings.append((f"cuda.matmul.{name}", backends.cuda.matmul, name, False))
    return settings


def precision_flags() -> dict[str, object]:
    """The current values of the switches `full_precision` sets, by name (for logs and tests)."""
    return {label: getattr(owner, attribute) for label, owner, attribute, _ in _precision_settings()}


def full_precision_flags() -> dict[str, object]:
    """The values `precision_flags()` has inside `full_precision()`."""
    return {label: value for label, _, _, value in _precision_settings()}


@contextmanager
def full_precision() -> Iterator[None]:
    """Runs the body with TF32 and reduced-precision reductions off (IEEE float32 everywhere):
    `fp32_precision = "ieee"` for cuBLAS matmul, cuDNN conv/RNN and oneDNN, no fp16/bf16
    reduced-precision reductions. The previous values are restored on exit, also on error.

    These are process-global torch switches, not per-thread or per-stream: a model running in
    another thread at the same time also sees them. The node runs all inference in one worker
    thread, so within it the robust pass gets full precision and the standard model, run outside
    the scope, keeps its fast paths (TF32, fp16). The switches are read when a kernel is launched,
    so work queued on a CUDA stream inside the scope keeps its precision after the scope ends.
    """
    settings = _precision_settings()
    saved = [(owner, attribute, getattr(owner, attribute)) for _, owner, attribute, _ in settings]
    try:
        for _, owner, attribute, value in settings:
            setattr(owner, attribute, value)
        yield
    finally:
        for owner, attribute, value in reversed(saved):
            setattr(owner, attribute, value)


# ----------------------------------------------------------------------------- error-bounded forward


class UnboundedForwardError(ValueError):
    """The network contains a structure whose rounding error this module cannot bound."""


def _gamma(count: int, unit_roundoff: float) -> float:
    product = count * unit_roundoff
    if product >= 0.5:
        raise UnboundedForwardError(f"dot products of length {count} are too long for this precision")
    return product / (1.0 - product)


def _check_plain(module: nn.Module, name: str) -> None:
    if "forward" in vars(module):
        raise UnboundedForwardError(f"{name}: forward replaced on the instance")
    if (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks):
        raise UnboundedForwardError(f"{name}: forward hooks are not supported")


class ErrorBoundedForward:
    """The logits of `network` in `dtype`, with a componentwise bound of their rounding error.

    Args:
        network: the robust model's chain of layers ([0,1] pixels -> logits). A copy is kept in
            `dtype` (float64 for certificates: weights cast once, exactly), in eval mode.
        dtype: torch.float64 (certificates) or torch.float32 (tests of the bound itself).

    Supported: `nn.Sequential`, `layers.Residual`, `layers.Normalize`, Linear, Conv1d/2d
    (zero padding), ReLU, ReLU6, Hardtanh, LeakyReLU, MaxPool1d/2d, AvgPool1d/2d,
    AdaptiveAvgPool2d, Flatten, Unflatten, Identity, Dropout (eval), `layers.GroupSort`; matched by
    exact type, without hooks or instance-level forward overrides. The layers are evaluated by this
    class with the functional ops (the bound is for what it computes). Anything else raises
    `UnboundedForwardError` at construction.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.unit_roundoff = torch.finfo(dtype).eps / 2.0
        self.network = copy.deepcopy(network).to(dtype).eval()
        self.network.requires_grad_(False)
        self._check(self.network, "model")
        self._absolute = self._absolute_parameters()

    def to(self, device: torch.device | str) -> ErrorBoundedForward:
        self.network.to(device)
        self._absolute = self._absolute_parameters()
        return self

    def _absolute_parameters(self) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """(|W|, |b|) of every affine layer, by module id: computed once, not per frame."""
        return {id(module): (module.weight.abs(), None if module.bias is None else module.bias.abs())
                for module in self.network.modules() if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d)}

    def _check(self, module: nn.Module, name: str) -> None:
        _check_plain(module, name)
        kind = type(module)
        if kind in (nn.Sequential,):
            for child_name, child in module.named_children():
                self._check(child, f"{name}.{child_name}")
        elif kind is Residual:
            self._check(module.block, f"{name}.block")
        elif kind in (nn.Conv1d, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise UnboundedForwardError(f"{name}: padding_mode {module.padding_mode!r} is not supported")
        elif kind in (nn.MaxPool1d, nn.MaxPool2d):
            if module.return_indices:
                raise UnboundedForwardError(f"{name}: return_indices is not supported")
        elif kind not in (nn.Linear, Normalize, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.AvgPool1d,
                          nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout,
                          nn.Dropout1d, nn.Dropout2d, GroupSort):
            raise UnboundedForwardError(f"{name}: no rounding-error bound for {kind.__name__}")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), error bound (N, C)) for inputs x (cast to `dtype`, exactly from
        float32): `|logits - exact logits of the network at x| <= error bound` elementwise."""
        x = x.to(self.dtype)
        # cuDNN may pick FFT or Winograd convolutions, whose errors the bound does not cover: the
        # native (im2col + GEMM) kernels run instead. A process-global switch, like full_precision.
        cudnn_enabled = torch.backends.cudnn.enabled
        try:
            if x.is_cuda:
                torch.backends.cudnn.enabled = False
            with torch.no_grad():
                logits, error = self._walk(self.network, x, torch.zeros_like(x))
        finally:
            torch.backends.cudnn.enabled = cudnn_enabled
        return logits, error

    def _walk(self, module: nn.Module, x: torch.Tensor, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = type(module)
        u = self.unit_roundoff
        if kind is nn.Sequential:
            for child in module:
                x, error = self._walk(child, x, error)
            return x, error
        if kind is Residual:
            inner, inner_error = self._walk(module.block, x, error)
            out = x + inner
            return out, (error + inner_error + u * out.abs()) * BOUND_SLACK
        if kind is Normalize:
            mean = module.mean.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
            std = module.std.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
            out = (x - mean) / std
            local = _gamma(2, u) * (x.abs() + mean.abs()) / std.abs()
            return out, (error / std.abs() + local) * BOUND_SLACK
        if kind is nn.Linear:
            gamma = _gamma(module.in_features + 1, u)
            abs_weight, abs_bias = self._absolute[id(module)]
            out = F.linear(x, module.weight, module.bias)
            # |W| E + gamma (|W| |x| + |b|), as one product: |W| (E + gamma |x|) + gamma |b|
            bound = F.linear(error + gamma * x.abs(), abs_weight, None if abs_bias is None else gamma * abs_bias)
            return out, bound * BOUND_SLACK
        if kind in (nn.Conv1d, nn.Conv2d):
            conv = F.conv1d if kind is nn.Conv1d else F.conv2d
            options = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                           groups=module.groups)
            weight = module.weight
            gamma = _gamma(weight.shape[1] * math.prod(weight.shape[2:]) + 1, u)
            abs_weight, abs_bias = self._absolute[id(module)]
            out = conv(x, weight, module.bias, **options)
            bound = conv(error + gamma * x.abs(), abs_weight, None if abs_bias is None else gamma * abs_bias, **options)
            return out, bound * BOUND_SLACK
        if kind in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
            return module(x), error  # clamps: exact and 1-Lipschitz
        if kind is nn.LeakyReLU:
            out = F.leaky_relu(x, module.negative_slope)
            return out, (max(1.0, abs(module.negative_slope)) * error + u * out.abs()) * BOUND_SLACK
        if kind in (nn.MaxPool1d, nn.MaxPool2d):
            # |max a - max b| <= max |a - b|: the window maximum of the error bounds.
            return module(x), module(error)
        if kind in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            if kind is nn.AdaptiveAvgPool2d:
                out_size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
                taps = math.prod(math.ceil(s / (o or s)) + 1 for s, o in zip(x.shape[-2:], out_size))
            else:
                kernel = module.kernel_size
                dims = 1 if kind is nn.AvgPool1d else 2
                taps = math.prod(kernel) if isinstance(kernel, tuple) else kernel ** dims
            # A non-negative linear map: errors pass through it; sum then divide (or multiply by
            # a rounded reciprocal) adds gamma_{taps+2} times the mean of |x|.
            return module(x), (module(error) + _gamma(taps + 2, u) * module(x.abs())) * BOUND_SLACK
        if kind is GroupSort:
            # Sorting is 1-Lipschitz in max norm: each output moves by at most the group's largest error.
            size = module.group_size
            grouped = error.reshape(error.shape[0], error.shape[1] // size, size, *error.shape[2:])
            return module(x), grouped.amax(dim=2, keepdim=True).expand_as(grouped).reshape(error.shape)
        # Flatten, Unflatten, Identity, Dropout in eval mode: exact reshapes / identities.
        return module(x), module(error)


def probabilities_with_error(logits: torch.Tensor, logit_error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of `logits` ((N, C), computed in their dtype) and, per sample, a bound
    e with `|p_i - softmax(exact logits)_i| <= e` for every class.

    Exact logits within `logit_error` of the computed ones move each probability by at most
    `max_j err_j / 2` (`||grad p_i||_1 = 2 p_i (1 - p_i) <= 1/2`); the softmax's own rounding
    (exp within 2 ulp, a C-term sum, one division) adds at most `gamma_{C+6}` (probabilities are
    at most 1).
    """
    u = torch.finfo(logits.dtype).eps / 2.0
    probs = torch.softmax(logits, dim=1)
    error = 0.5 * logit_error.amax(dim=1) + _gamma(logits.shape[1] + 6, u)
    error = torch.where(torch.isfinite(error), error * BOUND_SLACK, torch.full_like(error, math.inf))
    return probs, error
