"""Rules of the operations that combine, split or select tensors: cat/stack, chunk/split/unbind,
indexing, attribute access, constant padding and eval-mode dropout (see `bound_rules` for the
domains). Joint bounds of parts that move together (max/min pairs of disjoint parts of one
tensor) are in `graph_patterns`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from mixclf_ros.core.bound_rules import DROPOUT_FUNCTIONS, NOT_COMPUTED, Call, Rule, is_dependent, register
from mixclf_ros.core.numerics import BOUND_SLACK
from mixclf_ros.core.rules_layers import exact_map
from mixclf_ros.core.rules_ops import _dim


class Concatenate(Rule):
    summary = ("cat/stack along a non-batch dim: l2 sqrt(sum L_i^2) (jointly for max/min pairs, "
               "`graph_patterns`), linf max L_i. Rounding: exact; E concatenated, d = sqrt(sum d_i^2)")

    def lipschitz(self, call: Call) -> float:
        tensors, bounds = call.args[0], call.bounds[0]
        if _dim(int(call.arg(1, "dim", 0)), call.out.dim()) == 0:
            raise call.fail("concatenates along the batch dimension")
        if is_dependent(call.bounds[1:]) or is_dependent(call.kwarg_bounds):
            raise call.fail("dim depends on the input")
        for tensor, bound in zip(tensors, bounds):
            if bound is not None and tensor.dim() != call.out.dim() and call.out.dim() != tensor.dim() + 1:
                raise call.fail("inconsistent operand dimensions")
        parts = [b for b in bounds if b is not None]
        return max(parts) if call.norm == "linf" else sum(b * b for b in parts) ** 0.5

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        out = call.run()
        if _dim(int(call.arg(1, "dim", 0)), out.dim()) == 0:
            raise call.fail("concatenates along the batch dimension")
        tensors, bounds = call.args[0], call.bounds[0]
        parts = [torch.zeros_like(t) if b is None else b[0] for t, b in zip(tensors, bounds)]
        size = torch.sqrt(sum(b[1] ** 2 for b in bounds if b is not None)) * BOUND_SLACK
        return out, (call.target(parts, *call.args[1:], **call.kwargs), size)


register(Concatenate(), torch.cat, torch.concat, torch.concatenate, torch.stack)


class Split(Rule):
    """chunk/split (dim third) and unbind (dim second): each part is a restriction."""

    summary = "each part: L (a restriction to a subset of coordinates). Rounding: exact, E split alike, d each"

    def __init__(self, dim_index: int) -> None:
        self.dim_index = dim_index

    def check(self, call: Call) -> None:
        call.require_constant(0)
        if _dim(int(call.arg(self.dim_index, "dim", 0)), call.args[0].dim()) == 0:
            raise call.fail("splits along the batch dimension")

    def lipschitz(self, call: Call) -> tuple:
        self.check(call)
        return tuple(call.bound(0) for _ in call.out)

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        self.check(call)
        out = call.run()
        error, size = call.bounds[0]
        if error is NOT_COMPUTED:
            return out, tuple((NOT_COMPUTED, size) for _ in out)
        split = getattr(error, call.target)(*call.args[1:], **call.kwargs) if isinstance(call.target, str) \
            else call.target(error, *call.args[1:], **call.kwargs)
        return out, tuple((part, size) for part in split)


register(Split(2), torch.chunk, "chunk", torch.split, "split")
register(Split(1), torch.unbind, "unbind")


def _restriction_index(call: Call) -> Any:
    container, index = call.args
    if is_dependent(call.bounds[1]):
        raise call.fail("indexing with input-dependent indices")
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(item, (torch.Tensor, list)) for item in items):
        raise call.fail("advanced (tensor/list) indexing is not supported")
    first = items[0] if items else slice(None)
    explicit = sum(item is not None for item in items) - 1
    keeps_batch = first == slice(None) or (first is Ellipsis and explicit < container.dim())
    out = call.out
    if not keeps_batch or not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != call.batch:
        raise call.fail("indexes the batch dimension")
    return index


class GetItem(Rule):
    summary = ("an item of a tuple; basic (slice, integer) indexing of non-batch dims: L (a restriction). "
               "Rounding: exact, E indexed alike, d passes")

    def lipschitz(self, call: Call) -> Any:
        container, index = call.args
        if isinstance(container, (tuple, list)):
            return call.bounds[0][index] if isinstance(call.bounds[0], (tuple, list)) else call.bounds[0]
        _restriction_index(call)
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, Any]:
        container, index = call.args
        out = call.run()
        if isinstance(container, (tuple, list)):
            return out, call.bounds[0][index]
        call.out = out
        _restriction_index(call)
        return exact_map(call, out, call.bounds[0][0][index])


register(GetItem(), operator.getitem)


class GetAttr(Rule):
    summary = "`.values`/`.indices` of a sort or max result, `.data`: the part's bound"

    def lipschitz(self, call: Call) -> Any:
        value, attribute = call.args
        if attribute in ("values", "indices") and isinstance(value, tuple):
            return call.bounds[0][0 if attribute == "values" else 1]
        if attribute == "data" and isinstance(value, torch.Tensor):
            return call.bound(0)
        raise call.fail(f"attribute {attribute!r} of an input-dependent value is not supported")

    def rounding(self, call: Call) -> tuple[Any, Any]:
        return call.run(), self.lipschitz(call)


register(GetAttr(), getattr)


class Pad(Rule):
    summary = "constant padding of non-batch dims: 1 (coordinates added are constants). Rounding: exact, E padded by 0"

    def check(self, call: Call) -> None:
        call.require_constant(0)
        if call.arg(2, "mode", "constant") != "constant":
            raise call.fail("only constant padding is supported (reflect/replicate/circular copy pixels)")
        if len(call.arg(1, "pad")) // 2 >= call.args[0].dim():
            raise call.fail("pads the batch dimension")

    def lipschitz(self, call: Call) -> float:
        self.check(call)
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        self.check(call)
        return exact_map(call, call.run(), F.pad(call.bounds[0][0], call.arg(1, "pad")))


register(Pad(), F.pad)


class Dropout(Rule):
    summary = "functional dropout with training=False: the identity"

    def __init__(self, training_index: int) -> None:
        self.training_index = training_index

    def lipschitz(self, call: Call) -> Any:
        call.require_constant(0)
        if call.arg(self.training_index, "training", True):
            raise call.fail("dropout in training mode")
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, Any]:
        self.lipschitz(call)
        return call.args[0], call.bounds[0]


register(Dropout(2), *DROPOUT_FUNCTIONS)
