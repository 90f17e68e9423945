"""Rules of pooling, sorting and shape layers: max, average and l2-norm pooling (modules and
functional forms), GroupSort/MaxMin/FullSort layers (this package's and deel-torchlip's), and the
layers that only reshape or pass their input (see `bound_rules` for the domains).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core import layer_bounds as lb
from mixclf_ros.core.bound_rules import SHAPE_OR_IDENTITY, Call, Rule, register
from mixclf_ros.core.layers import GroupSort, MaxMin
from mixclf_ros.core.numerics import BOUND_SLACK, gamma
from mixclf_ros.core.rules_layers import exact_map, l2

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
    F.lp_pool2d: (nn.LPPool2d, ("norm_type", "kernel_size", "stride", "ceil_mode")),
}


def pool_layer(call: Call) -> nn.Module:
    """The pooling layer of the call: the module, or one built from the functional call's options."""
    if call.module is not None:
        if call.kwargs or len(call.args) != 1:
            raise call.fail("a layer must take one tensor")
        return call.module
    call.require_constant(0)

    def build() -> nn.Module:
        module_type, names = _POOL_ARGS[call.target]
        settings = {name: call.arg(i + 1, name) for i, name in enumerate(names) if call.arg(i + 1, name) is not None}
        if settings.get("stride") == []:
            settings.pop("stride")
        return module_type(**settings)

    return call.cached_for(call.target, "layer", build)


class MaxPool(Rule):
    summary = ("l2: sqrt(most windows holding one input), linf: 1. Rounding: exact; |max a - max b| <= max |a - b|: "
               "the window maximum of E")

    def lipschitz(self, call: Call) -> float:
        layer = pool_layer(call)
        if getattr(layer, "return_indices", False):
            raise call.fail("max pooling with return_indices")
        return call.cached_for(layer, f"norm-{call.norm}", lambda: lb.pool_bound(
            layer, call.args[0], call.out, call.norm)) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        layer = pool_layer(call)
        if getattr(layer, "return_indices", False):
            raise call.fail("max pooling with return_indices")
        out = layer(call.args[0])
        norm = call.cached_for(layer, "norm-l2", lambda: lb.pool_bound(layer, call.args[0], out, "l2"))
        return exact_map(call, out, layer(call.bounds[0][0]), norm)


register(MaxPool(), *lb.MAX_POOLS, *(f for f, (kind, _) in _POOL_ARGS.items() if kind in lb.MAX_POOLS))


def _pool_taps(module: nn.Module, x: torch.Tensor) -> int:
    """Most inputs one output of an average pool sums."""
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        dims = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
        out_size = lb.as_tuple(module.output_size, dims) if module.output_size is not None else x.shape[-dims:]
        return math.prod(math.ceil(s / (o or s)) + 1 for s, o in zip(x.shape[-dims:], out_size))
    dims = 1 if isinstance(module, nn.AvgPool1d) else 2
    return math.prod(lb.as_tuple(module.kernel_size, dims))


class AvgPool(Rule):
    summary = ("l2: sqrt(||A||_1 ||A||_inf) (Riesz-Thorin), linf: ||A||_inf, computed from the layer itself. "
               "Rounding: a non-negative linear map of E plus gamma_{taps+2} times the pool of |x|")

    def lipschitz(self, call: Call) -> float:
        layer = pool_layer(call)
        return self.norm(call, layer, call.norm) * call.bound(0)

    @staticmethod
    def norm(call: Call, layer: nn.Module, norm: str) -> float:
        def compute() -> float:
            with torch.inference_mode(False):  # the norms are measured with autograd
                return lb.pool_bound(layer, call.args[0][:1], layer(call.args[0][:1]), norm)
        return call.cached_for(layer, f"norm-{norm}", compute)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        layer, x, u = pool_layer(call), call.args[0], call.unit_roundoff
        error, size = call.bounds[0]
        relative = gamma(_pool_taps(layer, x) + 2, u)
        norm = self.norm(call, layer, "l2")
        out = layer(x)
        return out, (call.componentwise_bound(lambda: (layer(error) + relative * layer(x.abs())) * BOUND_SLACK),
                     (norm * size + relative * norm * l2(x)) * BOUND_SLACK)


register(AvgPool(), *lb.AVG_POOLS, *(f for f, (kind, _) in _POOL_ARGS.items() if kind in lb.AVG_POOLS))


class L2NormPool(Rule):
    """LPPool2d with norm_type 2 (and deel-torchlip's ScaledL2NormPool2d, which scales it): each
    output is the l2 norm of its window, `sqrt(sum_W x_i^2)`."""

    summary = ("p = 2 only, windows inside the input: a window's l2 norm is 1-Lipschitz in l2 of its entries "
               "(reverse triangle inequality): l2 sqrt(most windows holding one input), linf sqrt(window size); "
               "times the layer's scale. Rounding: sqrt(sum_W E^2) + gamma_{k+3} |y|")

    @staticmethod
    def settings(call: Call) -> tuple[nn.Module, float]:
        layer = pool_layer(call)
        scale = float(getattr(layer, "_coefficient_lip", 1.0))
        if float(layer.norm_type) != 2.0:
            raise call.fail(f"LPPool2d with norm_type {layer.norm_type} (only 2 is bounded)")
        if layer.ceil_mode:
            raise call.fail("LPPool2d with ceil_mode (partial windows are rescaled, not 1-Lipschitz)")
        return layer, scale

    @staticmethod
    def window_sum(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, layer.kernel_size, layer.stride, 0, False, True, 1)

    def lipschitz(self, call: Call) -> float:
        layer, scale = self.settings(call)
        x = call.args[0]
        reference = self.window_sum(layer, x * x).sqrt() * scale
        if reference.shape != call.out.shape or not torch.allclose(reference, call.out, rtol=1e-4, atol=1e-6):
            raise call.fail(f"{type(layer).__name__} does not compute scale * sqrt(window sum of squares)")
        kernel = lb.as_tuple(layer.kernel_size, 2)
        if call.norm == "linf":
            return abs(scale) * math.sqrt(math.prod(kernel)) * (1 + lb.NUMERIC_SLACK) * call.bound(0)
        window = nn.MaxPool2d(layer.kernel_size, layer.stride)
        overlap = lb.max_pool_overlap(window, x, call.out, 2)
        return abs(scale) * math.sqrt(overlap) * (1 + lb.NUMERIC_SLACK) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        layer, scale = self.settings(call)
        x, u = call.args[0], call.unit_roundoff
        error, size = call.bounds[0]
        taps = math.prod(lb.as_tuple(layer.kernel_size, 2))
        norms = self.window_sum(layer, x * x).sqrt()
        out = norms * scale if scale != 1.0 else norms
        # exact inputs within E: the window norm moves by at most ||E_W||_2; the squares, the
        # window sum (non-negative terms), the square root and the scaling round at most k + 3 times
        relative = gamma(taps + 3, u)
        componentwise = call.componentwise_bound(
            lambda: abs(scale) * self.window_sum(layer, error * error).sqrt() + relative * out.abs())
        overlap = lb.max_pool_overlap(nn.MaxPool2d(layer.kernel_size, layer.stride), x, out, 2)
        return out, (componentwise * BOUND_SLACK,
                     (abs(scale) * math.sqrt(overlap) * size + relative * l2(out)) * BOUND_SLACK)


register(L2NormPool(), nn.LPPool2d, F.lp_pool2d, "deel.torchlip.modules.pooling.ScaledL2NormPool2d")


class Sorting(Rule):
    """Sorting groups of channels: this package's `GroupSort`, deel-torchlip's GroupSort,
    GroupSort2 and FullSort (checked against a reference sort of the groups at every plan)."""

    summary = ("a permutation on each piece, continuous: 1 in every lp norm, times the layer's scale. "
               "Rounding: exact; each output moves by at most its group's largest error")

    @staticmethod
    def groups(call: Call) -> tuple[int, float]:
        layer, x = call.module, call.args[0]
        size = layer.group_size
        channels = x.shape[1]
        size = channels if size is None or size > channels else int(size)
        if size < 1 or channels % size:
            raise call.fail(f"{channels} channels in groups of {size}")
        return size, float(getattr(layer, "_coefficient_lip", 1.0))

    @staticmethod
    def grouped(x: torch.Tensor, size: int) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])

    def sorted_groups(self, call: Call) -> torch.Tensor:
        size, scale = self.groups(call)
        x = call.args[0]
        out = self.grouped(x, size).sort(dim=2).values.reshape(x.shape)
        return out * scale if scale != 1.0 else out

    def lipschitz(self, call: Call) -> float:
        if call.kwargs or len(call.args) != 1:
            raise call.fail("a layer must take one tensor")
        if not torch.equal(self.sorted_groups(call), call.out):
            raise call.fail(f"{type(call.module).__name__} does not sort groups of channels as its rule assumes")
        return abs(self.groups(call)[1]) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        size, scale = self.groups(call)
        out = self.sorted_groups(call)
        error, norm = call.bounds[0]

        def group_spread() -> torch.Tensor:
            grouped = self.grouped(error, size)
            return grouped.amax(dim=2, keepdim=True).expand_as(grouped).reshape(error.shape)

        spread = call.componentwise_bound(group_spread)
        if scale == 1.0:
            return out, (spread, norm)
        u = call.unit_roundoff
        return out, (call.componentwise_bound(lambda: (abs(scale) * spread + u * out.abs()) * BOUND_SLACK),
                     (abs(scale) * norm + u * l2(out)) * BOUND_SLACK)


register(Sorting(), GroupSort, *(f"deel.torchlip.modules.activation.{name}"
                                 for name in ("GroupSort", "GroupSort2", "FullSort")))


class HalvesMaxMin(Rule):
    """MaxMin, this package's (channels, dim 1) and orthogonium's (dim `axis`): the channels split
    into halves a, b, then `cat(max(a, b), min(a, b))` (checked against that reference at every
    plan). One step of the plan, where tracing through this package's MaxMin would give four (a
    split, a max, a min, a cat, bounded jointly by `graph_patterns`) to walk at every frame."""

    summary = ("each pair (a_j, b_j) sorted: 1 in every lp norm. Rounding: exact; both outputs of a pair move by "
               "at most the pair's largest error")

    @staticmethod
    def halves(call: Call, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        axis = int(getattr(call.module, "axis", 1))
        if axis % x.dim() == 0 or x.shape[axis] % 2:
            raise call.fail(f"MaxMin along dim {axis} of a tensor of shape {tuple(x.shape)}")
        a, b = x.split(x.shape[axis] // 2, axis)
        return a, b, axis

    def reference(self, call: Call) -> torch.Tensor:
        a, b, axis = self.halves(call, call.args[0])
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], axis)

    def lipschitz(self, call: Call) -> float:
        if call.kwargs or len(call.args) != 1 or not torch.equal(self.reference(call), call.out):
            raise call.fail("MaxMin does not compute cat(max(a, b), min(a, b)) of its halves as its rule assumes")
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        error, size = call.bounds[0]

        def pair_spread() -> torch.Tensor:
            a, b, axis = self.halves(call, error)
            pair = torch.maximum(a, b)
            return torch.cat([pair, pair], axis)

        return self.reference(call), (call.componentwise_bound(pair_spread), size)


register(HalvesMaxMin(), MaxMin, "orthogonium.layers.custom_activations.MaxMin")


class ShapeLayer(Rule):
    summary = "Identity, Flatten, Unflatten, dropout in eval mode: 1 in every lp norm; exact"

    def lipschitz(self, call: Call) -> float:
        module = call.module
        if module.training and not isinstance(module, (nn.Identity, nn.Flatten, nn.Unflatten)):
            raise call.fail("dropout in training mode")
        if isinstance(call.out, torch.Tensor) and (call.out.dim() == 0 or call.out.shape[0] != call.batch):
            raise call.fail("moves the batch dimension")
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[Any, tuple]:
        module = call.module
        return exact_map(call, module(call.args[0]), module(call.bounds[0][0]))


register(ShapeLayer(), *SHAPE_OR_IDENTITY)
