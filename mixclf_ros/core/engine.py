"""The bound engine: a model traced once into a `BoundPlan`, evaluated by one interpreter in each
bound domain of `bound_rules` (Lipschitz bounds in l2 and linf; rounding-error bounds).

Compiling a plan (`BoundPlan(model, input_shape)`):
1. `tracing.freeze_parametrizations`: a copy whose parametrized weights are the tensors they
   compute at inference, cast to the plan's dtype (float64 by default: exact from float32);
2. `tracing.check_runs_as_traced`, `tracing.trace_forward`, `tracing.resolve_inplace`;
3. each call node gets its rule from the one table (`bound_rules.RULES`, filled by the `rules_*`
   modules) and a cache of its own (|W|, operator norms: computed once, shared by the domains);
   values that do not depend on the model input are computed once (constant folding);
4. a walk on a dummy batch in the Lipschitz domain (l2) and in the rounding domain checks that
   the graph computes what the model computes, on each sample alone, and records which values are
   restrictions of others (`graph_patterns`).

Per frame, `rounding(x)` walks the compiled steps only: no tracing, no table look-ups.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from mixclf_ros.core import graph_patterns, rules_layers, rules_ops, rules_pooling, rules_structure  # noqa: F401  (fill RULES)
from mixclf_ros.core.bound_rules import (
    ADVICE,
    NOT_COMPUTED,
    NOT_LIPSCHITZ,
    RULES,
    Bound,
    Call,
    Rule,
    UnsupportedLayerError,
    is_dependent,
    layer_rule,
    op_name,
    operation_rule,
    qualified_name,
)
from mixclf_ros.core.numerics import BOUND_SLACK, UnboundedForwardError
from mixclf_ros.core.spectral_norms import reused_buffers
from mixclf_ros.core.tracing import check_runs_as_traced, freeze_parametrizations, resolve_inplace, trace_forward

DUMMY_BATCH = 2
"""Batch size of the dummy input: with 2 samples, ops that move or mix the batch are detected."""

SHAPE_QUERIES = {"size", "dim", "ndimension", "numel", "shape", "ndim", "dtype", "device", "is_contiguous"}
"""Methods/attributes whose result depends only on the input's shape: constants."""
SHAPE_ONLY = {"zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full"}
"""Tensors whose values depend only on the input's shape, dtype and device: constants."""
RANDOM_OPS = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
              "poisson", "multinomial", "randperm", "uniform_", "normal_", "bernoulli_", "exponential_",
              "geometric_", "cauchy_", "log_normal_", "random_"}
_RESTRICTIONS = {operator.getitem, "view", "reshape", torch.reshape, "flatten", torch.flatten, "narrow",
                 torch.narrow, "select", torch.select, "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze,
                 "contiguous", "chunk", torch.chunk, "split", torch.split, "unbind", torch.unbind, "unflatten",
                 torch.unflatten}
"""Operations whose result holds coordinates of their first operand, none twice."""


@dataclass
class Step:
    """One compiled graph node: its rule (None: no input-dependent operand) and its cache."""

    node: fx.Node
    where: str
    rule: Rule | None = None
    module: nn.Module | None = None
    folded: bool = False
    shape_query: bool = False
    cache: dict = field(default_factory=dict)
    rounding_structure: tuple[bool, bool] | None = None
    """(whether an operand depends on the input, whether a joint l2 pattern may apply), found on the
    first walk of the rounding domain: both follow from the graph alone, not from the values."""


class _Sizes:
    """The per-sample l2 parts of the rounding domain's bounds, as `graph_patterns` reads them."""

    def __init__(self, bounds: dict) -> None:
        self.bounds = bounds

    def get(self, node: Any, default: Any = None) -> Any:
        bound = self.bounds.get(node, default)
        return bound[1] if isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], torch.Tensor) \
            else None if bound is None else default

    def __getitem__(self, node: Any) -> Any:
        return self.get(node)


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


def _uses_non_lipschitz(bounds: Any) -> bool:
    """Whether an operand is an input-dependent value that is not Lipschitz (sort/max indices)."""
    if isinstance(bounds, dict):
        return any(_uses_non_lipschitz(b) for b in bounds.values())
    if isinstance(bounds, (list, tuple)):
        return any(_uses_non_lipschitz(b) for b in bounds)
    return isinstance(bounds, float) and bounds == NOT_LIPSCHITZ


class BoundPlan:
    """`model` ([0,1] pixels (N, *input_shape) -> logits) traced and compiled once; see the module
    docstring. `lipschitz(norm)` bounds the logits' Lipschitz constant (operator norm p -> p, exact
    arithmetic); `rounding(x)` evaluates the logits in `dtype` with a bound of their rounding error.
    Raises `UnsupportedLayerError` (naming the operation, its place and what to do) for a model
    the engine cannot trace or whose outputs its graph does not reproduce. `norm_store` keeps the
    affine layers' operator norms across plans (see `bound_rules.Call.stored_norm`)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], name: str = "model",
                 dtype: torch.dtype = torch.float64, norm_store: MutableMapping[str, float] | None = None) -> None:
        self.name, self.dtype, self.input_shape = name, dtype, tuple(input_shape)
        self.norm_store = norm_store
        self.unit_roundoff = torch.finfo(dtype).eps / 2.0
        scripted = next((path for path, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
        if scripted is not None:
            raise UnsupportedLayerError(f"{name}{'.' + scripted if scripted else ''}: a TorchScript module "
                                        "(ScriptModule): its code cannot be traced; load the eager model (a state_dict "
                                        "and its architecture), or declare the model's constant")
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            frozen = freeze_parametrizations(model)
            check_runs_as_traced(frozen, name)
            self.network = copy.deepcopy(frozen).to(dtype).requires_grad_(False)
            with torch.no_grad(), reused_buffers():
                self.graph, self.constants = trace_forward(self.network, name)
                self._modules = dict(self.network.named_modules())
                resolve_inplace(self.graph, self._modules, name)
                self.steps = self._compile()
                self._check_against(model, frozen)
        finally:
            for module, training in modes:
                module.training = training
        self._lipschitz: dict[str, float] = {}

    # ------------------------------------------------------------------ compiling

    def _compile(self) -> list[Step]:
        placeholders = [node for node in self.graph.nodes if node.op == "placeholder"]
        if len(placeholders) > 1 and not placeholders[1].args:
            raise UnsupportedLayerError(f"{self.name}: {placeholders[1].name}: forward takes a second input")
        depends = {placeholders[0]} if placeholders else set()
        steps = []
        for node in self.graph.nodes:
            where = f"{self.name}.{node.target}" if node.op == "call_module" else f"{self.name}: {node.name}"
            step = Step(node, where)
            operands = [n for n in node.all_input_nodes]
            if any(n in depends for n in operands) or node in depends:
                depends.add(node)
            elif node.op in ("call_function", "call_method", "call_module", "get_attr"):
                step.folded = True
            target = node.target
            op = target if isinstance(target, str) else getattr(target, "__name__", "")
            if node.op in ("call_function", "call_method") and op in RANDOM_OPS:
                raise UnsupportedLayerError(f"{where}: random operation {op_name(target)}")
            step.shape_query = op in SHAPE_QUERIES | SHAPE_ONLY or op == "len" or (
                target is getattr and node.args[1] in SHAPE_QUERIES)
            if node.op == "call_module":
                step.module = self._modules[target]
                step.rule = layer_rule(step.module)
            elif node.op in ("call_function", "call_method"):
                step.rule = operation_rule(target)
            steps.append(step)
        return steps

    def _check_against(self, model: nn.Module, frozen: nn.Module) -> None:
        """The graph's walks reproduce the frozen model's outputs, sample by sample, and those are
        the model's (a weight that drifts at each access, as a power iteration's, within 1e-4);
        records restrictions."""
        generator = torch.Generator().manual_seed(0)
        dummy = torch.rand((DUMMY_BATCH, *self.input_shape), generator=generator, dtype=torch.float64)
        reference = next(iter(model.parameters()), next(iter(model.buffers()), None))
        device = reference.device if reference is not None else torch.device("cpu")
        model_dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
        self.parts = graph_patterns.Parts()
        self._folded: dict[fx.Node, Any] = {}
        walked = self._walk(dummy.to(self.dtype).clone(), 1.0, norm="l2", compiling=True)
        self._lipschitz_l2 = walked[1]
        self.rounding_refusal = ""
        rounded = None
        try:
            rounded, _ = self.rounding(dummy.to(self.dtype).clone(), compiling=True)
        except UnboundedForwardError as error:
            self.rounding_refusal = str(error)
        try:
            direct = frozen(dummy.to(device=device, dtype=model_dtype))
            single = frozen(dummy[:1].to(device=device, dtype=model_dtype))
            original = model(dummy.to(device=device, dtype=model_dtype))
        except Exception as error:
            raise UnsupportedLayerError(f"{self.name}: the model fails on a dummy batch ({type(error).__name__}: "
                                        f"{error})") from error
        for result in (walked[0], rounded):
            if result is None:
                continue
            if not isinstance(direct, torch.Tensor) or direct.shape != result.shape or not torch.allclose(
                    direct.double(), result.double(), rtol=1e-4, atol=1e-5):
                raise UnsupportedLayerError(f"{self.name}: the model's outputs differ from those of its traced graph")
        if not isinstance(original, torch.Tensor) or original.shape != direct.shape or not torch.allclose(
                original, direct, rtol=1e-4, atol=1e-5):
            raise UnsupportedLayerError(f"{self.name}: the model with its computed weights read once differs from "
                                        "the model")
        if not torch.allclose(single, direct[:1], rtol=1e-4, atol=1e-5):
            raise UnsupportedLayerError(f"{self.name}: the model's output for one sample depends on the rest of "
                                        "the batch")

    def _record_parts(self, node: fx.Node, values: dict, run_on: Callable[[Any], Any]) -> None:
        """Which coordinates of which value `node` holds, for a restriction of its first operand."""
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return
        if node.target is operator.getitem and isinstance(values[source], (tuple, list)):
            held = self.parts.get(source)
            if held is not None and isinstance(held[1], tuple):
                self.parts[node] = (held[0], held[1][node.args[1]])
            return
        value = values[source]
        if not isinstance(value, torch.Tensor):
            return
        base, ids = self.parts.get(source, (source, None))
        if ids is None:
            ids = torch.arange(value.numel(), device=value.device).reshape(value.shape)
        try:
            moved = run_on(ids)
        except Exception:  # a restriction the coordinate numbers cannot follow: no joint bound
            return
        self.parts[node] = (base, tuple(moved) if isinstance(moved, (tuple, list)) else moved)

    # ------------------------------------------------------------------ the interpreter

    def _walk(self, x: torch.Tensor, start: Any, norm: str = "", compiling: bool = False) -> tuple[Any, Any]:
        """(output, its bound) in the Lipschitz domain (`norm` set; `start` = 1) or the rounding
        domain (`start` = the input's Bound)."""
        lipschitz = bool(norm)
        componentwise = lipschitz or start[0] is not NOT_COMPUTED
        values: dict[fx.Node, Any] = {}
        bounds: dict[fx.Node, Any] = {}
        batch = x.shape[0]
        for step in self.steps:
            node = step.node
            if node.op == "placeholder":
                first = not bounds
                values[node], bounds[node] = (x, start) if first else (node.args[0], None)
                continue
            if step.folded and node in self._folded:
                values[node], bounds[node] = self._folded[node], None
                continue
            if node.op == "get_attr":
                values[node], bounds[node] = _fetch(self.network, node.target, self.constants), None
                if compiling:
                    self._folded[node] = values[node]
                continue
            if node.op == "output":
                result, bound = values[node.args[0]], bounds[node.args[0]]
                if not isinstance(result, torch.Tensor):
                    raise UnsupportedLayerError(f"{self.name}: the forward returns a {type(result).__name__}, "
                                                "not a tensor")
                if lipschitz:
                    bound = 0.0 if bound is None else bound
                    if not math.isfinite(bound):
                        raise UnsupportedLayerError(f"{self.name}: the output is not a Lipschitz function of the "
                                                    "input")
                elif bound is None:
                    bound = (torch.zeros_like(result), result.new_zeros(result.shape[0]))
                return result, bound
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            run = self._runner(step, args, kwargs)
            arg_bounds = fx.node.map_aggregate(node.args, lambda a: bounds[a] if isinstance(a, fx.Node) else None)
            kwarg_bounds = fx.node.map_aggregate(node.kwargs, lambda a: bounds[a] if isinstance(a, fx.Node) else None)
            structure = None if lipschitz else step.rounding_structure
            dependent = structure[0] if structure else is_dependent(arg_bounds) or is_dependent(kwarg_bounds)
            if not dependent or step.shape_query:
                if not lipschitz:
                    step.rounding_structure = (dependent, False)
                values[node], bounds[node] = run(), None
                if compiling and step.folded:
                    self._folded[node] = values[node]
                continue
            try:
                values[node], bounds[node] = self._bound(step, args, kwargs, arg_bounds, kwarg_bounds, run, batch,
                                                         norm, compiling, componentwise)
            except UnboundedForwardError:
                raise
            except Exception as error:  # a rule or the op itself fails on what it was given: refuse, naming it
                raise UnsupportedLayerError(f"{step.where}: {type(error).__name__}: {error}") from error
            if compiling and lipschitz and self._is_restriction(node):
                self._record_parts(node, values, self._runner_on_first(step, args, kwargs))
            if lipschitz and norm == "l2":
                self._apply_joint(node, values, bounds, lipschitz)
            elif not lipschitz and (structure is None or structure[1]):
                step.rounding_structure = (True, self._apply_joint(node, values, bounds, lipschitz))
        raise UnsupportedLayerError(f"{self.name}: the traced graph has no output")

    @staticmethod
    def _is_restriction(node: fx.Node) -> bool:
        try:
            return node.target in _RESTRICTIONS
        except TypeError:
            return False

    def _runner(self, step: Step, args: tuple, kwargs: dict) -> Callable[[], Any]:
        node = step.node
        if node.op == "call_module":
            return lambda: step.module(*args, **kwargs)
        if node.op == "call_function":
            return lambda: node.target(*args, **kwargs)
        return lambda: getattr(args[0], node.target)(*args[1:], **kwargs)

    def _runner_on_first(self, step: Step, args: tuple, kwargs: dict) -> Callable[[Any], Any]:
        node = step.node
        if node.op == "call_function":
            return lambda first: node.target(first, *args[1:], **kwargs)
        return lambda first: getattr(first, node.target)(*args[1:], **kwargs)

    def _bound(self, step: Step, args: tuple, kwargs: dict, arg_bounds: Any, kwarg_bounds: Any,
               run: Callable[[], Any], batch: int, norm: str, compiling: bool, componentwise: bool) -> tuple[Any, Any]:
        node, where = step.node, step.where
        if step.rule is None:
            if node.op == "call_module":
                kind = type(step.module)
                raise UnsupportedLayerError(f"{where}: unsupported layer {qualified_name(kind)}; {ADVICE}")
            raise UnsupportedLayerError(f"{where}: unsupported operation {op_name(node.target)} on an "
                                        f"input-dependent tensor; {ADVICE}")
        selects = node.op == "call_function" and node.target in (operator.getitem, getattr)
        if not selects and _uses_non_lipschitz((arg_bounds, kwarg_bounds)):
            raise UnsupportedLayerError(f"{where}: uses a value that is not a Lipschitz function of the input "
                                        f"(indices of a sort/max)")
        call = Call(where, tuple(args), dict(kwargs), tuple(arg_bounds), dict(kwarg_bounds), None, batch, run,
                    node.target, step.module, norm, self.unit_roundoff, step.cache, componentwise, self.norm_store)
        if norm:
            call.out = run()
            bound = step.rule.lipschitz(call)
            if not isinstance(bound, tuple) and not math.isfinite(bound) and not selects:
                raise UnsupportedLayerError(f"{where}: the bound is not finite ({bound})")
            out = call.out
        else:
            out, bound = step.rule.rounding(call)
        if compiling:
            _check_batch(out, batch, where)
        return out, bound

    def _apply_joint(self, node: fx.Node, values: dict, bounds: dict, lipschitz: bool) -> bool:
        """Tightens the node's bound by a joint l2 pattern where one applies; whether one did."""
        bound = bounds[node]
        if lipschitz:
            if not isinstance(bound, float):
                return False
            for joint in (graph_patterns.joint_l2(node, bounds, values, self.parts),
                          graph_patterns.gradient_step_l2(node, bounds, values, self._modules)):
                if joint is not None:
                    bounds[node] = bound = min(bound, joint)
            return True
        if not (isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], torch.Tensor)):
            return False
        joint = graph_patterns.joint_l2(node, _Sizes(bounds), values, self.parts)
        if joint is not None:
            bounds[node] = (bound[0], torch.minimum(bound[1], joint * BOUND_SLACK))
        return joint is not None

    # ------------------------------------------------------------------ the domains

    def lipschitz(self, norm: str) -> float:
        """Bound of the logits' Lipschitz constant, `norm` -> `norm` ("l2" or "linf"), [0,1] pixels."""
        if norm not in ("l2", "linf"):
            raise ValueError(f"norm must be one of ('l2', 'linf'), got {norm!r}")
        if norm == "l2":
            return self._lipschitz_l2
        if norm not in self._lipschitz:
            generator = torch.Generator().manual_seed(0)
            dummy = torch.rand((DUMMY_BATCH, *self.input_shape), generator=generator, dtype=torch.float64)
            with torch.no_grad():
                self._lipschitz[norm] = self._walk(dummy.to(self.dtype), 1.0, norm=norm)[1]
        return self._lipschitz[norm]

    def require_rounding(self) -> None:
        """Raises `UnsupportedLayerError` (why) unless the rounding domain covers the whole plan."""
        if self.rounding_refusal:
            raise UnsupportedLayerError(self.rounding_refusal)

    def rounding(self, x: torch.Tensor, componentwise: bool = True,
                 compiling: bool = False) -> tuple[torch.Tensor, Bound]:
        """(logits in the plan's dtype, their Bound) for inputs x in that dtype. With
        `componentwise=False` only the per-sample l2 bounds are computed (the componentwise part is
        `bound_rules.NOT_COMPUTED`): no |W| |x| products, about the price of the forward alone.
        Raises `UnsupportedLayerError` when a layer has no rounding-error rule."""
        if not compiling:
            self.require_rounding()
        start = (torch.zeros_like(x) if componentwise else NOT_COMPUTED, x.new_zeros(x.shape[0]))
        return self._walk(x, start, compiling=compiling)

    def recast(self, dtype: torch.dtype) -> BoundPlan:
        """This plan's network compiled again in `dtype` (a float32 plan beside the float64 one),
        sharing `norm_store` (the operator norms are computed once). Raises `UnsupportedLayerError`
        unless its weights, buffers, constants and folded values are exactly this plan's: then both
        plans evaluate one function h, whose Lipschitz bound this plan computed."""
        network = copy.deepcopy(self.network).to(device="cpu", dtype=dtype)
        plan = BoundPlan(network, self.input_shape, self.name, dtype, self.norm_store)
        ours, theirs = self._input_independent_values(), plan._input_independent_values()
        for name, value in ours.items():
            other = theirs.get(name)
            if other is None or other.shape != value.shape or not torch.equal(
                    other.to(device=value.device, dtype=value.dtype), value):
                raise UnsupportedLayerError(f"{self.name}: {name} in {dtype} is not its {self.dtype} value: the "
                                            f"{dtype} plan would evaluate another function")
        return plan

    def _input_independent_values(self) -> dict[str, torch.Tensor]:
        """The floating-point tensors the plan computes with besides the input, by name: weights and
        buffers, traced constants, folded values (items of folded tuples and lists too)."""
        values: dict[str, torch.Tensor] = {}

        def add(name: str, value: Any) -> None:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                values[name] = value
            elif isinstance(value, (tuple, list)):
                for index, item in enumerate(value):
                    add(f"{name}[{index}]", item)

        for name, value in [*self.network.state_dict().items(), *self.constants.items(),
                            *((f"the folded value {node.name}", value) for node, value in self._folded.items())]:
            add(name, value)
        return values

    def to(self, device: torch.device | str) -> BoundPlan:
        self.network.to(device)
        self.constants = {key: value.to(device) for key, value in self.constants.items()}
        self._folded = {node: value.to(device) if isinstance(value, torch.Tensor) else value
                        for node, value in self._folded.items()}
        for step in self.steps:
            step.cache.clear()
        return self


def supported_operations_markdown() -> str:
    """The rule table (`bound_rules.RULES`) as markdown, one row per rule: its targets, domains and
    summary. docs/SUPPORTED_OPERATIONS.md carries it (a test keeps them equal)."""
    by_rule: dict[int, tuple[Rule, list[str]]] = {}
    for key, rule in RULES.items():
        by_rule.setdefault(id(rule), (rule, []))[1].append(key if isinstance(key, str) and "." in key
                                                           else op_name(key))
    rows = ["| operations | Lipschitz (l2, linf) | rounding error | rule |", "|---|---|---|---|"]
    for rule, names in sorted(by_rule.values(), key=lambda item: sorted(item[1])[0].lower()):
        domains = rule.domains()
        listed = ", ".join(f"`{name}`" for name in sorted(set(names), key=str.lower))
        rows.append(f"| {listed} | {'yes' if 'lipschitz' in domains else 'no'} | "
                    f"{'yes' if 'rounding' in domains else 'no'} | {rule.summary.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"
