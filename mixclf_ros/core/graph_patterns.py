"""Joint l2 bounds of traced patterns whose parts are more Lipschitz together than apart.

The generic cat rule (`graph_ops`) bounds `cat(t_1, ..., t_n)` by `sqrt(sum L_i^2)`, as if the
operands moved independently. MaxMin activations, as Lipschitz-network libraries write them,
concatenate `max(a, b)` and `min(a, b)`; each is sqrt(2)-Lipschitz alone, so the generic rule
gives 2 where the activation is 1-Lipschitz. Two patterns are recognised from the graph (never
from a layer's name or claimed constant):

- elementwise pair `max(a, b)`, `min(a, b)` (same two operands, no broadcasting): per coordinate
  the pair is the sorted pair (a_j, b_j), and sorting is 1-Lipschitz in l2, so
  `||d max||^2 + ||d min||^2 <= ||d a||^2 + ||d b||^2`. When a and b are two different parts of
  one chunk/split/unbind of s, they are disjoint restrictions of s: `||d a||^2 + ||d b||^2 <=
  ||d s||^2`.
- reduction pair `max(y, dim)`, `min(y, dim)` (values; amax/amin) over groups of at least two
  elements: per group, max and min are two different entries of the sorted group, so the pair's
  squared change is at most the group's; groups are disjoint, so the total is `<= ||d y||^2`.

Unmatched operands keep their own `L_i^2`. The result is used only when it is smaller than the
generic bound (both are sound).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

CATS = {torch.cat, torch.concat, torch.concatenate}
_MAXIMA = {torch.maximum, torch.max, torch.amax, "maximum", "max", "amax"}
_MINIMA = {torch.minimum, torch.min, torch.amin, "minimum", "min", "amin"}
_PARTS = {torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind"}


def _target_in(node: Any, targets: set) -> bool:
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in targets
    except TypeError:
        return False


def _extremum(node: fx.Node, values: dict) -> tuple[str, tuple] | None:
    """("max" | "min", key) of an elementwise or reduction extremum; equal keys pair up."""
    source = node
    if source.op == "call_function" and source.target in (operator.getitem, getattr):
        selector = source.args[1]
        if selector not in (0, "values"):
            return None
        source = source.args[0]
    kind = "max" if _target_in(source, _MAXIMA) else "min" if _target_in(source, _MINIMA) else None
    if kind is None or not isinstance(source.args[0], fx.Node):
        return None
    first, second = source.args[0], source.args[1] if len(source.args) > 1 else source.kwargs.get("dim")
    if isinstance(second, fx.Node):  # elementwise maximum/minimum of two tensors
        if source is not node or len(source.args) != 2 or source.kwargs or first is second:
            return None
        shapes = {tuple(values[n].shape) for n in (first, second, node)}
        return (kind, ("pair", frozenset((first, second)))) if len(shapes) == 1 else None
    extra = {key: value for key, value in source.kwargs.items() if key not in ("dim", "keepdim")}
    if not isinstance(second, int) or extra or len(source.args) > 3:
        return None
    ndim = values[first].dim()
    dim = second + ndim if second < 0 else second
    if values[first].shape[dim] < 2 or (source is node and not _target_in(source, {torch.amax, torch.amin,
                                                                                     "amax", "amin"})):
        return None
    keepdim = source.args[2] if len(source.args) > 2 else source.kwargs.get("keepdim", False)
    return kind, ("reduce", first, dim, bool(keepdim))


def _pair_square(key: tuple, bounds: dict) -> float:
    if key[0] == "reduce":
        return bounds[key[1]] ** 2
    a, b = tuple(key[1])
    if all(n.op == "call_function" and n.target is operator.getitem for n in (a, b)) \
            and a.args[0] is b.args[0] and a.args[1] != b.args[1] and _target_in(a.args[0], _PARTS) \
            and isinstance(a.args[0].args[0], fx.Node):
        return bounds[a.args[0].args[0]] ** 2  # two disjoint parts of one tensor
    return bounds[a] ** 2 + bounds[b] ** 2


def joint_cat_l2(node: fx.Node, bounds: dict, values: dict) -> float | None:
    """l2 bound of a cat node using max/min pairs among its operands; None if none pair up."""
    if not _target_in(node, CATS) or not isinstance(node.args[0], (list, tuple)):
        return None
    operands = [o for o in node.args[0] if isinstance(o, fx.Node) and bounds.get(o) is not None]
    tagged = [(o, _extremum(o, values)) for o in operands]
    used: set[int] = set()
    total, paired = 0.0, False
    for i, (_, tag_i) in enumerate(tagged):
        if tag_i is None or i in used:
            continue
        for j, (_, tag_j) in enumerate(tagged):
            if j not in used and j != i and tag_j is not None and tag_j[1] == tag_i[1] and tag_j[0] != tag_i[0]:
                key = tag_i[1]
                if any(bounds.get(n) is None for n in (key[1:2] if key[0] == "reduce" else key[1])):
                    continue
                used |= {i, j}
                total += _pair_square(key, bounds)
                paired = True
                break
    if not paired:
        return None
    total += sum(bounds[o] ** 2 for k, (o, _) in enumerate(tagged) if k not in used)
    return math.sqrt(total)
