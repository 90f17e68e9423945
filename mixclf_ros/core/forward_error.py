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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixclf_ros.core.bound_rules import UnsupportedLayerError
from mixclf_ros.core.engine import BoundPlan
from mixclf_ros.core.numerics import UnboundedForwardError

__all__ = ["ErrorBoundedForward", "UnboundedForwardError"]


class ErrorBoundedForward:
    """The logits of `network` in `dtype`, with a componentwise bound of their rounding error.

    Args:
        network: the robust model ([0,1] pixels -> logits). Its plan holds a copy in `dtype`
            (float64 for certificates: weights cast once, exactly), in eval mode.
        dtype: torch.float64 (certificates) or torch.float32 (tests of the bound itself).
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
        # cuDNN may pick FFT or Winograd convolutions, whose errors the bound does not cover: the
        # native (im2col + GEMM) kernels run instead. A process-global switch, like full_precision.
        cudnn_enabled = torch.backends.cudnn.enabled
        try:
            if x.is_cuda:
                torch.backends.cudnn.enabled = False
            with torch.no_grad():
                logits, (error, norm) = self.plan.rounding(x, componentwise)
        except UnsupportedLayerError as error:
            raise UnboundedForwardError(str(error)) from None
        finally:
            torch.backends.cudnn.enabled = cudnn_enabled
        # both bound the same error: componentwise, and in l2 norm per sample (which bounds each entry)
        per_sample = norm.view(-1, *[1] * (logits.dim() - 1)).expand_as(logits)
        return logits, torch.minimum(error, per_sample) if componentwise else per_sample
