"""Sound upper bounds of a network's Lipschitz constant in l2 and linf, over its traced graph.

`logit_lipschitz_bound(model, norm, input_shape)` bounds the operator norm of the logits map,
`||z(x) - z(x')||_p <= L ||x - x'||_p` for all x, x' (p = `norm`, inputs in [0,1]-pixel units),
for the model in eval mode, in exact arithmetic (Theorem 1 needs `Lip_p(h_i)`; see
`probability_lipschitz_bound`).

How: the model is traced with `torch.fx` (any `nn.Module` with its own forward, as long as the
forward has no data-dependent control flow); the layers of `layer_bounds.LEAF_TYPES` stay whole,
everything else is traced through. The graph is then evaluated node by node on a dummy batch,
carrying for every input-dependent node a bound of its Lipschitz constant with respect to the model
input: a layer or function multiplies its operand's bound by its own operator norm
(`layer_bounds`, `graph_ops`), an add sums its operands' bounds (triangle inequality; residual
connections of any depth), a cat combines them (l2 root of the sum of squares, linf max; jointly
for MaxMin pairs, `graph_patterns`). Bounds
come from the actual weights (parametrizations evaluated as they compute), never from a layer's
claimed constant.

What is refused, by name, with `UnsupportedLayerError` (the walker never guesses):
- operations without a rule, on input-dependent values (and random operations anywhere);
- forward hooks or pre-hooks (per module or global), instance-level overrides of `forward`,
  `__call__` or any other method (`Conv2d._conv_forward`, say), leaf layers whose class forward is
  not the library's own;
- in-place operations that mutate the model input, a parameter/buffer, or a tensor that is read
  later through another view. An in-place operation on a tensor read later directly (the skip input
  of a residual block, say) is bounded as what runs: later reads see the mutated value.
- a forward whose traced graph does not reproduce the model's outputs on the dummy batch, or
  that mixes samples of a batch.
The forward must be a pure function of its input, parameters and buffers: Python-side state that
changes between calls is beyond what a trace can see.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules import module as _module_globals

from mixclf_ros.core import graph_ops, graph_patterns
from mixclf_ros.core import layer_bounds as lb
from mixclf_ros.core.certify import softmax_lipschitz_factor
from mixclf_ros.core.layer_bounds import (  # noqa: F401  (re-exported: the per-layer API)
    NUMERIC_SLACK,
    UnsupportedLayerError,
    circular_conv_spectral_norm,
    conv2d_l2_bound,
    conv_linf_bound,
    linear_bound,
)
from mixclf_ros.core.lipschitz_search import jacobian_norm_lower_bound, probability_gradient_norm_search

NORMS = lb.NORMS
DUMMY_BATCH = 2
"""Batch size of the dummy input: with 2 samples, ops that move or mix the batch are detected."""

_GLOBAL_FORWARD_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")
_CALL_OVERRIDES = ("forward", "__call__", "_call_impl", "_wrapped_call_impl", "_slow_forward")


# ----------------------------------------------------------------------------- what runs


def _defining_class(kind: type, attribute: str) -> type:
    return next(klass for klass in kind.__mro__ if attribute in vars(klass))


def check_runs_as_traced(model: nn.Module, name: str) -> None:
    """Refuses what a trace would not see: forward hooks/pre-hooks, instance-level forward or call
    overrides, a class-level `__call__` that is not nn.Module's, and leaf layers whose forward is
    not the one their library defines (patched classes)."""
    for hooks in _GLOBAL_FORWARD_HOOKS:
        if getattr(_module_globals, hooks, None):
            raise UnsupportedLayerError(f"global forward hooks ({hooks}) are registered; they may change outputs")
    for path, module in model.named_modules():
        where = f"{name}.{path}" if path else name
        if module._forward_hooks or module._forward_pre_hooks:
            raise UnsupportedLayerError(f"{where}: has forward hooks that may change its output")
        kind = type(module)
        overridden = [attribute for attribute in _CALL_OVERRIDES if attribute in vars(module)]
        overridden += [attribute for attribute, value in vars(module).items()
                       if callable(value) and callable(getattr(kind, attribute, None)) and attribute not in overridden]
        if overridden:
            raise UnsupportedLayerError(f"{where}: {kind.__qualname__} has an instance-level "
                                        f"{overridden[0]} override (a wrapper); the bound would not describe it")
        for attribute in ("__call__", "_call_impl", "_wrapped_call_impl"):
            if getattr(kind, attribute) is not getattr(nn.Module, attribute):
                raise UnsupportedLayerError(f"{where}: {kind.__qualname__} overrides nn.Module.{attribute}")
        if lb.layer_type(module) in lb.LEAF_TYPES:
            owner = _defining_class(kind, "forward")
            forward = vars(owner)["forward"]
            if (getattr(forward, "__qualname__", "") != f"{owner.__qualname__}.forward"
                    or getattr(forward, "__module__", "") != owner.__module__):
                raise UnsupportedLayerError(f"{where}: {owner.__qualname__}.forward was replaced")


# ----------------------------------------------------------------------------- tracing


class _Proxy(fx.Proxy):
    """Records augmented assignments (`a += b`) as in-place calls; plain fx records them as `a + b`,
    losing the mutation of every other reference to `a`."""


def _augmented(op: Callable) -> Callable:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


_AUGMENTED = {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
              "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
              "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
              "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
              "__irshift__": operator.irshift}
for _method, _op in _AUGMENTED.items():
    setattr(_Proxy, _method, _augmented(_op))


class _Tracer(fx.Tracer):
    """Keeps the bounded layers (and all torch.nn library layers, refused later if unknown) whole;
    keeps tensor constants out of the traced model (plain fx would store them on it)."""

    proxy_buffer_attributes = True  # buffers become graph nodes, so writes to them are seen

    def __init__(self) -> None:
        super().__init__()
        self.constants: dict[str, torch.Tensor] = {}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if lb.layer_type(module) in lb.LEAF_TYPES or isinstance(module, torch.jit.ScriptModule):
            return True
        return super().is_leaf_module(module, qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) \
                and not any(a is buffer for buffer in self.root.buffers()):
            key = f"<constant {len(self.constants)}>"
            self.constants[key] = a
            return self.create_node("get_attr", key, (), {})
        return super().create_arg(a)


def trace_forward(model: nn.Module, name: str) -> tuple[fx.Graph, dict[str, torch.Tensor]]:
    """The fx graph of `model`'s forward, with the layers `layer_bounds` knows (and all torch.nn
    library layers) kept whole as call_module nodes, and its tensor constants by get_attr name.
    In-place operations are recorded as such (see `resolve_inplace`). Raises UnsupportedLayerError."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except UnsupportedLayerError:
        raise
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        raise UnsupportedLayerError(f"{name}: torch.fx cannot trace the forward ({type(error).__name__}: "
                                    f"{message})") from error
    return graph, tracer.constants


# ----------------------------------------------------------------------------- in-place operations

_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
                 "transpose", "swapaxes", "swapdims", "t", "expand", "expand_as", "contiguous", "detach", "to",
                 "float", "double", "half", "type_as", "cpu", "cuda", "narrow", "select", "chunk", "split", "unbind",
                 "as_strided", "movedim", "diagonal", "__getitem__"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                   torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, torch.detach, torch.t,
                   torch.movedim, torch.broadcast_to, torch.unflatten, torch.as_strided, operator.getitem, getattr,
                   *(target for target in graph_ops.RULES if "dropout" in getattr(target, "__name__", ""))}
"""Functions whose result may share storage with their first operand (eval-mode dropout returns it)."""


def _mutated_operand(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """The operand an in-place node writes to (None if it writes nothing)."""
    if node.op == "call_module":
        return node.args[0] if node.args and getattr(modules[node.target], "inplace", False) is True else None
    if node.op not in ("call_function", "call_method"):
        return None
    if "out" in node.kwargs:
        raise UnsupportedLayerError(f"{node.name}: out= arguments are not supported")
    target = node.target
    op = target if isinstance(target, str) else getattr(target, "__name__", "")
    if target in _AUGMENTED.values() or target is operator.setitem or (
            op.endswith("_") and not op.startswith("__")):
        return node.args[0]
    if node.kwargs.get("inplace") is True:
        return node.args[0]
    if callable(target) and not isinstance(target, str):
        try:
            bound = inspect.signature(target).bind_partial(*node.args, **node.kwargs)
        except (TypeError, ValueError):
            return None
        if bound.arguments.get("inplace") is True:
            return node.args[0]
    return None


def _is_view_edge(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], lb.SHAPE_OR_IDENTITY)
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _aliased_operand(node: fx.Node, modules: dict[str, nn.Module], mutated: dict[fx.Node, fx.Node]) -> Any:
    """The operand whose storage `node`'s result may share: the written operand of an in-place
    node, the first operand of a view; None for fresh results."""
    if node in mutated:
        return mutated[node]
    if _is_view_edge(node, modules) and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _alias_class(start: fx.Node, modules: dict[str, nn.Module], mutated: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """Nodes that may share storage with `start`: connected through views and in-place ops."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        neighbours = [user for user in node.users if _aliased_operand(user, modules, mutated) is node]
        source = _aliased_operand(node, modules, mutated)
        if source is not None:
            neighbours.append(source)
        for other in neighbours:
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def resolve_inplace(graph: fx.Graph, modules: dict[str, nn.Module], name: str) -> None:
    """Rewrites the graph so that it computes what runs: after an in-place node m writes to a, later
    reads of a read m. Refuses writes to the model input or a parameter/buffer, and writes to a
    tensor that is read later through another view (those reads would see the new values too).
    Nodes are taken in execution order, so chains of in-place writes see the rewritten operands."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    mutated: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        target = _mutated_operand(node, modules)
        if not isinstance(target, fx.Node):
            continue
        mutated[node] = target
        aliases = _alias_class(target, modules, mutated)
        stored = [a for a in aliases if a.op in ("placeholder", "get_attr")]
        if stored:
            what = "the model input" if stored[0].op == "placeholder" else f"{stored[0].target}"
            raise UnsupportedLayerError(f"{name}: in-place operation {node.name} writes to {what}")
        for alias in aliases:
            if order[alias] >= order[node]:
                continue
            later = [user for user in alias.users if order[user] > order[node]]
            if later and alias is not target:
                raise UnsupportedLayerError(f"{name}: in-place operation {node.name} changes {alias.name}, "
                                            f"which is read later through a view")
            for user in later:
                user.replace_input_with(target, node)


# ----------------------------------------------------------------------------- the walk


def _fetch(model: nn.Module, target: str, constants: dict[str, torch.Tensor]) -> Any:
    if target in constants:
        return constants[target]
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _check_batch(value: Any, batch: int, where: str) -> None:
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, torch.Tensor) and (item.dim() == 0 or item.shape[0] != batch):
            raise UnsupportedLayerError(f"{where}: an input-dependent tensor of shape {tuple(item.shape)} "
                                        f"has lost the batch dimension")


def _call(node: fx.Node, modules: dict[str, nn.Module], args: Any, kwargs: Any, arg_bounds: Any, kwarg_bounds: Any,
          norm: str, batch: int, where: str) -> tuple[Any, Any]:
    """(value, bound) of one call node; bound None for a value that does not depend on the input."""
    dependent = graph_ops.is_dependent(arg_bounds) or graph_ops.is_dependent(kwarg_bounds)
    target = node.target
    op = target if isinstance(target, str) else getattr(target, "__name__", "")
    if node.op in ("call_function", "call_method") and op in graph_ops.RANDOM_OPS:
        raise UnsupportedLayerError(f"{where}: random operation {graph_ops.op_name(target)}")
    if node.op == "call_module":
        module = modules[target]
        kind = lb.layer_type(module)
        if dependent and (kind not in lb.LEAF_TYPES or len(args) != 1 or kwargs):
            raise UnsupportedLayerError(f"{where}: unsupported layer {kind.__module__}.{kind.__qualname__}")
        out = module(*args, **kwargs)
        bound = lb.leaf_bound(module, args[0], out, norm, where) * arg_bounds[0] if dependent else None
    else:
        out = target(*args, **kwargs) if node.op == "call_function" else getattr(args[0], target)(*args[1:], **kwargs)
        shape_query = op in graph_ops.SHAPE_QUERIES | graph_ops.SHAPE_ONLY or op == "len" or (
            target is getattr and args[1] in graph_ops.SHAPE_QUERIES)
        if not dependent or shape_query:
            return out, None
        selects = node.op == "call_function" and target in (operator.getitem, getattr)
        if not selects and _uses_non_lipschitz((arg_bounds, kwarg_bounds)):
            raise UnsupportedLayerError(f"{where}: uses a value that is not a Lipschitz function of the input "
                                        f"(indices of a sort/max)")
        call = graph_ops.OpCall(where, tuple(args), dict(kwargs), tuple(arg_bounds), dict(kwarg_bounds), out, norm,
                                batch)
        bound = graph_ops.op_bound(target, call)
    if bound is not None:
        selects = node.op == "call_function" and target in (operator.getitem, getattr)
        if not isinstance(bound, tuple) and not math.isfinite(bound) and not selects:
            raise UnsupportedLayerError(f"{where}: the bound is not finite ({bound})")
        _check_batch(out, batch, where)
    return out, bound


def _uses_non_lipschitz(bounds: Any) -> bool:
    """Whether an operand is an input-dependent value that is not Lipschitz (sort/max indices)."""
    if isinstance(bounds, dict):
        return any(_uses_non_lipschitz(b) for b in bounds.values())
    if isinstance(bounds, (list, tuple)):
        return any(_uses_non_lipschitz(b) for b in bounds)
    return isinstance(bounds, float) and not math.isfinite(bounds)


def _walk(model: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor], dummy: torch.Tensor,
          norm: str, name: str) -> tuple[float, torch.Tensor]:
    """(bound, output) of the traced graph at the dummy batch."""
    modules = dict(model.named_modules())
    values: dict[fx.Node, Any] = {}
    bounds: dict[fx.Node, Any] = {}
    batch = dummy.shape[0]
    for node in graph.nodes:
        where = f"{name}.{node.target}" if node.op == "call_module" else f"{name}: {node.name}"
        if node.op == "placeholder":
            if not bounds:  # the first placeholder is the model input
                values[node], bounds[node] = dummy, 1.0
                continue
            if not node.args:
                raise UnsupportedLayerError(f"{where}: forward takes a second input")
            values[node], bounds[node] = node.args[0], None
            continue
        if node.op == "get_attr":
            values[node], bounds[node] = _fetch(model, node.target, constants), None
            continue
        args = fx.node.map_arg(node.args, values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
        if node.op == "output":
            result, bound = args[0], fx.node.map_arg(node.args[0], bounds.__getitem__)
            if not isinstance(result, torch.Tensor):
                raise UnsupportedLayerError(f"{name}: the forward returns a {type(result).__name__}, not a tensor")
            if bound is not None and not math.isfinite(bound):
                raise UnsupportedLayerError(f"{name}: the output is not a Lipschitz function of the input")
            return (0.0 if bound is None else bound), result
        arg_bounds = fx.node.map_aggregate(node.args, lambda a: bounds[a] if isinstance(a, fx.Node) else None)
        kwarg_bounds = fx.node.map_aggregate(node.kwargs, lambda a: bounds[a] if isinstance(a, fx.Node) else None)
        try:
            out, bound = _call(node, modules, args, kwargs, arg_bounds, kwarg_bounds, norm, batch, where)
        except UnsupportedLayerError:
            raise
        except Exception as error:  # a rule or the op itself fails on what it was given: refuse, naming it
            raise UnsupportedLayerError(f"{where}: {type(error).__name__}: {error}") from error
        if norm == "l2" and isinstance(bound, float):
            joint = graph_patterns.joint_cat_l2(node, bounds, values)
            bound = bound if joint is None else min(bound, joint)
        values[node], bounds[node] = out, bound
    raise UnsupportedLayerError(f"{name}: the traced graph has no output")


@contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _reference(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), None)
    dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
    return dtype, (reference.device if reference is not None else torch.device("cpu"))


def logit_lipschitz_bound(model: nn.Module, norm: str, input_shape: Sequence[int]) -> float:
    """Sound upper bound of the logits' Lipschitz constant, operator norm `norm` -> `norm`.

    Args:
        model: any `nn.Module` that torch.fx can trace, built from the operations the walker
            bounds (see the module docstring), taking (N, *input_shape) inputs in [0,1]-pixel
            units. Evaluated in eval mode (its modes are restored after).
        norm: "l2" or "linf".
        input_shape: (C, H, W) (or (features,)) without the batch dimension.

    Returns:
        L with `||z(x) - z(x')||_norm <= L ||x - x'||_norm` for all inputs (eval mode, exact
        arithmetic). Raises `UnsupportedLayerError` naming the first layer or operation it cannot
        bound.
    """
    lb.check_norm(norm)
    name = type(model).__qualname__
    check_runs_as_traced(model, name)
    dtype, device = _reference(model)
    generator = torch.Generator().manual_seed(0)
    dummy = torch.rand((DUMMY_BATCH, *input_shape), generator=generator, dtype=torch.float64)
    dummy = dummy.to(device=device, dtype=dtype)
    with _eval_mode(model), torch.no_grad():
        graph, constants = trace_forward(model, name)
        resolve_inplace(graph, dict(model.named_modules()), name)
        bound, walked = _walk(model, graph, constants, dummy.clone(), norm, name)
        try:
            direct = model(dummy.clone())
            single = model(dummy[:1].clone())
        except Exception as error:
            raise UnsupportedLayerError(f"{name}: the model fails on a dummy batch ({type(error).__name__}: "
                                        f"{error})") from error
    if not isinstance(direct, torch.Tensor) or direct.shape != walked.shape or not torch.allclose(
            direct, walked, rtol=1e-4, atol=1e-5):
        raise UnsupportedLayerError(f"{name}: the model's outputs differ from those of its traced graph")
    if not torch.allclose(single, direct[:1], rtol=1e-4, atol=1e-5):
        raise UnsupportedLayerError(f"{name}: the model's output for one sample depends on the rest of the batch")
    return bound


def probability_lipschitz_bound(model: nn.Module, norm: str, input_shape: Sequence[int]) -> float:
    """Per-class Lipschitz bound of the softmax probability outputs `Lip_p(h_i)` (Theorem 1),
    in `norm`, [0,1]-pixel units: `logit_lipschitz_bound * certify.softmax_lipschitz_factor(norm)`."""
    return logit_lipschitz_bound(model, norm, input_shape) * softmax_lipschitz_factor(norm)


__all__ = [
    "NORMS",
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
