"""Rules of the tensor functions and methods a traced forward may call (see `bound_rules` for the
domains). Every input-dependent tensor has the batch dimension first; rules refuse operations that
could mix samples (reductions, cat, permutes or indexing over dim 0), so a bound of the batch map
is the per-sample bound. bf is the broadcast factor of an operand: sqrt(copies) in l2, 1 in linf.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch

from mixclf_ros.core import layer_bounds as lb
from mixclf_ros.core.bound_rules import NOT_LIPSCHITZ, Call, Rule, is_dependent, register
from mixclf_ros.core.numerics import BOUND_SLACK, gamma
from mixclf_ros.core.rules_layers import exact_map, l2


def _dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def broadcast_factor(value: torch.Tensor, out: torch.Tensor, norm: str, call: Call) -> float:
    if value.dim() != out.dim():
        raise call.fail(f"broadcasts a {value.dim()}-d input-dependent tensor to {out.dim()}-d (batch dim moves)")
    if norm == "linf" or value.shape == out.shape:
        return 1.0
    return math.sqrt(out.numel() / value.numel())


def _max_abs(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().double().abs().max()) if value.numel() else 0.0
    return abs(float(value))


def _rounded(call: Call, out: torch.Tensor, error: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """An operation that rounds each entry once: u |out| added to the propagated bounds."""
    u = call.unit_roundoff
    componentwise = call.componentwise_bound(lambda: (error + u * out.abs()) * BOUND_SLACK)
    return out, (componentwise, (size + u * l2(out)) * BOUND_SLACK)


# ----------------------------------------------------------------------------- reshapes and casts


class Reshape(Rule):
    """Norm-preserving reshapes; the output keeps the batch as dim 0 (row-major reshape)."""

    summary = "1 in every lp norm (coordinates moved, none lost or copied). Rounding: exact, the same map of E"

    def __init__(self, check: Callable[[Call], None] | None = None, shape_args_may_depend: bool = False) -> None:
        self.check, self.shape_args_may_depend = check, shape_args_may_depend

    def lipschitz(self, call: Call) -> float:
        if not self.shape_args_may_depend:
            call.require_constant(0)
        if isinstance(call.out, torch.Tensor) and (call.out.dim() == 0 or call.out.shape[0] != call.batch):
            raise call.fail("moves the batch dimension")
        if self.check is not None:
            self.check(call)
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        self.lipschitz(call)
        out = call.run()
        error = call.bounds[0][0]
        if isinstance(call.target, str):
            moved = getattr(error, call.target)(*call.args[1:], **call.kwargs)
        else:
            moved = call.target(error, *call.args[1:], **call.kwargs)
        return exact_map(call, out, moved)


def _permute_check(call: Call) -> None:
    ndim = call.args[0].dim()
    dims = call.args[1:] if len(call.args) > 1 else call.kwargs.get("dims", ())
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = dims[0]
    if not dims or _dim(int(dims[0]), ndim) != 0:
        raise call.fail("permutes the batch dimension")


def _transpose_check(call: Call) -> None:
    ndim = call.args[0].dim()
    if any(_dim(int(d), ndim) == 0 for d in (call.arg(1, "dim0"), call.arg(2, "dim1"))):
        raise call.fail("transposes the batch dimension")


def _flatten_check(call: Call) -> None:
    if _dim(int(call.arg(1, "start_dim", 0)), call.args[0].dim()) == 0 and call.out.shape != call.args[0].shape:
        raise call.fail("flattens the batch dimension")


class Cast(Reshape):
    """Casts and device moves: the same values, so 1; in the rounding domain a cast may round
    (to float32, say), which no rule bounds."""

    summary = "1 in every lp norm (the same values). Rounding: refused (a cast may round)"
    rounding = Rule.rounding


register(Cast(shape_args_may_depend=True), "float", "double", "to", "type_as", "cpu", "cuda")
register(Reshape(shape_args_may_depend=True), "detach", "contiguous", "clone", torch.clone, torch.detach)
register(Reshape(), "view", "reshape", torch.reshape, "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze,
         "unflatten", torch.unflatten)
register(Reshape(shape_args_may_depend=True), "view_as", "reshape_as")
register(Reshape(_flatten_check), "flatten", torch.flatten)
register(Reshape(_permute_check), "permute", torch.permute)
register(Reshape(_transpose_check), "transpose", torch.transpose, "swapaxes", "swapdims")


class Expand(Rule):
    """expand/broadcast_to (shape constant) and expand_as (the other tensor gives only its shape)."""

    summary = "bf (each coordinate copied bf^2 times in l2). Rounding: exact, E expanded, d times bf"

    def __init__(self, shape_operand: bool) -> None:
        self.shape_operand = shape_operand

    def lipschitz(self, call: Call) -> float:
        call.require_constant(*((0, 1) if self.shape_operand else (0,)))
        return broadcast_factor(call.args[0], call.out, call.norm, call) * call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        out = call.run()
        error, size = call.bounds[0]
        factor = broadcast_factor(call.args[0], out, "l2", call)
        return out, (error.expand_as(out), size * factor)


register(Expand(False), "expand", torch.broadcast_to)
register(Expand(True), "expand_as")


# ----------------------------------------------------------------------------- arithmetic

_BINARY = ("input", "other")


class AddSub(Rule):
    summary = ("a + b, a - b: bf_a L_a + bf_b L_b (triangle inequality; any DAG of adds, residual blocks). "
               "Rounding: E_a + E_b + u |y|, bf_a d_a + bf_b d_b + u ||y||")

    def lipschitz(self, call: Call) -> float:
        if is_dependent(call.kwarg_bounds.get("alpha")):
            raise call.fail("alpha depends on the input")
        total = 0.0
        for index, key in enumerate(_BINARY):
            bound = call.bound(index, key)
            if bound is not None:
                scale = _max_abs(call.kwargs.get("alpha", 1)) if index == 1 else 1.0
                total += scale * broadcast_factor(call.arg(index, key), call.out, call.norm, call) * bound
        return total

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        if call.kwargs or len(call.args) != 2:
            raise call.fail(f"{call.target} with extra arguments has no rounding-error rule")
        out = call.run()
        error, size = torch.zeros_like(out), torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        for value, bound in zip(call.args, call.bounds):
            if bound is not None:
                error = error + bound[0]
                size = size + broadcast_factor(value, out, "l2", call) * bound[1]
        return _rounded(call, out, error, size)


register(AddSub(), operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract,
         "add", "add_", "sub", "sub_", "subtract")


class Scale(Rule):
    """c * a and a / c with c input-independent (a number or a tensor)."""

    summary = ("max|c| bf L (max|1/c| for a division); products or quotients of two input-dependent tensors are "
               "refused (not globally Lipschitz). Rounding: |c| E + u |y|, max|c| bf d + u ||y||")

    def __init__(self, divide: bool) -> None:
        self.divide = divide

    def factor(self, call: Call) -> tuple[int, Any]:
        """(index of the input-dependent operand, the constant factor it is multiplied by)."""
        if self.divide:
            if call.bound(1, "other") is not None:
                raise call.fail("division by an input-dependent tensor (not globally Lipschitz)")
            if call.kwargs.get("rounding_mode") is not None:
                raise call.fail("rounding division is not Lipschitz")
            call.require_constant(0)
            denominator = call.arg(1, "other")
            if isinstance(denominator, torch.Tensor):
                return 0, 1.0 / denominator.detach()
            return 0, 1.0 / float(denominator)
        dependent = [i for i, key in enumerate(_BINARY) if call.bound(i, key) is not None]
        if len(dependent) != 1:
            raise call.fail("product of two input-dependent tensors (not globally Lipschitz)")
        return dependent[0], call.arg(1 - dependent[0], _BINARY[1 - dependent[0]])

    def lipschitz(self, call: Call) -> float:
        index, factor = self.factor(call)
        return _max_abs(factor) * broadcast_factor(call.arg(index, _BINARY[index]), call.out, call.norm, call) \
            * call.bound(index, _BINARY[index])

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        index, factor = self.factor(call)
        if call.kwargs or (isinstance(factor, torch.Tensor) and not bool(torch.isfinite(factor).all())) or (
                not isinstance(factor, torch.Tensor) and not math.isfinite(factor)):
            raise call.fail(f"{call.target} is bounded only for an input-dependent tensor and a finite constant")
        out = call.run()
        error, size = call.bounds[index]
        magnitude = factor.abs() if isinstance(factor, torch.Tensor) else abs(factor)
        spread = broadcast_factor(call.args[index], out, "l2", call)
        # dividing by c rounds once, as multiplying by 1/c does: the exact quotient is (a / c)
        return _rounded(call, out, magnitude * error, _max_abs(magnitude) * spread * size)


register(Scale(divide=False), operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", "multiply")
register(Scale(divide=True), operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide, "div",
         "div_", "divide", "true_divide")


class MatMul(Rule):
    summary = "x @ W, W @ x with W a constant 2-d matrix: the operator norm of W (l2 spectral norm, linf row sums)"

    def lipschitz(self, call: Call) -> float:
        left, right = call.bound(0, "input"), call.bound(1, "other")
        if (left is None) == (right is None):
            raise call.fail("matmul needs exactly one input-dependent operand")
        weight = call.args[1] if left is not None else call.args[0]
        value = call.args[0] if left is not None else call.args[1]
        if weight.dim() != 2 or value.dim() < (2 if left is not None else 3):
            raise call.fail("matmul supported only with a constant 2-d matrix acting on non-batch dims")
        matrix = weight.t() if left is not None else weight
        return call.cached_for(weight, f"norm-{call.norm}", lambda: lb.linear_bound(matrix, call.norm)) \
            * (left if left is not None else right)


register(MatMul(), operator.matmul, torch.matmul, torch.mm, "matmul", "mm")


# ----------------------------------------------------------------------------- reductions


def reduced_count(call: Call) -> int:
    x = call.args[0]
    dims = call.arg(1, "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise call.fail("reduction over all dimensions (includes the batch)")
    dims = [dims] if isinstance(dims, int) else list(dims)
    normalized = {_dim(int(d), x.dim()) for d in dims}
    if 0 in normalized:
        raise call.fail("reduction over the batch dimension")
    return math.prod(x.shape[d] for d in normalized)


class Sum(Rule):
    """mean and sum over non-batch dimensions of n entries."""

    summary = ("mean: l2 n^-1/2, linf 1; sum: l2 n^1/2, linf n. Rounding: the same non-negative map of E plus "
               "gamma_{n+1} times it of |x|")

    def __init__(self, mean: bool) -> None:
        self.mean = mean

    def lipschitz(self, call: Call) -> float:
        call.require_constant(0)
        count = reduced_count(call)
        if self.mean:
            return (1.0 if call.norm == "linf" else 1.0 / math.sqrt(count)) * call.bound(0)
        return (float(count) if call.norm == "linf" else math.sqrt(count)) * call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        options = {k: v for k, v in call.kwargs.items() if k not in ("dim", "keepdim")}
        if options:
            raise call.fail(f"{call.target} with {sorted(options)} has no rounding-error rule")
        count = reduced_count(call)
        dim, keepdim = call.arg(1, "dim"), call.arg(2, "keepdim", False)
        x, (error, size) = call.args[0], call.bounds[0]
        reduce = torch.mean if self.mean else torch.sum
        out = reduce(x, dim=dim, keepdim=keepdim)
        relative = gamma(count + 1, call.unit_roundoff)
        componentwise = call.componentwise_bound(lambda: reduce(error, dim=dim, keepdim=keepdim)
                                                 + relative * reduce(x.abs(), dim=dim, keepdim=keepdim))
        # Cauchy-Schwarz: a sum of n entries has at most sqrt(n) times their l2 norm (a mean 1/sqrt(n))
        factor = 1.0 / math.sqrt(count) if self.mean else math.sqrt(count)
        return out, (componentwise * BOUND_SLACK, factor * (size + relative * l2(x)) * BOUND_SLACK)


register(Sum(mean=True), torch.mean, "mean")
register(Sum(mean=False), torch.sum, "sum")


class Extremum(Rule):
    """amax/amin over non-batch dims; max/min(x, dim) (values, indices); maximum/minimum(a, b)."""

    summary = ("elementwise maximum/minimum(a, b): l2 sqrt(bf_a^2 L_a^2 + bf_b^2 L_b^2), linf max; reductions: 1 "
               "(indices: not Lipschitz, refused where used). Rounding: exact; max of the operands' E")

    @staticmethod
    def binary(call: Call) -> bool:
        return isinstance(call.arg(1, "other", call.kwargs.get("dim")), torch.Tensor)

    def lipschitz(self, call: Call) -> Any:
        if self.binary(call):
            parts = [broadcast_factor(call.args[i], call.out, call.norm, call) * call.bounds[i]
                     for i in (0, 1) if call.bounds[i] is not None]
            return max(parts) if call.norm == "linf" else math.sqrt(sum(p * p for p in parts))
        call.require_constant(0)
        reduced_count(call)
        return (call.bound(0), NOT_LIPSCHITZ) if isinstance(call.out, tuple) else call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, Any]:
        out = call.run()
        if self.binary(call):
            errors = [b[0] if b is not None else torch.zeros_like(out) for b in call.bounds[:2]]
            sizes = [broadcast_factor(value, out, "l2", call) * bound[1]
                     for value, bound in zip(call.args, call.bounds) if bound is not None]
            return out, (torch.maximum(*errors).expand_as(out), torch.sqrt(sum(s * s for s in sizes)) * BOUND_SLACK)
        call.require_constant(0)
        reduced_count(call)
        dim, keepdim = call.arg(1, "dim"), call.arg(2, "keepdim", False)
        error, size = call.bounds[0]
        # |max a - max b| <= max |a - b| per group; groups are disjoint, so d passes
        bound = (torch.amax(error, dim=dim, keepdim=keepdim), size)
        return out, ((bound, NOT_LIPSCHITZ) if isinstance(out, tuple) else bound)


register(Extremum(), torch.amax, torch.amin, "amax", "amin", torch.max, torch.min, "max", "min", torch.maximum,
         torch.minimum, "maximum", "minimum")


class Sort(Rule):
    summary = ("sorting along a non-batch dim: 1 in every lp norm (values; indices are not Lipschitz). "
               "Rounding: exact; each output moves by at most the largest error along that dim")

    @staticmethod
    def dim(call: Call) -> int:
        call.require_constant(0)
        dim = call.arg(1, "dim", -1)
        if isinstance(dim, bool) or _dim(int(dim), call.args[0].dim()) == 0:
            raise call.fail("sorts along the batch dimension")
        return dim

    def lipschitz(self, call: Call) -> tuple:
        self.dim(call)
        return (call.bound(0), NOT_LIPSCHITZ)

    def rounding(self, call: Call) -> tuple[Any, Any]:
        dim = self.dim(call)
        out = call.run()
        error, size = call.bounds[0]
        return out, ((error.amax(dim=dim, keepdim=True).expand_as(error), size), NOT_LIPSCHITZ)


register(Sort(), torch.sort, "sort")
