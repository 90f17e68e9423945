"""Floating-point soundness of the robust model's forward pass.

Theorem 1 holds for the exact function h; the node evaluates a floating-point approximation of
it. Near the alpha threshold the numerator `alpha (h_y - h_i) + alpha - 1` is tiny, and float32
rounding (1e-7 relative) can be larger than it. Two tools close that gap:

- `full_precision()`: a scope in which TF32 and the other reduced-precision float32 paths of
  cuBLAS, cuDNN and oneDNN are off (IEEE float32), restored afterwards;
- `forward_error.ErrorBoundedForward`: the robust network evaluated (in float32 or float64 for
  the certificate) together with a rigorous bound of that evaluation's rounding error;
- `probabilities_with_error`: that logit error bound as a bound of the probability error
  (softmax: `|d p_i| <= max_j |d z_j| / 2`), which `certify.lipschitz_radius(...,
  probability_error=...)` subtracts from the margin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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

    The environment can still lower oneDNN's float32 arithmetic: with
    `ONEDNN_DEFAULT_FPMATH_MODE=BF16`, its float32 convolutions round to bfloat16 inside this scope
    too (measured: 5e-4 relative error). The bounded float32 pass runs no oneDNN kernels
    (`forward_error.covered_kernels`).
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


# ----------------------------------------------------------------------------- rounding-error bounds

FLOAT64_UNIT_ROUNDOFF = 2.0 ** -53
"""float64's unit roundoff u (float32's is 2^-24)."""


class UnboundedForwardError(ValueError):
    """The network contains a structure whose rounding error this module cannot bound."""


def gamma(count: int, unit_roundoff: float) -> float:
    """Higham's gamma_count = count u / (1 - count u): the relative error bound of `count` roundings."""
    product = count * unit_roundoff
    if product >= 0.5:
        raise UnboundedForwardError(f"dot products of length {count} are too long for this precision")
    return product / (1.0 - product)


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
    error = 0.5 * logit_error.amax(dim=1) + gamma(logits.shape[1] + 6, u)
    error = torch.where(torch.isfinite(error), error * BOUND_SLACK, torch.full_like(error, math.inf))
    return probs, error
