"""The robust network's forward pass with a rigorous bound of its rounding error (Theorem 1 holds
for the exact function h; the node evaluates a floating-point approximation of it).

Running error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3), layer by
layer, with u the unit roundoff and `gamma_k = k u / (1 - k u)`: each operation's rule in the bound
engine (`bound_rules`, the rounding domain) propagates a componentwise bound E of the error and a
per-sample bound d of its l2 norm. E alone compounds over deep networks (|W| E grows by each
layer's absolute row sums); d grows only by each layer's l2 operator norm (computed once per plan,
shared with the Lipschitz bound) plus the layer's own rounding bounded through `||x||_2`. The
logits get the smaller of the two. `numerics.probabilities_with_error` turns the logit bound into a
probability bound, which `certify.lipschitz_radius(..., probability_error=...)` subtracts from the
margin.

Each operation is modelled as Higham's: `fl(a op b) = (a op b)(1 + d)`, `|d| <= u` (no underflow;
in float32 an underflow costs at most 1e-38 absolute per operation), so a dot product of n terms in
any order, with or without FMA, is within `gamma_n |W| |x|`. `covered_kernels` keeps torch to such
kernels: no FFT or Winograd convolutions, no TF32 or bfloat16 arithmetic.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from mixclf_ros.core.bound_rules import UnsupportedLayerError
from mixclf_ros.core.engine import BoundPlan
from mixclf_ros.core.numerics import UnboundedForwardError, full_precision

WINOGRAD_CPUS = ("arm", "riscv")
"""`platform.machine()` prefixes of CPUs on which torch runs float32 3x3 depthwise convolutions with
Winograd kernels whatever the switches (ATen `use_cpu_depthwise3x3_winograd`, built where
`__ARM_NEON__` or RISC-V vector intrinsics are defined): 32-bit ARM, Apple arm64, RISC-V. Not
aarch64 Linux (Jetson, Raspberry Pi OS 64-bit)."""

__all__ = ["ErrorBoundedForward", "UnboundedForwardError"]


class ErrorBoundedForward:
    """The logits of `network` in `dtype`, with a componentwise bound of their rounding error.

    Args:
        network: the robust model ([0,1] pixels -> logits). Its plan holds a copy in `dtype`
            (float64 for certificates: weights cast once, exactly), in eval mode.
        dtype: torch.float64, or torch.float32 (the certificate's first route on CUDA,
            `runtime.lipschitz_pass`: its affine layers sum float32 partials of at most 16 terms in
            float64, `partial_sums`; a bound about 6e6 times the float64 one on the zoo's logits).
            Below float64 every pass runs in `covered_kernels`.
        input_shape: (C, H, W) without the batch dimension (the graph is checked against the
            forward on a dummy batch of this shape).
        plan: the network's compiled `engine.BoundPlan` in `dtype`, if one was made already.

    What it covers is the rounding column of docs/SUPPORTED_OPERATIONS.md; anything else raises
    `UnboundedForwardError` at construction, naming it.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.float64,
                 input_shape: Sequence[int] | None = None, plan: BoundPlan | None = None):
        if plan is None:
            if input_shape is None:
                input_shape = getattr(network, "input_shape", None)
            if input_shape is None:
                raise UnboundedForwardError(f"no rounding-error bound for {type(network).__name__} without its "
                                            "input_shape (the graph is checked on a dummy batch)")
            plan = BoundPlan(network, input_shape, "model", dtype)
        if plan.dtype != dtype:
            raise ValueError(f"the plan computes in {plan.dtype}, not {dtype}")
        plan.require_rounding()
        self.plan = plan
        self.dtype = dtype
        self.unit_roundoff = plan.unit_roundoff

    def to(self, device: torch.device | str) -> ErrorBoundedForward:
        self.plan.to(device)
        return self

    def __call__(self, x: torch.Tensor, componentwise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), error bound (N, C)) for inputs x (cast to `dtype`, exactly from
        float32): `|logits - exact logits of the network at x| <= error bound` elementwise.
        `componentwise=False`: the per-sample l2 bound alone (the same for every logit of a
        sample), at about the price of the forward; otherwise the smaller of it and the
        componentwise bound, at about twice that."""
        x = x.to(self.dtype)
        try:
            with torch.no_grad(), covered_kernels(self.dtype, x.is_cuda):
                logits, (error, norm) = self.plan.rounding(x, componentwise)
        except UnsupportedLayerError as error:
            raise UnboundedForwardError(str(error)) from None
        # both bound the same error: componentwise, and in l2 norm per sample (which bounds each entry)
        per_sample = norm.view(-1, *[1] * (logits.dim() - 1)).expand_as(logits)
        return logits, torch.minimum(error, per_sample) if componentwise else per_sample


@contextlib.contextmanager
def covered_kernels(dtype: torch.dtype, cuda: bool) -> Iterator[None]:
    """Runs the body with the kernels whose rounding the rules' error model covers (each output a
    dot product within gamma_n, in any summation order, with or without FMA; not FFT or Winograd
    convolutions, no reduced-precision arithmetic). Process-global switches, like full_precision.

    CUDA: cuDNN off (it may pick FFT or Winograd algorithms): the native kernels (im2col + cuBLAS
    GEMM, direct depthwise) run. Below float64 also, on any device: `full_precision()` (no TF32);
    NNPACK off (FFT and Winograd: torch picks it for float32 CPU convolutions of 16 or more frames
    that oneDNN does not run); oneDNN off, so that float32 CPU convolutions run the native im2col +
    BLAS GEMM too. oneDNN's own are direct (ideep asks for `convolution_direct`), but
    `ONEDNN_DEFAULT_FPMATH_MODE=BF16` in the environment makes them round to bfloat16 even inside
    `full_precision()` (measured: 5e-4 relative error). Float64 has neither oneDNN nor NNPACK kernels.
    """
    below_float64 = dtype != torch.float64
    if below_float64 and not cuda and platform.machine().lower().startswith(WINOGRAD_CPUS):
        raise UnboundedForwardError(f"no {dtype} bound on a {platform.machine()} CPU: torch may run Winograd "
                                    "convolutions there")
    with contextlib.ExitStack() as stack:
        if below_float64:
            stack.enter_context(full_precision())
            stack.enter_context(torch.backends.nnpack.flags(enabled=False))
        cudnn_enabled, mkldnn_enabled = torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled
        try:
            if cuda:
                torch.backends.cudnn.enabled = False
            if below_float64:
                torch.backends.mkldnn.enabled = False
            yield
        finally:
            torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled = cudnn_enabled, mkldnn_enabled
