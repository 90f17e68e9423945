"""Rounding-error rules of the tensor functions and methods a traced forward may call, for
`forward_error.ErrorBoundedForward` (as `graph_ops` holds the Lipschitz rules).

A value's error bound is a pair (`Bound`): componentwise E with |computed - exact| <= E, and per
sample d >= the l2 norm of that difference. u is the unit roundoff, gamma_k = k u / (1 - k u)
(Higham, ch. 3). Rules:
- a + b, a - b: E_a + E_b + u |out|, d_a + d_b + u ||out|| (one rounding per entry);
- c * a, a / c with a Python number c: |c| E + u |out| (and |1/c|), likewise for d;
- relu: exact and 1-Lipschitz; flatten/view/reshape/contiguous, cat along a non-batch dimension:
  exact, the same map of E (cat: d = sqrt(sum d_i^2));
- mean over non-batch dimensions of n entries: mean(E) + gamma_{n+1} mean(|a|), d and ||a|| times
  n^-1/2 (Cauchy-Schwarz);
- F.conv/linear with constant weights: the Linear/Conv rule, componentwise only;
- shape queries (size, dim, shape): input-independent integers.
Anything else has no rule and is refused by name.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixclf_ros.core.numerics import BOUND_SLACK, UnboundedForwardError, gamma

Bound = tuple[torch.Tensor, torch.Tensor]
"""(componentwise bound, shaped like the value; per-sample l2 bound, shape (N,))."""


def l2(x: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norms, shape (N,)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def attribute(module: nn.Module, target: str) -> Any:
    """The parameter, buffer or submodule a get_attr node names ("layer.0.weight")."""
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def op_name(node: fx.Node) -> str:
    """How an error message names the node's operation: `.view()` for a method, the function's name."""
    target = node.target
    return f".{target}()" if isinstance(target, str) else getattr(target, "__name__", repr(target))


# Each rule maps (unit roundoff, node, operand values, keyword values, operand bounds; None for an
# operand that does not depend on the input) to (value, bound; None if input-independent).


def _sum_or_difference(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    if kwargs or len(args) != 2:
        raise UnboundedForwardError(f"model: {node.name}: {op_name(node)} with extra arguments")
    subtract = node.target in (operator.sub, operator.isub, torch.sub)
    out = args[0] - args[1] if subtract else args[0] + args[1]  # a Python number may come first
    # exact operands within their bounds; the operation rounds once
    bounds = [b for b in errors if b is not None]
    return out, ((sum(b[0] for b in bounds) + u * out.abs()) * BOUND_SLACK,
                 (sum(b[1] for b in bounds) + u * l2(out)) * BOUND_SLACK)


def _scaled(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    """A product or quotient of an input-dependent tensor and a Python number."""
    divide = node.target in (operator.truediv, operator.itruediv, torch.div)
    if kwargs or len(args) != 2 or errors[0] is None or errors[1] is not None \
            or not isinstance(args[1], (int, float)) or (divide and args[1] == 0):
        raise UnboundedForwardError(f"model: {node.name}: {op_name(node)} is bounded only for a tensor and a "
                                    "non-zero Python number")
    factor = abs(1.0 / args[1]) if divide else abs(args[1])
    out = args[0] / args[1] if divide else args[0] * args[1]
    return out, ((factor * errors[0][0] + u * out.abs()) * BOUND_SLACK,
                 (factor * errors[0][1] + u * l2(out)) * BOUND_SLACK)


def _relu(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    return torch.relu(args[0]), errors[0]  # exact and 1-Lipschitz; computed out of place


def _reshaped(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    """flatten/view/reshape/contiguous: exact, and the same map of the error bound."""
    if any(e is not None for e in errors[1:]):
        raise UnboundedForwardError(f"model: {node.name}: {op_name(node)} with input-dependent arguments")
    error, norm = errors[0]
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs), (
            getattr(error, node.target)(*args[1:], **kwargs), norm)
    return node.target(*args, **kwargs), (node.target(error, *args[1:], **kwargs), norm)


def _mean(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    options = dict(kwargs)
    dim = options.pop("dim", args[1] if len(args) > 1 else None)
    keepdim = options.pop("keepdim", args[2] if len(args) > 2 else False)
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else ()
    x = args[0]
    if options or not dims or any(d % x.dim() == 0 for d in dims):
        raise UnboundedForwardError(f"model: {node.name}: mean is bounded only over non-batch dimensions")
    count = math.prod(x.shape[d] for d in dims)
    out = x.mean(dim=dims, keepdim=keepdim)
    # a non-negative linear map (errors pass through, l2 norm count^-1/2) plus the sum's and the
    # division's rounding
    relative = gamma(count + 1, u)
    error = errors[0][0].mean(dim=dims, keepdim=keepdim) + relative * x.abs().mean(dim=dims, keepdim=keepdim)
    norm = (errors[0][1] + relative * l2(x)) / math.sqrt(count)
    return out, (error * BOUND_SLACK, norm * BOUND_SLACK)


def _shape_query(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    """x.size(), x.dim(), x.shape and indexing into them: input-independent integers."""
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs), None
    if node.target is operator.getitem and isinstance(args[0], torch.Tensor):
        raise UnboundedForwardError(f"model: {node.name}: indexing a tensor is not bounded")
    if node.target is getattr and args[1] not in ("shape",):
        raise UnboundedForwardError(f"model: {node.name}: attribute {args[1]!r} of a tensor")
    return node.target(*args, **kwargs), None


def _concatenated(u: float, node: fx.Node, args: tuple, kwargs: dict, errors: tuple) -> tuple:
    tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if dim % tensors[0].dim() == 0:
        raise UnboundedForwardError(f"model: {node.name}: cat along the batch dimension")
    parts = [torch.zeros_like(t) if b is None else b[0] for t, b in zip(tensors, errors[0])]
    norm = torch.sqrt(sum(b[1] ** 2 for b in errors[0] if b is not None)) * BOUND_SLACK
    return torch.cat(tensors, dim), (torch.cat(parts, dim), norm)  # exact


def functional_affine(u: float, node: fx.Node, args: tuple, kwargs: dict, operand: Bound) -> tuple:
    """F.conv1d/conv2d/linear with input-independent weights: the componentwise rule of the
    Linear/Conv layers (no l2 part: the weights' operator norm is not computed per call)."""
    error = operand[0]
    x, weight, *rest = args
    bias = rest.pop(0) if rest else kwargs.pop("bias", None)
    taps = weight.shape[1] * math.prod(weight.shape[2:]) if node.target is not F.linear else weight.shape[1]
    relative = gamma(taps + 1, u)
    out = node.target(x, weight, bias, *rest, **kwargs)
    bound = node.target(error + relative * x.abs(), weight.abs(), None if bias is None else relative * bias.abs(),
                        *rest, **kwargs)
    return out, (bound * BOUND_SLACK, torch.full_like(operand[1], math.inf))


_FUNCTIONAL_LAYERS: dict[Any, Any] = {
    F.avg_pool1d: nn.AvgPool1d, F.avg_pool2d: nn.AvgPool2d, F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d,
    F.adaptive_avg_pool2d: nn.AdaptiveAvgPool2d,
    **dict.fromkeys((F.conv1d, F.conv2d, torch.conv1d, torch.conv2d, F.linear), nn.Module),  # _functional_affine
}


def functional_layer(node: fx.Node) -> Any:
    """The layer class a functional call is evaluated as (nn.Module: by `_functional_affine`), or None."""
    if node.op != "call_function":
        return None
    try:
        return _FUNCTIONAL_LAYERS.get(node.target)
    except TypeError:  # an unhashable target
        return None


_GRAPH_RULES: dict[Any, Any] = {
    torch.cat: _concatenated,
    **dict.fromkeys((operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub),
                    _sum_or_difference),
    **dict.fromkeys((operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div),
                    _scaled),
    **dict.fromkeys((F.relu, torch.relu, torch.relu_, "relu", "relu_"), _relu),
    **dict.fromkeys((torch.flatten, torch.reshape, "flatten", "view", "reshape", "contiguous"), _reshaped),
    **dict.fromkeys((torch.mean, "mean"), _mean),
    **dict.fromkeys(("size", "dim", getattr, operator.getitem), _shape_query),
}


def graph_rule(node: fx.Node) -> Any:
    try:
        return _GRAPH_RULES.get(node.target)
    except TypeError:  # an unhashable target
        return None
