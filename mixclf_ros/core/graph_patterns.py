"""Joint l2 bounds of traced patterns whose parts are more Lipschitz together than apart.

The generic rules bound `maximum(a, b)` by `sqrt(L_a^2 + L_b^2)` and `cat(t_1, ..., t_n)` by
`sqrt(sum L_i^2)`, as if the operands moved independently. MaxMin and GroupSort activations, as
Lipschitz-network libraries and users write them, take `max` and `min` of two parts of one tensor
and concatenate them; each is sqrt(2)-Lipschitz alone by the generic rules, so their cat gets 2
where the activation is 1-Lipschitz. The patterns are recognised from the graph (never from a
layer's name or claimed constant), with `parts`: for each value that is a restriction of another
(slicing, strided views, chunk/split/unbind, reshapes), its base value and the coordinates of the
base it holds, found by replaying the restriction on coordinate numbers (`engine`).

- elementwise pair `max(a, b)`, `min(a, b)` (same two operands, no broadcasting): per coordinate
  the pair is the sorted pair (a_j, b_j), and sorting is 1-Lipschitz in l2, so `||d max||^2 +
  ||d min||^2 <= ||d a||^2 + ||d b||^2`; when a and b are disjoint restrictions of one tensor s,
  `||d a||^2 + ||d b||^2 <= ||d s||^2`. The same holds for `max(a, b)` alone.
- reduction pair `max(y, dim)`, `min(y, dim)` (values; amax/amin) over groups of at least two
  elements: per group, max and min are two different entries of the sorted group, so the pair's
  squared change is at most the group's; groups are disjoint, so the total is `<= ||d y||^2`.

The same inequalities hold for rounding errors (the operations are exact), so the rounding
domain's per-sample l2 bounds use them too. Unmatched operands keep their own `L_i^2`. A result
is used only when it is smaller than the generic bound (both are sound).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

CATS = {torch.cat, torch.concat, torch.concatenate}
_MAXIMA = {torch.maximum, torch.max, torch.amax, "maximum", "max", "amax"}
_MINIMA = {torch.minimum, torch.min, torch.amin, "minimum", "min", "amin"}

class Parts(dict):
    """value -> (the value it restricts, the coordinates of that value it holds, in its own shape).

    Remembers which pairs are disjoint restrictions of one value: the coordinates depend on the
    plan's shapes only, so the check runs once per pair, not at every frame."""

    def __init__(self) -> None:
        super().__init__()
        self.disjoint: dict[tuple[fx.Node, fx.Node], fx.Node | None] = {}

    def __setitem__(self, node: fx.Node, part: tuple[fx.Node, Any]) -> None:
        self.disjoint.clear()
        super().__setitem__(node, part)


def _target_in(node: Any, targets: set) -> bool:
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    try:
        return node.target in targets
    except TypeError:
        return False


def disjoint_base(a: fx.Node, b: fx.Node, parts: Parts) -> fx.Node | None:
    """The value s of which a and b are disjoint restrictions (no coordinate of s in both, none
    twice in either), or None."""
    if a not in parts or b not in parts or parts[a][0] is not parts[b][0]:
        return None
    if (a, b) not in parts.disjoint:
        together = torch.cat([parts[a][1].flatten(), parts[b][1].flatten()])
        parts.disjoint[(a, b)] = parts[a][0] if together.unique().numel() == together.numel() else None
    return parts.disjoint[(a, b)]


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


def _pair_square(key: tuple, bounds: dict, parts: Parts) -> Any:
    if key[0] == "reduce":
        return bounds[key[1]] ** 2
    a, b = tuple(key[1])
    base = disjoint_base(a, b, parts)
    if base is not None and bounds.get(base) is not None:
        return bounds[base] ** 2
    return bounds[a] ** 2 + bounds[b] ** 2


def _operands_known(key: tuple, bounds: dict) -> bool:
    return all(bounds.get(n) is not None for n in (key[1:2] if key[0] == "reduce" else key[1]))


def joint_l2(node: fx.Node, bounds: dict, values: dict, parts: Parts) -> Any:
    """The joint l2 bound of a cat of max/min pairs, or of a maximum/minimum of two disjoint parts
    of one tensor; None where no pattern applies. Bounds may be numbers or per-sample tensors."""
    tag = _extremum(node, values) if node.op in ("call_function", "call_method") else None
    if tag is not None and tag[1][0] == "pair" and _operands_known(tag[1], bounds):
        a, b = tuple(tag[1][1])
        base = disjoint_base(a, b, parts)
        return None if base is None or bounds.get(base) is None else bounds[base]
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
                if not _operands_known(tag_i[1], bounds):
                    continue
                used |= {i, j}
                total = total + _pair_square(tag_i[1], bounds, parts)
                paired = True
                break
    if not paired:
        return None
    for k, (operand, _) in enumerate(tagged):
        if k not in used:
            total = total + bounds[operand] ** 2
    return total ** 0.5


_SUBS = {operator.sub, torch.sub, "sub"}
_MULS = {operator.mul, torch.mul, "mul"}
_RELUS = {torch.relu, torch.nn.functional.relu, "relu"}


def _only_call(node: Any, targets: set) -> bool:
    return _target_in(node, targets) and isinstance(node, fx.Node)


def _conv_options(node: fx.Node, names: tuple[str, ...]) -> dict:
    return {name: node.args[i] if i < len(node.args) else node.kwargs.get(name) for i, name in enumerate(names)}


def gradient_step_l2(node: fx.Node, bounds: dict, values: dict, modules: dict) -> float | None:
    """The l2 bound of `s - c * conv_transpose2d(relu(conv2d(s, K) + b), K)` (an SDP-based
    Lipschitz layer, SLL, of Araujo et al. 2023, written as orthogonium writes it), or None.

    With D the difference quotients of ReLU (in [0, 1]), the map moves by
    `(I - c K^T D K)(s - s')`; K^T D K is symmetric positive semi-definite with norm at most
    `||K||^2`, so the factor's norm is at most `max(1, c ||K||^2 - 1)`: 1 whenever
    `c ||K||^2 <= 2`. K is the zero-padded convolution on s's size (its norm from
    `layer_bounds`), and conv_transpose2d with the same kernel, padding, groups and unit stride
    is its adjoint when the sizes match."""
    from mixclf_ros.core.layer_bounds import conv2d_weight_l2_bound

    if not _only_call(node, _SUBS) or len(node.args) != 2 or node.kwargs:
        return None
    source, step = node.args
    scale = 1.0
    if _only_call(step, _MULS) and len(step.args) == 2 and not step.kwargs:
        numbers = [a for a in step.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        tensors = [a for a in step.args if isinstance(a, fx.Node)]
        if len(numbers) != 1 or len(tensors) != 1:
            return None
        scale, step = float(numbers[0]), tensors[0]
    conv_t = step
    if not (isinstance(conv_t, fx.Node) and conv_t.op == "call_function"
            and conv_t.target in (torch.nn.functional.conv_transpose2d, torch.conv_transpose2d)):
        return None
    transpose = _conv_options(conv_t, ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                                       "dilation"))
    activation = transpose["input"]
    is_relu = isinstance(activation, fx.Node) and (
        _only_call(activation, _RELUS) or (activation.op == "call_module"
                                           and type(modules.get(activation.target)) is torch.nn.ReLU))
    if not is_relu or transpose["bias"] is not None:
        return None
    affine = activation.args[0]
    if _only_call(affine, {operator.add, torch.add, "add"}) and len(affine.args) == 2 and not affine.kwargs:
        constant = [a for a in affine.args if not (isinstance(a, fx.Node) and bounds.get(a) is not None)]
        dependent = [a for a in affine.args if isinstance(a, fx.Node) and bounds.get(a) is not None]
        if len(constant) != 1 or len(dependent) != 1:
            return None
        affine = dependent[0]
    if not (isinstance(affine, fx.Node) and affine.op == "call_function"
            and affine.target in (torch.nn.functional.conv2d, torch.conv2d)):
        return None
    forward = _conv_options(affine, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    if forward["input"] is not source or bounds.get(source) is None or not isinstance(forward["weight"], fx.Node):
        return None
    kernel, kernel_t = values[forward["weight"]], values.get(transpose["weight"])
    unit = (None, 1, (1, 1), [1, 1])
    same = (forward["padding"] or 0) == (transpose["padding"] or 0) and (forward["groups"] or 1) == (
        transpose["groups"] or 1)
    if not (isinstance(kernel_t, torch.Tensor) and (kernel_t is kernel or torch.equal(kernel_t, kernel)) and same
            and all(option in unit for option in (forward["stride"], forward["dilation"], transpose["stride"],
                                                  transpose["dilation"]))
            and transpose["output_padding"] in (None, 0, (0, 0), [0, 0])
            and values[node].shape == values[source].shape and scale > 0):
        return None
    x = values[source]
    norm = conv2d_weight_l2_bound(kernel, (x.shape[-2], x.shape[-1]), forward["padding"] or 0, 1,
                                  forward["groups"] or 1)
    return bounds[source] * max(1.0, scale * norm * norm - 1.0)
