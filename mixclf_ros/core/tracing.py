"""What a bound is computed for: the traced graph of a model's forward, as it runs.

`trace_forward` records the forward with torch.fx, keeping layers that have a rule in
`bound_rules` whole (and all torch.nn library layers, refused later if they have none);
`check_runs_as_traced` refuses what a trace would not see (hooks, instance-level overrides, patched
library forwards); `resolve_inplace` rewrites in-place operations so that the graph computes what
runs; `freeze_parametrizations` replaces `torch.nn.utils.parametrize` weights by the tensors they
compute at inference, so that every later step bounds exactly the weights the layer uses.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules import module as _module_globals
from torch.nn.utils import parametrize

from mixclf_ros.core.bound_rules import (
    DROPOUT_FUNCTIONS,
    SUBCLASSED_LAYERS,
    UnsupportedLayerError,
    has_layer_rule,
    inherits_forward,
    is_shape_or_identity,
)

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
        if has_layer_rule(module):
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
        self.inside: list[tuple[str, type]] = []
        """The modules being traced through, outermost first (named when a trace fails)."""

    def call_module(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(module)
        self.inside.append((path, type(module)))
        result = super().call_module(module, forward, args, kwargs)
        self.inside.pop()
        return result

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if has_layer_rule(module) or isinstance(module, torch.jit.ScriptModule):
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
    """The fx graph of `model`'s forward, with the layers that have a rule (and all torch.nn
    library layers) kept whole as call_module nodes, and its tensor constants by get_attr name.
    In-place operations are recorded as such (see `resolve_inplace`). Raises UnsupportedLayerError."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except UnsupportedLayerError:
        raise
    except Exception as error:
        message = " ".join(str(error).split())[:300]
        where = name
        if tracer.inside:
            path, kind = tracer.inside[-1]
            where = f"{name}.{path} ({kind.__module__}.{kind.__qualname__})"
        raise UnsupportedLayerError(
            f"{where}: torch.fx cannot trace the forward ({type(error).__name__}: {message}); a layer whose "
            "forward branches on its input (its values or its shape) needs a rule of its own "
            "(docs/SUPPORTED_OPERATIONS.md); or declare the model's constant") from error
    return graph, tracer.constants


# ----------------------------------------------------------------------------- in-place operations

_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
                 "transpose", "swapaxes", "swapdims", "t", "expand", "expand_as", "contiguous", "detach", "to",
                 "float", "double", "half", "type_as", "cpu", "cuda", "narrow", "select", "chunk", "split", "unbind",
                 "as_strided", "movedim", "diagonal", "__getitem__"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                   torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, torch.detach, torch.t,
                   torch.movedim, torch.broadcast_to, torch.unflatten, torch.as_strided, operator.getitem, getattr,
                   *DROPOUT_FUNCTIONS}
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
        return is_shape_or_identity(modules[node.target])
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



def _computed_weight_base(module: nn.Module) -> type | None:
    """The torch layer whose forward `module` keeps while computing its `weight` itself (a
    property of a library's subclass), or None."""
    base = next((base for base in SUBCLASSED_LAYERS if isinstance(module, base)), None)
    if base is None or type(module) is base or "weight" in module._parameters or "weight" in module._buffers:
        return None
    return base if inherits_forward(type(module), base) else None


def needs_freezing(model: nn.Module) -> bool:
    """Whether some layer of `model` computes its weight at each call (see `freeze_parametrizations`)."""
    return any(parametrize.is_parametrized(m) or _computed_weight_base(m) is not None for m in model.modules())


def freeze_parametrizations(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) whose computed weights are plain parameters holding the
    values they take at inference, computed once in the model's own dtype: tensors of
    `torch.nn.utils.parametrize` (orthogonal, spectral or Bjorck-normalised weights, users' own),
    and the `weight` property of a Linear/Conv subclass that keeps its base's forward (such a layer
    becomes its base class). The copy is what every bound is computed for. A weight that changes
    at each access (a power iteration that updates its vectors in eval mode, as orthogonium's do)
    makes the model a slightly different function at each call: `models.loading` runs the frozen
    copy for a Lipschitz robust model, so that the function certified is the one that runs."""
    frozen = copy.deepcopy(model).eval()
    for module in frozen.modules():
        values = {}
        if parametrize.is_parametrized(module):
            for tensor_name in module.parametrizations:
                with torch.no_grad():
                    values[tensor_name] = getattr(module, tensor_name).detach().clone()
            # parametrize swapped the instance's class for a generated subclass holding the tensors
            # as properties; the copy gets its original class back (the generated class, shared
            # with the model, is left alone)
            del module._modules["parametrizations"]
            module.__class__ = type(module).__bases__[0]
            for tensor_name, value in values.items():
                module.register_parameter(tensor_name, nn.Parameter(value, requires_grad=False))
            values = {}
        base = _computed_weight_base(module)
        if base is not None:
            with torch.no_grad():
                values["weight"] = module.weight.detach().clone()
            module.__class__ = base
        for tensor_name, value in values.items():
            module.register_parameter(tensor_name, nn.Parameter(value, requires_grad=False))
    return frozen
