"""Sound upper bounds of a network's Lipschitz constant in l2 and linf, over its traced graph.

`logit_lipschitz_bound(model, norm, input_shape)` bounds the operator norm of the logits map,
`||z(x) - z(x')||_p <= L ||x - x'||_p` for all x, x' (p = `norm`, inputs in [0,1]-pixel units),
for the model in eval mode, in exact arithmetic (Theorem 1 needs `Lip_p(h_i)`; see
`probability_lipschitz_bound`).

How: `engine.BoundPlan` traces the model once with torch.fx (any `nn.Module` whose forward has no
data-dependent control flow; layers with a rule stay whole) and carries, for every
input-dependent value, a bound of its Lipschitz constant with respect to the model input: a layer
or function multiplies its operand's bound by its own operator norm, an add sums its operands'
bounds (triangle inequality; residual connections of any depth), a cat combines them (l2 root of
the sum of squares, linf max; jointly for MaxMin/GroupSort pairs however written,
`graph_patterns`). The rules are the one table of `bound_rules` (docs/SUPPORTED_OPERATIONS.md).
Bounds come from the weights the layers use at inference (parametrizations evaluated), never from
a layer's claimed constant.

What is refused, by name, with `UnsupportedLayerError` (the engine never guesses):
- operations without a rule, on input-dependent values (and random operations anywhere);
- forward hooks or pre-hooks (per module or global), instance-level overrides of `forward`,
  `__call__` or any other method (`Conv2d._conv_forward`, say), layers with a rule whose class
  forward is not the library's own;
- in-place operations that mutate the model input, a parameter/buffer, or a tensor that is read
  later through another view. An in-place operation on a tensor read later directly (the skip input
  of a residual block, say) is bounded as what runs: later reads see the mutated value.
- a forward whose traced graph does not reproduce the model's outputs on a dummy batch, or that
  mixes samples of a batch.
The forward must be a pure function of its input, parameters and buffers: Python-side state that
changes between calls is beyond what a trace can see.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mixclf_ros.core.bound_rules import UnsupportedLayerError
from mixclf_ros.core.certify import NORMS, softmax_lipschitz_factor
from mixclf_ros.core.engine import BoundPlan
from mixclf_ros.core.layer_bounds import (
    NUMERIC_SLACK,
    check_norm,
    circular_conv_spectral_norm,
    conv2d_l2_bound,
    conv_linf_bound,
    linear_bound,
)
from mixclf_ros.core.lipschitz_search import jacobian_norm_lower_bound, probability_gradient_norm_search
from mixclf_ros.core.tracing import check_runs_as_traced, resolve_inplace, trace_forward


def logit_lipschitz_bound(model: nn.Module, norm: str, input_shape: Sequence[int],
                          plan: BoundPlan | None = None) -> float:
    """Sound upper bound of the logits' Lipschitz constant, operator norm `norm` -> `norm`.

    Args:
        model: any `nn.Module` that torch.fx can trace, built from the operations the engine
            bounds (docs/SUPPORTED_OPERATIONS.md), taking (N, *input_shape) inputs in [0,1]-pixel
            units. Evaluated in eval mode (its modes are restored after).
        norm: "l2" or "linf".
        input_shape: (C, H, W) (or (features,)) without the batch dimension.
        plan: the model's compiled `engine.BoundPlan`, if one was made already (it is reused).

    Returns:
        L with `||z(x) - z(x')||_norm <= L ||x - x'||_norm` for all inputs (eval mode, exact
        arithmetic). Raises `UnsupportedLayerError` naming the first layer or operation it cannot
        bound.
    """
    check_norm(norm)
    plan = plan if plan is not None else BoundPlan(model, input_shape, type(model).__qualname__)
    return plan.lipschitz(norm)


def probability_lipschitz_bound(model: nn.Module, norm: str, input_shape: Sequence[int],
                                plan: BoundPlan | None = None) -> float:
    """Per-class Lipschitz bound of the softmax probability outputs `Lip_p(h_i)` (Theorem 1),
    in `norm`, [0,1]-pixel units: `logit_lipschitz_bound * certify.softmax_lipschitz_factor(norm)`."""
    return logit_lipschitz_bound(model, norm, input_shape, plan) * softmax_lipschitz_factor(norm)


__all__ = [
    "NORMS",
    "NUMERIC_SLACK",
    "BoundPlan",
    "UnsupportedLayerError",
    "check_runs_as_traced",
    "circular_conv_spectral_norm",
    "conv2d_l2_bound",
    "conv_linf_bound",
    "jacobian_norm_lower_bound",
    "linear_bound",
    "logit_lipschitz_bound",
    "probability_gradient_norm_search",
    "probability_lipschitz_bound",
    "resolve_inplace",
    "trace_forward",
]
