"""The robust network's forward pass with a rigorous bound of its rounding error (Theorem 1 holds
for the exact function h; the node evaluates a floating-point approximation of it).

Running error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", ch. 3), layer by
layer, with u the unit roundoff and `gamma_k = k u / (1 - k u)`. Componentwise:
- an affine layer `y = W x + b` with n-term dot products: `|fl(W x + b) - (W x + b)| <= gamma_{n+1}
  (|W| |x| + |b|)` (any summation order, FMA or not); an error E already in x reaches y as at most
  `|W| E`; both as one product, `|W| (E + gamma |x|) + gamma |b|`;
- batch norm in eval mode, `y = s x + t` with s and t computed once: `(|s| + ds) E + ds |x| + dt +
  gamma_2 (|s x| + |t|)`, where ds, dt bound the errors of s and t;
- clamps, max-pools, reshapes: exact, the error passes through; sums, means and average pools add
  `gamma` times their magnitude.
Componentwise bounds compound over deep networks (|W| E grows by each layer's absolute row sums), so
each value also carries a per-sample bound d of the error's l2 norm: `d_out = ||layer||_2 d_in +
||local||_2`, with the layer's operator norm from `layer_bounds` and its own rounding error bounded
through `||x||_2` (for an affine layer by Schur's bound of |W|). The logits get the smaller of the two.
`numerics.probabilities_with_error` turns the logit bound into a probability bound, which
`certify.lipschitz_radius(..., probability_error=...)` subtracts from the margin.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mixclf_ros.core.forward_error_ops import (
    Bound,
    attribute,
    functional_affine,
    functional_layer,
    graph_rule,
    l2,
    op_name,
)
from mixclf_ros.core.layer_bounds import leaf_bound
from mixclf_ros.core.layers import GroupSort, Normalize, Residual
from mixclf_ros.core.lipschitz import UnsupportedLayerError, check_runs_as_traced, resolve_inplace, trace_forward
from mixclf_ros.core.numerics import BOUND_SLACK, UnboundedForwardError, gamma

__all__ = ["ErrorBoundedForward", "UnboundedForwardError"]


def _check_plain(module: nn.Module, name: str) -> None:
    if "forward" in vars(module):
        raise UnboundedForwardError(f"{name}: forward replaced on the instance")
    if (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
            or nn.modules.module._global_forward_pre_hooks):
        raise UnboundedForwardError(f"{name}: forward hooks are not supported")


class ErrorBoundedForward:
    """The logits of `network` in `dtype`, with a componentwise bound of their rounding error
    (the smaller of the componentwise and the l2 analysis, see the module docstring).

    Args:
        network: the robust model ([0,1] pixels -> logits). A copy is kept in
            `dtype` (float64 for certificates: weights cast once, exactly), in eval mode.
        dtype: torch.float64 (certificates) or torch.float32 (tests of the bound itself).
        input_shape: (C, H, W) without the batch dimension; needed only for a network with its own
            forward (the traced graph is checked against the forward on a dummy batch).

    Supported layers: `layers.Normalize`, Linear, Conv1d/2d (zero padding), BatchNorm1d/2d (eval,
    running statistics), ReLU, ReLU6, Hardtanh, LeakyReLU, MaxPool1d/2d, AvgPool1d/2d,
    AdaptiveAvgPool2d, Flatten, Unflatten, Identity, Dropout (eval), `layers.GroupSort`; matched by
    exact type, without hooks or instance-level forward overrides. They may be chained by
    `nn.Sequential` and `layers.Residual`, or by any forward torch.fx can trace (torchvision's
    ResNets, users' modules) whose other operations are residual adds and subtractions, products
    and quotients by a number, relu, flatten/view/reshape and means over non-batch dimensions;
    in-place operations are rewritten as `lipschitz.resolve_inplace` does. The layers are
    evaluated by this class with the functional ops (the bound is for what it computes). Anything
    else raises `UnboundedForwardError` at construction, naming it.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.float64,
                 input_shape: Sequence[int] | None = None):
        self.dtype = dtype
        self.unit_roundoff = torch.finfo(dtype).eps / 2.0
        self.network = copy.deepcopy(network).to(dtype).eval()
        self.network.requires_grad_(False)
        self._traced: tuple[fx.Graph, dict[str, Any], dict[str, nn.Module]] | None = None
        try:
            self._check(self.network, "model")
        except UnboundedForwardError:
            if input_shape is None:
                raise
            self._trace(input_shape)
        self._constants = self._layer_constants()
        self._l2_constants = self._layer_l2_constants()
        self._operator_norms: dict[tuple, float] = {}
        self._own_modules = {id(module) for module in self.network.modules()}
        if self._traced is not None:
            self._check_traced(input_shape)

    def to(self, device: torch.device | str) -> ErrorBoundedForward:
        self.network.to(device)
        self._constants = self._layer_constants()
        return self

    def _layer_constants(self) -> dict[int, tuple[torch.Tensor | None, ...]]:
        """By module id, computed once, not per frame: (|W|, |b|) of every affine layer; (scale,
        shift, scale error, shift error) of every batch norm, `y = scale x + shift`."""
        constants: dict[int, tuple[torch.Tensor | None, ...]] = {}
        u = self.unit_roundoff
        for module in self.network.modules():
            kind = type(module)
            if kind in (nn.Linear, nn.Conv1d, nn.Conv2d):
                constants[id(module)] = (module.weight.abs(), None if module.bias is None else module.bias.abs())
            elif kind in (nn.BatchNorm1d, nn.BatchNorm2d):
                mean, variance = module.running_mean, module.running_var
                weight = torch.ones_like(mean) if module.weight is None else module.weight
                bias = torch.zeros_like(mean) if module.bias is None else module.bias
                # eps rounded to dtype, the add, the square root and the division: 4 roundings
                scale = weight / torch.sqrt(variance + module.eps)
                scale_error = gamma(4, u) * scale.abs() * BOUND_SLACK
                shift = bias - mean * scale
                shift_error = mean.abs() * scale_error + gamma(2, u) * (bias.abs() + (mean * scale).abs())
                shift_error = shift_error * BOUND_SLACK
                constants[id(module)] = (scale, shift, scale_error, shift_error)
        return constants

    def _layer_l2_constants(self) -> dict[int, tuple[float, ...]]:
        """By module id, the numbers `_local_l2` needs: for an affine layer (dot-product length,
        Schur's bound of |W|, ||b||, bias length); for a batch norm (max ds, ||dt||, max |s|, ||t||,
        channels); for Normalize (||mean||, min |std|, channels)."""
        numbers: dict[int, tuple[float, ...]] = {}
        for module in self.network.modules():
            kind = type(module)
            if kind in (nn.Linear, nn.Conv1d, nn.Conv2d):
                bias_norm = 0.0 if module.bias is None else float(module.bias.norm())
                numbers[id(module)] = (module.weight[0].numel(), _schur(module.weight.abs()), bias_norm,
                                       module.weight.shape[0])
            elif kind in (nn.BatchNorm1d, nn.BatchNorm2d):
                scale, shift, scale_error, shift_error = self._constants[id(module)]
                numbers[id(module)] = (float(scale_error.max()), float(shift_error.norm()), float(scale.abs().max()),
                                       float(shift.norm()), shift.numel())
            elif kind is Normalize:
                numbers[id(module)] = (float(module.mean.double().norm()), float(module.std.double().abs().min()),
                                       module.mean.numel())
        return numbers

    def _check(self, module: nn.Module, name: str) -> None:
        _check_plain(module, name)
        kind = type(module)
        if kind in (nn.Sequential,):
            for child_name, child in module.named_children():
                self._check(child, f"{name}.{child_name}")
        elif kind is Residual:
            self._check(module.block, f"{name}.block")
        else:
            self._check_layer(module, name)

    @staticmethod
    def _check_layer(module: nn.Module, name: str) -> None:
        _check_plain(module, name)
        kind = type(module)
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            if module.running_mean is None or module.running_var is None:
                raise UnboundedForwardError(f"{name}: batch norm without running statistics uses batch statistics")
        elif kind in (nn.Conv1d, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise UnboundedForwardError(f"{name}: padding_mode {module.padding_mode!r} is not supported")
        elif kind in (nn.MaxPool1d, nn.MaxPool2d):
            if module.return_indices:
                raise UnboundedForwardError(f"{name}: return_indices is not supported")
        elif kind not in (nn.Linear, Normalize, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.AvgPool1d,
                          nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout,
                          nn.Dropout1d, nn.Dropout2d, GroupSort):
            raise UnboundedForwardError(f"{name}: no rounding-error bound for {kind.__name__}")

    # ------------------------------------------------------------------ networks with their own forward

    def _trace(self, input_shape: Sequence[int]) -> None:
        try:
            check_runs_as_traced(self.network, "model")
            graph, constants = trace_forward(self.network, "model")
            modules = dict(self.network.named_modules())
            resolve_inplace(graph, modules, "model")
        except UnsupportedLayerError as error:
            raise UnboundedForwardError(str(error)) from None
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnboundedForwardError("model: the forward must take exactly one input")
        for node in graph.nodes:
            if node.op == "call_module":
                self._check_layer(modules[node.target], f"model.{node.target}")
            elif node.op in ("call_function", "call_method") and graph_rule(node) is None \
                    and functional_layer(node) is None:
                raise UnboundedForwardError(f"model: {node.name}: no rounding-error rule for {op_name(node)}")
        self._traced = (graph, constants, modules)

    def _check_traced(self, input_shape: Sequence[int]) -> None:
        """The walk must compute what the forward computes (as `lipschitz.logit_lipschitz_bound` checks)."""
        dummy = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0), dtype=self.dtype)
        try:
            with torch.no_grad():
                walked, _ = self._walk_graph(dummy.clone(), (torch.zeros_like(dummy), dummy.new_zeros(2)))
                direct = self.network(dummy.clone())
        except UnboundedForwardError:
            raise
        except Exception as error:
            raise UnboundedForwardError(f"model: the traced forward fails on a dummy batch "
                                        f"({type(error).__name__}: {error})") from None
        if not isinstance(direct, torch.Tensor) or direct.shape != walked.shape or not torch.allclose(
                direct, walked, rtol=1e-4, atol=1e-5):
            raise UnboundedForwardError("model: the outputs of its traced graph differ from the forward's")

    def _walk_graph(self, x: torch.Tensor, bound: Bound) -> tuple[torch.Tensor, Bound]:
        graph, constants, modules = self._traced
        values: dict[fx.Node, Any] = {}
        errors: dict[fx.Node, Any] = {}
        batch = x.shape[0]
        for node in graph.nodes:
            if node.op == "placeholder":
                values[node], errors[node] = x, bound
                continue
            if node.op == "get_attr":
                value = constants[node.target] if node.target in constants else attribute(self.network, node.target)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    value = value.to(dtype=self.dtype, device=x.device)  # float32 to float64: exact
                values[node], errors[node] = value, None
                continue
            if node.op == "output":
                return values[node.args[0]], errors[node.args[0]]
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            arg_errors = fx.node.map_aggregate(node.args, lambda a: errors[a] if isinstance(a, fx.Node) else None)
            if any(isinstance(a, fx.Node) and errors[a] is not None for a in node.kwargs.values()):
                raise UnboundedForwardError(f"model: {node.name}: an input-dependent keyword argument")
            layer = modules[node.target] if node.op == "call_module" else functional_layer(node)
            if layer is not None:
                if layer is not nn.Module:  # a torch.nn layer, or the class of a functional pooling
                    layer = layer if node.op == "call_module" else layer(*args[1:], **kwargs)
                    self._check_layer(layer, f"model: {node.name}")
                if arg_errors[0] is None or any(e is not None for e in arg_errors[1:]) or (
                        node.op == "call_module" and (len(args) != 1 or kwargs)):
                    raise UnboundedForwardError(f"model: {node.name}: a layer must take one input-dependent tensor")
                out, out_error = (self._walk(layer, args[0], arg_errors[0]) if layer is not nn.Module
                                  else functional_affine(self.unit_roundoff, node, args, kwargs, arg_errors[0]))
            else:
                out, out_error = graph_rule(node)(self.unit_roundoff, node, args, kwargs, arg_errors)
            if out_error is not None and (not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != batch):
                raise UnboundedForwardError(f"model: {node.name} mixes the samples of a batch")
            values[node], errors[node] = out, out_error
        raise UnboundedForwardError("model: the traced graph has no output")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), error bound (N, C)) for inputs x (cast to `dtype`, exactly from
        float32): `|logits - exact logits of the network at x| <= error bound` elementwise."""
        x = x.to(self.dtype)
        # cuDNN may pick FFT or Winograd convolutions, whose errors the bound does not cover: the
        # native (im2col + GEMM) kernels run instead. A process-global switch, like full_precision.
        cudnn_enabled = torch.backends.cudnn.enabled
        try:
            if x.is_cuda:
                torch.backends.cudnn.enabled = False
            with torch.no_grad():
                start = (torch.zeros_like(x), x.new_zeros(x.shape[0]))
                if self._traced is None:
                    logits, (error, norm) = self._walk(self.network, x, start)
                else:
                    logits, (error, norm) = self._walk_graph(x, start)
        finally:
            torch.backends.cudnn.enabled = cudnn_enabled
        # both bound the same error: componentwise, and in l2 norm per sample (which bounds each entry)
        return logits, torch.minimum(error, norm.view(-1, *[1] * (error.dim() - 1)))

    def _walk(self, module: nn.Module, x: torch.Tensor, bound: Bound) -> tuple[torch.Tensor, Bound]:
        """(output, its error bound) of a chain, a residual layer or a leaf layer. A bound is a pair:
        componentwise E (|error| <= E) and, per sample, d >= the error's l2 norm. E alone compounds
        over deep networks (|W| E grows with every layer's absolute row sums); d grows only by each
        layer's l2 operator norm (`layer_bounds.leaf_bound`), plus the l2 norm of the layer's own
        rounding error bounded through `||x||_2` (Schur's bound of |W|)."""
        kind = type(module)
        u = self.unit_roundoff
        if kind is nn.Sequential:
            for child in module:
                x, bound = self._walk(child, x, bound)
            return x, bound
        if kind is Residual:
            inner, (inner_error, inner_norm) = self._walk(module.block, x, bound)
            out = x + inner
            return out, ((bound[0] + inner_error + u * out.abs()) * BOUND_SLACK,
                         (bound[1] + inner_norm + u * l2(out)) * BOUND_SLACK)
        out, error = self._leaf(module, x, bound[0])
        norm = (self._operator_norm(module, x, out) * bound[1] + self._local_l2(module, x, out)) * BOUND_SLACK
        return out, (error, norm)

    def _operator_norm(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
        """The layer's l2 operator norm (`layer_bounds.leaf_bound`: the FFT bound for Conv2d, tight;
        56 s for resnet18 at 224x224 on a shared 2-core machine, once at construction), cached:
        by module for layers with weights, by configuration for stateless ones (functional pools)."""
        if id(module) in self._own_modules:
            key = (id(module), tuple(x.shape[1:]))
        else:  # a functional pool's layer, made for one call: its whole configuration
            key = (type(module), tuple(sorted((k, repr(v)) for k, v in vars(module).items())), tuple(x.shape[1:]))
        if key not in self._operator_norms:
            try:  # average pools are measured with autograd, which the classifier's inference mode disables
                with torch.inference_mode(False):
                    self._operator_norms[key] = leaf_bound(module, x[:1], out[:1], "l2", "model")
            except UnsupportedLayerError:  # e.g. Conv1d
                affine = type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d)
                self._operator_norms[key] = _affine_operator_norm(module) if affine else math.inf
        return self._operator_norms[key]

    def _local_l2(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | float:
        """Per sample, an l2 bound of the rounding error the layer itself adds (the l2 norm of its
        componentwise rule's local term, bounded through ||x||_2)."""
        kind, u = type(module), self.unit_roundoff

        def repeats(length: int) -> float:
            """sqrt of how often a per-channel (per-feature) vector of this length repeats in one
            sample's output: its broadcast has that times its own l2 norm."""
            return math.sqrt(out[0].numel() / length)

        if kind in (nn.Linear, nn.Conv1d, nn.Conv2d):
            taps, schur, bias_norm, length = self._l2_constants[id(module)]
            return gamma(taps + 1, u) * (schur * l2(x) + bias_norm * repeats(length))
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            scale_error, shift_error, scale, shift, length = self._l2_constants[id(module)]
            size, spread = l2(x), repeats(length)
            return scale_error * size + shift_error * spread + gamma(2, u) * (scale * size + shift * spread)
        if kind is Normalize:
            mean, std, length = self._l2_constants[id(module)]
            return gamma(2, u) * (l2(x) + mean * repeats(length)) / std
        if kind is nn.LeakyReLU:
            return u * l2(out)
        if kind in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            return gamma(_pool_taps(module, x) + 2, u) * self._operator_norm(module, x, out) * l2(x)
        return 0.0  # clamps, max pools, sorting, reshapes: exact

    def _leaf(self, module: nn.Module, x: torch.Tensor, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, componentwise error bound) of one layer."""
        kind = type(module)
        u = self.unit_roundoff
        if kind is Normalize:
            mean = module.mean.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
            std = module.std.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
            out = (x - mean) / std
            local = gamma(2, u) * (x.abs() + mean.abs()) / std.abs()
            return out, (error / std.abs() + local) * BOUND_SLACK
        if kind is nn.Linear:
            relative = gamma(module.in_features + 1, u)
            abs_weight, abs_bias = self._constants[id(module)]
            out = F.linear(x, module.weight, module.bias)
            # |W| E + gamma (|W| |x| + |b|), as one product: |W| (E + gamma |x|) + gamma |b|
            bound = F.linear(error + relative * x.abs(), abs_weight, None if abs_bias is None else relative * abs_bias)
            return out, bound * BOUND_SLACK
        if kind in (nn.Conv1d, nn.Conv2d):
            conv = F.conv1d if kind is nn.Conv1d else F.conv2d
            options = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                           groups=module.groups)
            weight = module.weight
            relative = gamma(weight.shape[1] * math.prod(weight.shape[2:]) + 1, u)
            abs_weight, abs_bias = self._constants[id(module)]
            out = conv(x, weight, module.bias, **options)
            bound = conv(error + relative * x.abs(), abs_weight, None if abs_bias is None else relative * abs_bias,
                         **options)
            return out, bound * BOUND_SLACK
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
            shape = [1, -1] + [1] * (x.dim() - 2)
            scale, shift, scale_error, shift_error = (c.view(shape) for c in self._constants[id(module)])
            scaled = x * scale
            out = scaled + shift
            # exact: (x - E) s_exact + t_exact, with |s - s_exact| <= scale_error, |t - t_exact| <= shift_error
            bound = ((scale.abs() + scale_error) * error + scale_error * x.abs() + shift_error
                     + gamma(2, u) * (scaled.abs() + shift.abs()))
            return out, bound * BOUND_SLACK
        if kind in (nn.ReLU, nn.ReLU6, nn.Hardtanh):
            return module(x), error  # clamps: exact and 1-Lipschitz
        if kind is nn.LeakyReLU:
            out = F.leaky_relu(x, module.negative_slope)
            return out, (max(1.0, abs(module.negative_slope)) * error + u * out.abs()) * BOUND_SLACK
        if kind in (nn.MaxPool1d, nn.MaxPool2d):
            # |max a - max b| <= max |a - b|: the window maximum of the error bounds.
            return module(x), module(error)
        if kind in (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d):
            # A non-negative linear map: errors pass through it; sum then divide (or multiply by
            # a rounded reciprocal) adds gamma_{taps+2} times the mean of |x|.
            taps = _pool_taps(module, x)
            return module(x), (module(error) + gamma(taps + 2, u) * module(x.abs())) * BOUND_SLACK
        if kind is GroupSort:
            # Sorting is 1-Lipschitz in max norm: each output moves by at most the group's largest error.
            size = module.group_size
            grouped = error.reshape(error.shape[0], error.shape[1] // size, size, *error.shape[2:])
            return module(x), grouped.amax(dim=2, keepdim=True).expand_as(grouped).reshape(error.shape)
        # Flatten, Unflatten, Identity, Dropout in eval mode: exact reshapes / identities.
        return module(x), module(error)


def _pool_taps(module: nn.Module, x: torch.Tensor) -> int:
    """Most inputs one output of an average pool sums."""
    if type(module) is nn.AdaptiveAvgPool2d:
        out_size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        return math.prod(math.ceil(s / (o or s)) + 1 for s, o in zip(x.shape[-2:], out_size))
    kernel = module.kernel_size
    dims = 1 if type(module) is nn.AvgPool1d else 2
    return math.prod(kernel) if isinstance(kernel, tuple) else kernel ** dims


def _affine_operator_norm(module: nn.Module) -> float:
    """An upper bound of the l2 operator norm of a Linear or Conv layer's weight map where
    `layer_bounds` has none (Conv1d), 2 to 4 times above the tight one: the smaller of Schur's
    bound and, for a convolution, the sum over kernel taps of each tap's largest singular value (a
    convolution is the sum over taps of a shifted 1x1 convolution; shifts, strides and zero padding
    do not increase norms), for a dense layer the Frobenius norm."""
    weight = module.weight.detach()
    schur = _schur(weight.abs())
    if weight.dim() == 2:
        return min(schur, float(torch.linalg.vector_norm(weight)) * BOUND_SLACK)
    groups = module.groups
    per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)  # (g, out, in, taps)
    tap_norms = torch.linalg.matrix_norm(per_group.permute(0, 3, 1, 2), ord=2)  # (g, taps)
    return min(schur, float(tap_norms.amax(dim=0).sum()) * BOUND_SLACK)


def _schur(abs_weight: torch.Tensor) -> float:
    """An l2 bound of the map `x -> |W| x` (dense or convolution, any stride or padding), by
    Schur's test: sqrt(largest row sum * largest column sum); a convolution's input pixel meets
    each kernel tap at most once per output channel, so its column sum is at most the sum of |W|
    over output channels and taps."""
    rows = abs_weight.flatten(1).sum(dim=1).max()
    columns = abs_weight.transpose(0, 1).flatten(1).sum(dim=1).max()
    return math.sqrt(float(rows) * float(columns)) * BOUND_SLACK
