"""The bound engine's rule table: one `Rule` per operation, with one method per bound domain.

A traced model is a graph of calls (layers, tensor functions, tensor methods). `engine.BoundPlan`
evaluates it once per domain, asking each call's rule for:

- `lipschitz(call)`: a bound of the call's output's Lipschitz constant with respect to the model
  input, operator norm p -> p (p = `call.norm`, "l2" or "linf", [0,1]-pixel input units), from the
  bounds of its input-dependent operands (`call.bounds`, None for a constant operand);
- `rounding(call)`: the call's value evaluated in floating point together with a rigorous bound of
  its rounding error, `Bound = (E, d)`: componentwise `|computed - exact| <= E` and per sample
  `d >= ||computed - exact||_2` (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3;
  u = unit roundoff, gamma_k = k u / (1 - k u)).

A rule that lacks a domain refuses it by name. Rules are found by the call's target: a layer class
(or its qualified name, for layers of optional libraries), a function, or a tensor method's name.
`RULES` is the one table (filled by the `rules_*` modules, which `engine` imports);
`engine.supported_operations_markdown` renders it for docs/SUPPORTED_OPERATIONS.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core.numerics import UnboundedForwardError

Bound = tuple[torch.Tensor, torch.Tensor]
"""(componentwise error bound, shaped like the value; per-sample l2 bound, shape (N,))."""

class _NotComputed:
    """The componentwise error bound of the cheap rounding domain, which is not computed: every
    operation on it (a torch function, an operator, a method, an index) gives it back at once, so
    the rules run unchanged and only the per-sample l2 bounds are computed."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return NOT_COMPUTED

    def __getattr__(self, name: str) -> Any:
        return NOT_COMPUTED

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return NOT_COMPUTED

    def __getitem__(self, index: Any) -> Any:
        return NOT_COMPUTED

    def __bool__(self) -> bool:
        raise TypeError("the cheap rounding domain's componentwise bound is not computed: no branch may depend on it")

    def __iter__(self) -> Any:
        # without it, iteration would call __getitem__ forever; a rule that splits E checks for it
        raise TypeError("the cheap rounding domain's componentwise bound is not computed: nothing to iterate")

    def _absorb(self, *args: Any) -> Any:
        return NOT_COMPUTED

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _absorb
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __matmul__ = __rmatmul__ = __rpow__ = _absorb
    __neg__ = __pos__ = __abs__ = __pow__ = _absorb

    def __repr__(self) -> str:
        return "NOT_COMPUTED"


NOT_COMPUTED = _NotComputed()
"""Stands for a componentwise bound that the cheap rounding domain does not compute."""

NOT_LIPSCHITZ = math.inf
"""Bound of an input-dependent value that is not a Lipschitz function of the input (sort indices)."""

ADVICE = ("see docs/SUPPORTED_OPERATIONS.md for what the engine bounds; replace the operation by a supported one, "
          "or declare the model's constant (lipschitz_constant > 0, checked by a gradient search, not proven)")


class UnsupportedLayerError(UnboundedForwardError):
    """The engine met a layer or operation that it cannot soundly bound in the domain asked for.
    The message names the operation, its place in the model and what to do. (A subclass of
    `numerics.UnboundedForwardError`, which the rounding-error constants raise.)"""


@dataclass
class Call:
    """One traced call, as a rule sees it: its place (`where`, for errors), its operands as values
    (`args`, `kwargs`) and as domain quantities (`bounds`, `kwarg_bounds`; None: input-independent),
    its output `out` (the Lipschitz domain; the rounding domain computes it), and `cache`, kept
    across frames for this call (|W|, operator norms: computed once per plan)."""

    where: str
    args: tuple
    kwargs: dict
    bounds: tuple
    kwarg_bounds: dict
    out: Any
    batch: int
    run: Callable[[], Any]
    target: Any = None
    module: nn.Module | None = None
    norm: str = ""
    unit_roundoff: float = 0.0
    cache: dict = field(default_factory=dict)
    componentwise: bool = True
    """The rounding domain computes componentwise bounds (else only the per-sample l2 ones)."""
    norm_store: MutableMapping[str, float] | None = None
    """Operator norms kept across plans and processes (by the caller, e.g. on disk), keyed by the
    weights' contents, so a changed weight is never served a stale norm."""

    def arg(self, index: int, key: str, default: Any = None) -> Any:
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(key, default)

    def bound(self, index: int, key: str = "") -> Any:
        if index < len(self.bounds):
            return self.bounds[index]
        return self.kwarg_bounds.get(key)

    def fail(self, why: str) -> UnsupportedLayerError:
        return UnsupportedLayerError(f"{self.where}: {why}")

    def require_constant(self, *skip: int) -> None:
        """Every operand except positions `skip` must be input-independent."""
        dependent = [i for i, b in enumerate(self.bounds) if i not in skip and is_dependent(b)]
        dependent += [k for k, b in self.kwarg_bounds.items() if is_dependent(b)]
        if dependent:
            raise self.fail(f"operand(s) {dependent} depend on the input; only constants are supported there")

    def componentwise_bound(self, compute: Callable[[], Any]) -> Any:
        """`compute()`, the componentwise error bound, where the domain computes it; else
        `NOT_COMPUTED`, at no cost."""
        return compute() if self.componentwise else NOT_COMPUTED

    def stored_norm(self, weight: torch.Tensor, setting: str, compute: Callable[[], float]) -> float:
        """An operator norm of the map with `weight` under `setting` (norm, input size, options),
        from this call's cache, else `norm_store` (keyed by a sha256 of the weight's contents,
        dtype and shape), else computed and stored in both. A float32 weight is keyed by its float64
        copy (exact, the same operator): the float32 and float64 plans of a model share its norms."""

        def lookup() -> float:
            if self.norm_store is None:
                return compute()
            contents = weight.detach().to("cpu")
            if contents.is_floating_point() and contents.dtype != torch.float64:
                contents = contents.to(torch.float64)
            contents = contents.contiguous()
            digest = hashlib.sha256(contents.numpy().tobytes()).hexdigest()
            key = f"{digest}:{contents.dtype}:{tuple(contents.shape)}:{setting}"
            if key not in self.norm_store:
                self.norm_store[key] = compute()
            return float(self.norm_store[key])

        return self.cached_for(weight, setting, lookup)

    def cached_for(self, tensor: Any, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()` for this call's constant operand `tensor`, computed once while the call
        receives that same tensor (a plan's weights and folded constants do not change)."""
        held = self.cache.get(key)
        if held is None or held[0] is not tensor:
            held = self.cache[key] = (tensor, compute())
        return held[1]


def is_dependent(bound: Any) -> bool:
    """Whether a bound (or a structure of bounds, as operands are mapped) marks an input-dependent value."""
    if isinstance(bound, dict):
        return any(is_dependent(b) for b in bound.values())
    if isinstance(bound, (list, tuple)):
        return any(is_dependent(b) for b in bound)
    if isinstance(bound, slice):
        return any(is_dependent(b) for b in (bound.start, bound.stop, bound.step))
    return bound is not None


class Rule:
    """One operation's bounds, a method per domain (see the module docstring). `summary` states
    the rule for the docs; `evaluate` is how the rounding domain computes the value (by default,
    the call itself)."""

    summary = ""

    def lipschitz(self, call: Call) -> Any:
        raise call.fail(f"no Lipschitz rule for {call_name(call)}; {ADVICE}")

    def rounding(self, call: Call) -> tuple[Any, Bound]:
        raise call.fail(f"no rounding-error rule for {call_name(call)} (docs/SUPPORTED_OPERATIONS.md): the "
                        "certificate's rounding error is then estimated, not bounded")

    @classmethod
    def domains(cls) -> tuple[str, ...]:
        return tuple(name for name in ("lipschitz", "rounding") if getattr(cls, name) is not getattr(Rule, name))


def call_name(call: Call) -> str:
    """The operation of a call as the docs' table names it: the layer's class, or the function."""
    return qualified_name(type(call.module)) if call.module is not None else op_name(call.target)


RULES: dict[Any, Rule] = {}
"""The one table: layer class, layer qualified name, function or method name -> its rule."""


def register(rule: Rule, *keys: Any) -> None:
    for key in keys:
        if key is not None:
            RULES[key] = rule


def qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


SUBCLASSED_LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Layers whose subclasses take the base's rule when they keep the base's forward: libraries of
1-Lipschitz layers subclass them to compute the weight (a property or a parametrization). Their
rule checks at every plan that the output is the base's map with the layer's `weight`."""


def inherits_forward(kind: type, base: type) -> bool:
    return all(getattr(kind, name, None) is getattr(base, name, None) for name in ("forward", "_conv_forward"))


def layer_rule(module: nn.Module) -> Rule | None:
    """The rule of a layer, by its exact class (a subclass may compute something else), or the
    rule of a `SUBCLASSED_LAYERS` base whose forward the subclass keeps."""
    kind = type(module)
    rule = RULES.get(kind) or RULES.get(qualified_name(kind))
    if rule is None:
        base = next((base for base in SUBCLASSED_LAYERS if isinstance(module, base)), None)
        if base is not None and inherits_forward(kind, base):
            rule = RULES.get(base)
    return rule


def has_layer_rule(module: nn.Module) -> bool:
    return layer_rule(module) is not None


def operation_rule(target: Any) -> Rule | None:
    try:
        return RULES.get(target)
    except TypeError:  # an unhashable target
        return None


SHAPE_OR_IDENTITY = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                     nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
"""Layers whose output may share storage with their input (views, the identity, eval dropout)."""


DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
"""Functional dropouts: the identity in eval mode, so their result may share storage with their input."""


def is_shape_or_identity(module: nn.Module) -> bool:
    return isinstance(module, SHAPE_OR_IDENTITY)


def op_name(target: Any) -> str:
    """`Tensor.exp`, `torch.exp`, `torch.nn.functional.gelu`, `operator.mul`, a layer's class..."""
    if isinstance(target, str):
        return f"Tensor.{target}"
    if isinstance(target, type):
        return qualified_name(target)
    name = getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", None) or "torch"
    if module.startswith("torch._C") or getattr(target, "__qualname__", "").startswith("_VariableFunctions"):
        module = "torch"
    return f"{module.lstrip('_')}.{name}"
