"""Lipschitz rules of the tensor functions and methods a traced forward may call.

`op_bound(call)` returns the bound of one traced `call_function`/`call_method` node with respect to
the model input, from the bounds of its input-dependent operands (`OpCall.bounds`, None for a
constant operand) and the operation's own operator norm (p -> p). Every input-dependent tensor has
the batch dimension first; rules refuse operations that could mix samples (reductions, cat,
permutes or indexing over dim 0), so a bound of the batch map is the per-sample bound.

Rules (L = bound of the operand, bf = broadcast factor: sqrt(copies) in l2, 1 in linf):
- elementwise maps with per-coordinate Lipschitz constant c: c L (any lp norm);
- a + b, a - b: bf_a L_a + bf_b L_b (triangle inequality; holds for any DAG of adds);
- c * a, a / c with c constant: max|c| bf L, max|1/c| bf L; products of two input-dependent
  tensors are refused (not globally Lipschitz);
- x @ W, W @ x, linear, conv2d, batch_norm with constant weights: the layer bounds of
  `layer_bounds`; max/avg pooling likewise;
- cat/stack: l2 sqrt(sum L_i^2), linf max L_i; maximum(a, b): l2 sqrt(La^2 + Lb^2), linf max;
- mean / sum over n elements: l2 n^{-1/2} / n^{1/2}, linf 1 / n; amax, amin, sort values: 1;
- reshape/view/flatten/permute/transpose/squeeze/unsqueeze/getitem slicing/constant pad/dropout
  (eval)/dtype casts: 1; expand: bf.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core import layer_bounds as lb
from mixclf_ros.core.layer_bounds import UnsupportedLayerError

NOT_LIPSCHITZ = math.inf
"""Bound of an input-dependent value that is not a Lipschitz function of the input (sort indices)."""


@dataclass
class OpCall:
    """One traced call: its name (for errors), operands as values and as bounds (None: constant)."""

    name: str
    args: tuple
    kwargs: dict
    bounds: tuple
    kwarg_bounds: dict
    out: Any
    norm: str
    batch: int

    def arg(self, index: int, key: str, default: Any = None) -> Any:
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(key, default)

    def bound(self, index: int, key: str = "") -> Any:
        if index < len(self.bounds):
            return self.bounds[index]
        return self.kwarg_bounds.get(key)

    def fail(self, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"{self.name}: {why}")

    def require_constant(self, *skip: int) -> None:
        """Every operand except positions `skip` must be input-independent."""
        dependent = [i for i, b in enumerate(self.bounds) if i not in skip and is_dependent(b)]
        dependent += [k for k, b in self.kwarg_bounds.items() if is_dependent(b)]
        if dependent:
            raise self.fail(f"operand(s) {dependent} depend on the input; only constants are supported there")


def is_dependent(bound: Any) -> bool:
    """Whether a bound (or a structure of bounds, as operands are mapped) marks an input-dependent value."""
    if isinstance(bound, dict):
        return any(is_dependent(b) for b in bound.values())
    if isinstance(bound, (list, tuple)):
        return any(is_dependent(b) for b in bound)
    if isinstance(bound, slice):
        return any(is_dependent(b) for b in (bound.start, bound.stop, bound.step))
    return bound is not None


def _dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _broadcast_factor(value: torch.Tensor, out: torch.Tensor, norm: str, call: OpCall) -> float:
    if value.dim() != out.dim():
        raise call.fail(f"broadcasts a {value.dim()}-d input-dependent tensor to {out.dim()}-d (batch dim moves)")
    if norm == "linf" or value.shape == out.shape:
        return 1.0
    return math.sqrt(out.numel() / value.numel())


def _max_abs(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().double().abs().max()) if value.numel() else 0.0
    return abs(float(value))


# ----------------------------------------------------------------------------- rule families


def _elementwise(constant: Callable[[OpCall], float], dependent_ok: tuple[int, ...] = (0,)) -> Callable:
    def rule(call: OpCall) -> float:
        call.require_constant(*dependent_ok)
        return constant(call) * call.bound(0)
    return rule


def _preserving(check: Callable[[OpCall], None] | None = None, shape_args_may_depend: bool = False) -> Callable:
    """Norm-preserving reshapes and casts; the output keeps the batch as dim 0 (row-major reshape)."""
    def rule(call: OpCall) -> float:
        if not shape_args_may_depend:
            call.require_constant(0)
        if isinstance(call.out, torch.Tensor) and (call.out.dim() == 0 or call.out.shape[0] != call.batch):
            raise call.fail("moves the batch dimension")
        if check is not None:
            check(call)
        return call.bound(0)
    return rule


def _permute_check(call: OpCall) -> None:
    ndim = call.args[0].dim()
    dims = call.args[1:] if len(call.args) > 1 else call.kwargs.get("dims", ())
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = dims[0]
    if not dims or _dim(int(dims[0]), ndim) != 0:
        raise call.fail("permutes the batch dimension")


def _transpose_check(call: OpCall) -> None:
    ndim = call.args[0].dim()
    dims = (call.arg(1, "dim0"), call.arg(2, "dim1"))
    if any(_dim(int(d), ndim) == 0 for d in dims):
        raise call.fail("transposes the batch dimension")


def _flatten_check(call: OpCall) -> None:
    if _dim(int(call.arg(1, "start_dim", 0)), call.args[0].dim()) == 0 and call.out.shape != call.args[0].shape:
        raise call.fail("flattens the batch dimension")


def _expand(shape_operand: bool) -> Callable:
    """expand/broadcast_to (shape constant) and expand_as (the other tensor gives only its shape)."""
    def rule(call: OpCall) -> float:
        call.require_constant(*((0, 1) if shape_operand else (0,)))
        return _broadcast_factor(call.args[0], call.out, call.norm, call) * call.bound(0)
    return rule


_BINARY = ("input", "other")


def _add(call: OpCall) -> float:
    total = 0.0
    for index, key in enumerate(_BINARY):
        bound = call.bound(index, key)
        if bound is None:
            continue
        scale = _max_abs(call.kwargs.get("alpha", 1)) if index == 1 else 1.0
        total += scale * _broadcast_factor(call.arg(index, key), call.out, call.norm, call) * bound
    if is_dependent(call.kwarg_bounds.get("alpha")):
        raise call.fail("alpha depends on the input")
    return total


def _mul(call: OpCall) -> float:
    dependent = [i for i, key in enumerate(_BINARY) if call.bound(i, key) is not None]
    if len(dependent) != 1:
        raise call.fail("product of two input-dependent tensors (not globally Lipschitz)")
    index = dependent[0]
    constant = call.arg(1 - index, _BINARY[1 - index])
    return _max_abs(constant) * _broadcast_factor(call.arg(index, _BINARY[index]), call.out, call.norm, call) \
        * call.bound(index, _BINARY[index])


def _div(call: OpCall) -> float:
    if call.bound(1, "other") is not None:
        raise call.fail("division by an input-dependent tensor (not globally Lipschitz)")
    if call.kwargs.get("rounding_mode") is not None:
        raise call.fail("rounding division is not Lipschitz")
    call.require_constant(0)
    denominator = call.arg(1, "other")
    inverse = 1.0 / (denominator.detach().double() if isinstance(denominator, torch.Tensor) else float(denominator))
    return _max_abs(inverse) * _broadcast_factor(call.args[0], call.out, call.norm, call) * call.bound(0)


def _matmul(call: OpCall) -> float:
    left, right = call.bound(0, "input"), call.bound(1, "other")
    if (left is None) == (right is None):
        raise call.fail("matmul needs exactly one input-dependent operand")
    weight = call.args[1] if left is not None else call.args[0]
    value = call.args[0] if left is not None else call.args[1]
    if weight.dim() != 2 or value.dim() < (2 if left is not None else 3):
        raise call.fail("matmul supported only with a constant 2-d matrix acting on non-batch dims")
    operand_bound = left if left is not None else right
    return lb.linear_bound(weight.t() if left is not None else weight, call.norm) * operand_bound


def _linear(call: OpCall) -> float:
    call.require_constant(0)
    if call.args[0].dim() < 2:
        raise call.fail("linear on a tensor without a feature dimension")
    return lb.linear_bound(call.arg(1, "weight"), call.norm) * call.bound(0)


def _conv2d(call: OpCall) -> float:
    call.require_constant(0)
    x, weight = call.args[0], call.arg(1, "weight")
    if x.dim() != 4:
        raise call.fail("conv2d on a tensor that is not batched 4-d")
    if call.norm == "linf":
        return lb.conv_linf_bound(weight) * call.bound(0)
    bound = lb.conv2d_weight_l2_bound(weight, (x.shape[-2], x.shape[-1]), call.arg(4, "padding", 0),
                                      call.arg(5, "dilation", 1), call.arg(6, "groups", 1))
    return bound * call.bound(0)


def _batch_norm(call: OpCall) -> float:
    call.require_constant(0)
    if call.arg(5, "training", False) or call.arg(2, "running_var") is None:
        raise call.fail("batch norm with batch statistics")
    return lb.batch_norm_bound(call.arg(2, "running_var"), call.arg(3, "weight"), call.arg(7, "eps", 1e-5)) \
        * call.bound(0)


_POOL_ARGS = {
    F.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    torch.max_pool1d: (nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    torch.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    F.adaptive_max_pool1d: (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    F.adaptive_max_pool2d: (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    F.avg_pool1d: (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override")),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
}


def _pool_rule(target: Callable) -> Callable:
    module_type, names = _POOL_ARGS[target]

    def rule(call: OpCall) -> float:
        call.require_constant(0)
        settings = {name: call.arg(i + 1, name) for i, name in enumerate(names) if call.arg(i + 1, name) is not None}
        if settings.get("stride") == []:
            settings.pop("stride")
        module = module_type(**settings)
        return lb.pool_bound(module, call.args[0], call.out, call.norm) * call.bound(0)
    return rule


def _reduced_count(call: OpCall) -> int:
    x = call.args[0]
    dims = call.arg(1, "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise call.fail("reduction over all dimensions (includes the batch)")
    dims = [dims] if isinstance(dims, int) else list(dims)
    normalized = {_dim(int(d), x.dim()) for d in dims}
    if 0 in normalized:
        raise call.fail("reduction over the batch dimension")
    return math.prod(x.shape[d] for d in normalized)


def _mean(call: OpCall) -> float:
    call.require_constant(0)
    count = _reduced_count(call)
    return (1.0 if call.norm == "linf" else 1.0 / math.sqrt(count)) * call.bound(0)


def _sum(call: OpCall) -> float:
    call.require_constant(0)
    count = _reduced_count(call)
    return (float(count) if call.norm == "linf" else math.sqrt(count)) * call.bound(0)


def _extremum(call: OpCall) -> Any:
    """amax/amin over non-batch dims: 1; max/min(x, dim): (values 1, indices not Lipschitz);
    maximum/minimum(a, b): l2 sqrt(La^2 + Lb^2), linf max(La, Lb)."""
    other = call.arg(1, "other", call.kwargs.get("dim"))
    if isinstance(other, torch.Tensor):
        parts = [_broadcast_factor(call.args[i], call.out, call.norm, call) * call.bounds[i]
                 for i in (0, 1) if call.bounds[i] is not None]
        return max(parts) if call.norm == "linf" else math.sqrt(sum(p * p for p in parts))
    call.require_constant(0)
    _reduced_count(call)
    if isinstance(call.out, tuple):
        return (call.bound(0), NOT_LIPSCHITZ)
    return call.bound(0)


def _concatenate(call: OpCall) -> float:
    tensors, bounds = call.args[0], call.bounds[0]
    dim = call.arg(1, "dim", 0)
    if _dim(int(dim), call.out.dim()) == 0:
        raise call.fail("concatenates along the batch dimension")
    if is_dependent(call.bounds[1:]) or is_dependent(call.kwarg_bounds):
        raise call.fail("dim depends on the input")
    for tensor, bound in zip(tensors, bounds):
        if bound is not None and tensor.dim() != call.out.dim() and call.out.dim() != tensor.dim() + 1:
            raise call.fail("inconsistent operand dimensions")
    parts = [b for b in bounds if b is not None]
    return max(parts) if call.norm == "linf" else math.sqrt(sum(b * b for b in parts))


def _split(dim_index: int) -> Callable:
    """chunk/split (dim third) and unbind (dim second): each part is a restriction, bound L."""
    def rule(call: OpCall) -> tuple:
        call.require_constant(0)
        if _dim(int(call.arg(dim_index, "dim", 0)), call.args[0].dim()) == 0:
            raise call.fail("splits along the batch dimension")
        return tuple(call.bound(0) for _ in call.out)
    return rule


def _sort(call: OpCall) -> tuple:
    """Sorting along a dim is 1-Lipschitz in every lp norm; the indices are not Lipschitz."""
    call.require_constant(0)
    dim = call.arg(1, "dim", -1)
    if isinstance(dim, bool) or _dim(int(dim), call.args[0].dim()) == 0:
        raise call.fail("sorts along the batch dimension")
    return (call.bound(0), NOT_LIPSCHITZ)


def _pad(call: OpCall) -> float:
    call.require_constant(0)
    if call.arg(2, "mode", "constant") != "constant":
        raise call.fail("only constant padding is supported (reflect/replicate/circular copy pixels)")
    if len(call.arg(1, "pad")) // 2 >= call.args[0].dim():
        raise call.fail("pads the batch dimension")
    return call.bound(0)


def _dropout(training_index: int) -> Callable:
    def rule(call: OpCall) -> float:
        call.require_constant(0)
        if call.arg(training_index, "training", True):
            raise call.fail("dropout in training mode")
        return call.bound(0)
    return rule


def _getitem(call: OpCall) -> Any:
    container, index = call.args
    if isinstance(container, (tuple, list)):
        return call.bounds[0][index] if isinstance(call.bounds[0], (tuple, list)) else call.bounds[0]
    if is_dependent(call.bounds[1]):
        raise call.fail("indexing with input-dependent indices")
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(item, (torch.Tensor, list)) for item in items):
        raise call.fail("advanced (tensor/list) indexing is not supported")
    first = items[0] if items else slice(None)
    explicit = sum(item is not None for item in items) - 1
    keeps_batch = first == slice(None) or (first is Ellipsis and explicit < container.dim())
    if not keeps_batch or call.out.dim() == 0 or call.out.shape[0] != call.batch:
        raise call.fail("indexes the batch dimension")
    return call.bound(0)  # a restriction to a subset of coordinates


def _getattr(call: OpCall) -> Any:
    value, attribute = call.args
    if attribute in ("values", "indices") and isinstance(value, tuple):
        return call.bounds[0][0 if attribute == "values" else 1]
    if attribute == "data" and isinstance(value, torch.Tensor):
        return call.bound(0)
    raise call.fail(f"attribute {attribute!r} of an input-dependent value is not supported")


# ----------------------------------------------------------------------------- the table

_ONE = _elementwise(lambda call: 1.0)
_CAST = _preserving(shape_args_may_depend=True)
SHAPE_QUERIES = {"size", "dim", "ndimension", "numel", "shape", "ndim", "dtype", "device", "is_contiguous"}
"""Methods/attributes whose result depends only on the input's shape: constants."""
SHAPE_ONLY = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full"}
"""Tensors whose values depend only on the input's shape, dtype and device: constants."""

RANDOM_OPS = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
              "poisson", "multinomial", "randperm", "uniform_", "normal_", "bernoulli_", "exponential_",
              "geometric_", "cauchy_", "log_normal_", "random_"}

RULES: dict[Any, Callable[[OpCall], Any]] = {}


def _register(rule: Callable, *keys: Any) -> None:
    for key in keys:
        if key is not None:
            RULES[key] = rule


_nn = torch._C._nn
_register(_ONE, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_", F.relu6, F.hardtanh, F.hardtanh_,
          getattr(_nn, "hardtanh_", None), torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max,
          torch.clamp_, "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_",
          torch.abs, "abs", "abs_", torch.neg, "neg", "neg_", operator.neg, operator.pos, torch.tanh, F.tanh, "tanh",
          "tanh_", F.softsign, F.softplus, F.logsigmoid, F.tanhshrink, F.softshrink)
_register(_elementwise(lambda call: lb.celu_constant(call.arg(1, "alpha", 1.0))), F.celu, F.celu_)
_register(_elementwise(lambda call: 0.25), torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_")
_register(_elementwise(lambda call: max(1.0, _max_abs(call.arg(1, "negative_slope", 0.01)))), F.leaky_relu,
          F.leaky_relu_)
_register(_elementwise(lambda call: lb.elu_constant(call.arg(1, "alpha", 1.0))), F.elu, F.elu_)
_register(_elementwise(lambda call: lb.SELU_CONSTANT), F.selu, torch.selu, torch.selu_)
_register(_elementwise(lambda call: lb.gelu_constant(call.arg(1, "approximate", "none"))), F.gelu)
_register(_elementwise(lambda call: lb.silu_constant()), F.silu)
_register(_elementwise(lambda call: lb.mish_constant()), F.mish)
_register(_elementwise(lambda call: 1.5), F.hardswish)
_register(_elementwise(lambda call: 1.0 / 6.0), F.hardsigmoid)
_register(_elementwise(lambda call: max(1.0, _max_abs(call.arg(1, "weight")))), F.prelu, torch.prelu)
_register(_CAST, "detach", "contiguous", "clone", "float", "double", "to", "type_as", "cpu", "cuda", torch.clone,
          torch.detach)
_register(_preserving(), "view", "reshape", torch.reshape, "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze,
          "unflatten", torch.unflatten)
_register(_preserving(shape_args_may_depend=True), "view_as", "reshape_as")
_register(_preserving(_flatten_check), "flatten", torch.flatten)
_register(_preserving(_permute_check), "permute", torch.permute)
_register(_preserving(_transpose_check), "transpose", torch.transpose, "swapaxes", "swapdims")
_register(_expand(False), "expand", torch.broadcast_to)
_register(_expand(True), "expand_as")
_register(_add, operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract,
          "add", "add_", "sub", "sub_", "subtract")
_register(_mul, operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply")
_register(_div, operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide, "div", "div_",
          "divide", "true_divide")
_register(_matmul, operator.matmul, torch.matmul, torch.mm, "matmul", "mm")
_register(_linear, F.linear)
_register(_conv2d, F.conv2d, torch.conv2d)
_register(_batch_norm, F.batch_norm)
for _target in _POOL_ARGS:
    _register(_pool_rule(_target), _target)
_register(_mean, torch.mean, "mean")
_register(_sum, torch.sum, "sum")
_register(_extremum, torch.amax, torch.amin, "amax", "amin", torch.max, torch.min, "max", "min", torch.maximum,
          torch.minimum, "maximum", "minimum")
_register(_concatenate, torch.cat, torch.concat, torch.concatenate, torch.stack)
_register(_split(2), torch.chunk, "chunk", torch.split, "split")
_register(_split(1), torch.unbind, "unbind")
_register(_sort, torch.sort, "sort")
_register(_pad, F.pad)
_register(_dropout(2), F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_register(_getitem, operator.getitem)
_register(_getattr, getattr)


def op_name(target: Any) -> str:
    """`Tensor.exp`, `torch.exp`, `torch.nn.functional.gelu`, `operator.mul`, ..."""
    if isinstance(target, str):
        return f"Tensor.{target}"
    name = getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", None) or "torch"
    if module.startswith("torch._C") or getattr(target, "__qualname__", "").startswith("_VariableFunctions"):
        module = "torch"
    return f"{module.lstrip('_')}.{name}"


def op_bound(target: Any, call: OpCall) -> Any:
    """Bound of the traced call `target` (a function, or a method name) w.r.t. the model input."""
    try:
        rule = RULES.get(target)
    except TypeError:  # unhashable target
        rule = None
    if rule is None:
        raise call.fail(f"unsupported operation {op_name(target)} on an input-dependent tensor")
    return rule(call)
