"""Rules of the layers (modules and their functional forms): affine maps, batch norm, the input
normalisation, activations, pooling, sorting. Each class bounds one operation in every domain it
supports (see `bound_rules`); the operator norms come from `layer_bounds`, computed once per plan
and shared by the Lipschitz and the rounding-error domains.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core import layer_bounds as lb
from mixclf_ros.core.bound_rules import Call, Rule, register
from mixclf_ros.core.layers import GroupSort, Normalize
from mixclf_ros.core.numerics import BOUND_SLACK, FLOAT64_UNIT_ROUNDOFF, gamma
from mixclf_ros.core.partial_sums import PARTIAL_SUM_TERMS, split_affine, split_error_factors


def l2(x: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norms, shape (N,), in x's dtype. Below float64 they are accumulated in float64:
    a float32 sum of a feature map's n squares may be low by gamma_n (0.05 at n = 8e5, a resnet's
    first map), beyond what `BOUND_SLACK` covers; in float64 it is low by 1e-10 at most."""
    if x.dtype == torch.float64 or not x.is_floating_point():
        return torch.linalg.vector_norm(x.flatten(1), dim=1)
    return torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=torch.float64).to(x.dtype)


def schur_bound(abs_weight: torch.Tensor) -> float:
    """An l2 bound of the map `x -> |W| x` (dense or convolution, any stride or padding), by
    Schur's test: sqrt(largest row sum * largest column sum); a convolution's input pixel meets
    each kernel tap at most once per output channel, so its column sum is at most the sum of |W|
    over output channels and taps."""
    rows = abs_weight.flatten(1).sum(dim=1).max()
    columns = abs_weight.transpose(0, 1).flatten(1).sum(dim=1).max()
    return math.sqrt(float(rows) * float(columns)) * BOUND_SLACK


def repeats(out: torch.Tensor, length: int) -> float:
    """sqrt of how often a per-channel (per-feature) vector of this length repeats in one sample's
    output: its broadcast has that times its own l2 norm."""
    return math.sqrt(out[0].numel() / length)


def exact_map(call: Call, out: Any, error: torch.Tensor, l2_factor: float = 1.0) -> tuple[Any, tuple]:
    """(value, Bound) of an operation computed exactly whose componentwise error bound is `error`
    and whose l2 operator norm is `l2_factor` (reshapes, restrictions, sorting, max pooling)."""
    return out, (error, call.bounds[0][1] * l2_factor if l2_factor != 1.0 else call.bounds[0][1])


# ----------------------------------------------------------------------------- affine maps

_CONV_OPTIONS = ("stride", "padding", "dilation", "groups")


class Affine(Rule):
    """Linear, Conv1d, Conv2d (and subclasses that keep their forward, with the weight they
    compute), F.linear/conv1d/conv2d with input-independent weights."""

    summary = ("l2: spectral norm, bounded within 1e-9 (dense: Gram matrix; convolution: Gram matrices of its "
               "spectrum on the zero-padded canvas, Sedghi et al. 2019; each certified by a Cholesky factorisation; "
               "circular padding: on the input's torus; strides: polyphase); linf: largest absolute row sum. "
               "Rounding: |W| (E + gamma_n |x|) + gamma_n |b| componentwise; ||W||_2 d + gamma_n (|| |W| ||_2 ||x|| "
               "+ ||b||) in l2, with || |W| ||_2 from |W|'s spectrum at frequency zero. Below float64, dot products "
               f"of more than {PARTIAL_SUM_TERMS} terms are split into float32 partials of at most {PARTIAL_SUM_TERMS}"
               f" summed in float64 (`partial_sums`): gamma_{PARTIAL_SUM_TERMS} in place of gamma_n, plus one float32 "
               "rounding of the output")

    @staticmethod
    def parts(call: Call, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any, dict, Any, tuple]:
        """(x as the convolution reads it, weight, bias, options, functional op, circular padding)."""
        module = call.module
        if module is None:
            call.require_constant(0)
            op = {torch.conv1d: F.conv1d, torch.conv2d: F.conv2d}.get(call.target, call.target)
            names = ("input", "weight", "bias") + (_CONV_OPTIONS if op is not F.linear else ())
            values = {name: call.arg(i, name) for i, name in enumerate(names)}
            options = {name: values[name] for name in _CONV_OPTIONS if values.get(name) is not None}
            return x, values["weight"], values["bias"], options, op, ()
        if call.kwargs or len(call.args) != 1:
            raise call.fail("a layer must take one tensor")
        # a computed weight (a property) is read once per plan: the certified function uses it
        weight = call.cached_for(module, "weight", lambda: module.weight.detach())
        if isinstance(module, nn.Linear):
            return x, weight, module.bias, {}, F.linear, ()
        op = F.conv2d if isinstance(module, nn.Conv2d) else F.conv1d
        options = {name: getattr(module, name) for name in _CONV_OPTIONS}
        circular: tuple = ()
        if module.padding_mode == "circular":
            # what Conv2d._conv_forward pads with: (left, right) per dim, last dim first
            circular = tuple(module._reversed_padding_repeated_twice)
            reach = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
            if any(circular[2 * i] + circular[2 * i + 1] > r for i, r in enumerate(reversed(reach))):
                raise call.fail(f"circular padding {module.padding} wider than the kernel's reach (outputs repeat)")
            x, options["padding"] = F.pad(x, circular, mode="circular"), 0
        elif module.padding_mode != "zeros":
            raise call.fail(f"{type(module).__name__} padding_mode={module.padding_mode!r} is not supported")
        return x, weight, module.bias, options, op, circular

    def operator_norm(self, call: Call, norm: str) -> float:
        x, weight, _, options, op, circular = self.parts(call, call.args[0])

        def compute() -> float:
            if op is F.linear:
                if x.dim() < 2:
                    raise call.fail("linear on a tensor without a feature dimension")
                return lb.linear_bound(weight, norm)
            if x.dim() != (4 if op is F.conv2d else 3):
                raise call.fail(f"{op.__name__} on a {x.dim()}-d tensor")
            if norm == "linf":
                return lb.conv_linf_bound(weight)
            groups = options.get("groups", 1)
            padding, dilation = options.get("padding", 0), options.get("dilation", 1)
            if op is F.conv1d:  # a 1-D convolution is a 2-D one on a 1-pixel-high image
                weight_2d, size = weight.unsqueeze(2), (1, x.shape[-1])
                padding = padding if isinstance(padding, str) else (0, lb.as_tuple(padding, 1)[0])
                dilation = (1, lb.as_tuple(dilation, 1)[0])
            else:
                weight_2d, size = weight, (x.shape[-2], x.shape[-1])
            stride = lb.as_tuple(options.get("stride", 1), 2 if op is F.conv2d else 1)
            stride = stride if op is F.conv2d else (1, stride[0])
            if circular:  # the circular convolution on the input's torus, restricted (stride, fewer outputs)
                torus = tuple(call.args[0].shape[-2:]) if op is F.conv2d else (1, call.args[0].shape[-1])
                return lb.circular_conv_l2_bound(weight_2d, torus, groups, lb.as_tuple(dilation, 2), stride)
            return lb.conv2d_weight_l2_bound(weight_2d, size, padding, dilation, groups, stride)

        setting = f"{op.__name__}:{norm}:{tuple(x.shape[1:])}:{sorted(options.items())}:{circular}"
        return call.stored_norm(weight, setting, compute)

    def lipschitz(self, call: Call) -> float:
        if call.module is not None and type(call.module) not in (nn.Linear, nn.Conv1d, nn.Conv2d):
            x, weight, bias, options, op, _ = self.parts(call, call.args[0])
            if not torch.allclose(op(x, weight, bias, **options), call.out, rtol=1e-5, atol=1e-6):
                raise call.fail(f"{type(call.module).__name__} does not compute its base layer's map with its weight")
        return self.operator_norm(call, call.norm) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        x, weight, bias, options, op, circular = self.parts(call, call.args[0])
        u = call.unit_roundoff
        error, size = call.bounds[0]
        if circular:  # exact copies of entries and of their errors
            error = F.pad(error, circular, mode="circular")
        dims = weight.dim() - 2
        groups, stride, dilation = (options.get("groups", 1), lb.as_tuple(options.get("stride", 1), dims),
                                    lb.as_tuple(options.get("dilation", 1), dims))
        magnitude = call.stored_norm(weight, f"magnitude:{groups}:{stride}:{dilation}",
                                     lambda: lb.magnitude_l2_bound(weight, groups, stride, dilation))
        abs_weight, abs_bias, bias_norm = call.cached_for(weight, f"abs-{x.device}", lambda: (
            weight.abs(), None if bias is None else bias.abs(), 0.0 if bias is None else float(bias.norm())))
        # below float64, short float32 partial dot products summed in float64 (`partial_sums`)
        split = None if u <= FLOAT64_UNIT_ROUNDOFF else call.cached_for(
            weight, f"split-{x.device}", lambda: split_affine(weight, bias, options, op is F.linear))
        relative, final = split_error_factors(split, weight[0].numel(), u)
        out = op(x, weight, bias, **options) if split is None else split(x)
        # |W| E + relative (|W| |x| + |b|), as one product: |W| (E + relative |x|) + relative |b|
        componentwise = call.componentwise_bound(lambda: op(
            error + relative * x.abs(), abs_weight, None if abs_bias is None else relative * abs_bias, **options)
            + final * out.abs())
        local = relative * (magnitude * l2(x) + bias_norm * repeats(out, weight.shape[0]))
        if final:
            local = local + final * l2(out)
        return out, (componentwise * BOUND_SLACK, (self.operator_norm(call, "l2") * size + local) * BOUND_SLACK)


register(Affine(), nn.Linear, nn.Conv1d, nn.Conv2d, F.linear, F.conv1d, F.conv2d, torch.conv1d, torch.conv2d)


class ConvTranspose(Rule):
    """F.conv_transpose2d with an input-independent weight (no output padding): the adjoint of the
    convolution with the same weight, stride, padding, dilation and groups, on the output's size."""

    summary = ("l2: the norm of that convolution (an operator and its adjoint have one norm); linf: its largest "
               "absolute column sum. Rounding: as a convolution, with |W|")

    @staticmethod
    def parts(call: Call) -> tuple[torch.Tensor, Any, dict]:
        call.require_constant(0)
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        values = {name: call.arg(i, name) for i, name in enumerate(names)}
        if any(lb.as_tuple(values["output_padding"] or 0, 2)) or isinstance(values["padding"], str):
            raise call.fail("conv_transpose2d with output_padding or string padding is not bounded")
        options = {name: values[name] for name in ("stride", "padding", "groups", "dilation")
                   if values[name] is not None}
        if call.args[0].dim() != 4:
            raise call.fail("conv_transpose2d on a tensor that is not batched 4-d")
        return values["weight"], values["bias"], options

    def operator_norm(self, call: Call, norm: str, out_hw: tuple[int, int]) -> float:
        weight, _, options = self.parts(call)
        groups = options.get("groups", 1)

        def compute() -> float:
            if norm == "linf":
                # an output pixel meets only the taps of one phase of the stride (at most once each)
                per_group = weight.detach().double().abs().reshape(groups, weight.shape[0] // groups, -1,
                                                                   *weight.shape[2:]).sum(dim=1)
                stride = lb.as_tuple(options.get("stride", 1), 2)
                dilation = lb.as_tuple(options.get("dilation", 1), 2)
                phases = [(torch.arange(size) * d) % s for size, d, s in zip(weight.shape[2:], dilation, stride)]
                best = max(float(per_group[:, :, phases[0] == r1][:, :, :, phases[1] == r2].sum(dim=(2, 3)).max())
                           for r1 in range(stride[0]) for r2 in range(stride[1]))
                return best * (1.0 + lb.NUMERIC_SLACK)
            return lb.conv2d_weight_l2_bound(weight, out_hw, options.get("padding", 0), options.get("dilation", 1),
                                             groups, options.get("stride", 1))

        return call.stored_norm(weight, f"conv_transpose2d:{norm}:{out_hw}:{sorted(options.items())}", compute)

    def lipschitz(self, call: Call) -> float:
        return self.operator_norm(call, call.norm, tuple(call.out.shape[-2:])) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        weight, bias, options = self.parts(call)
        x, u = call.args[0], call.unit_roundoff
        error, size = call.bounds[0]
        abs_weight, abs_bias, schur, bias_norm = call.cached_for(weight, f"abs-{x.device}", lambda: (
            weight.abs(), None if bias is None else bias.abs(), schur_bound(weight.abs()),
            0.0 if bias is None else float(bias.norm())))
        groups = options.get("groups", 1)
        relative = gamma(weight.shape[0] // groups * weight[0, 0].numel() + 1, u)
        out = F.conv_transpose2d(x, weight, bias, **options)
        componentwise = call.componentwise_bound(lambda: F.conv_transpose2d(
            error + relative * x.abs(), abs_weight, None if abs_bias is None else relative * abs_bias, **options))
        local = relative * (schur * l2(x) + bias_norm * repeats(out, weight.shape[1] * groups))
        norm = self.operator_norm(call, "l2", tuple(out.shape[-2:]))
        return out, (componentwise * BOUND_SLACK, (norm * size + local) * BOUND_SLACK)


register(ConvTranspose(), F.conv_transpose2d, torch.conv_transpose2d)


# ----------------------------------------------------------------------------- scalings per channel


class BatchNorm(Rule):
    """BatchNorm1d/2d and F.batch_norm in eval mode (running statistics): `y = s x + t`."""

    summary = ("max_c |gamma_c| / sqrt(var_c + eps) in every lp norm. Rounding: s and t computed once with their "
               "errors ds, dt; (|s| + ds) E + ds |x| + dt + gamma_2 (|s x| + |t|)")

    @staticmethod
    def statistics(call: Call) -> tuple[torch.Tensor, torch.Tensor, Any, Any, float]:
        module = call.module
        if module is not None:
            if module.training or not module.track_running_stats or module.running_var is None:
                raise call.fail("BatchNorm without running statistics uses batch statistics")
            return module.running_mean, module.running_var, module.weight, module.bias, module.eps
        call.require_constant(0)
        if call.arg(5, "training", False) or call.arg(2, "running_var") is None:
            raise call.fail("batch norm with batch statistics")
        return (call.arg(1, "running_mean"), call.arg(2, "running_var"), call.arg(3, "weight"), call.arg(4, "bias"),
                call.arg(7, "eps", 1e-5))

    def lipschitz(self, call: Call) -> float:
        _, variance, weight, _, eps = self.statistics(call)
        return call.cached_for(variance, "norm", lambda: lb.batch_norm_bound(variance, weight, eps)) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        mean, variance, weight, bias, eps = self.statistics(call)
        x = call.args[0]
        u = call.unit_roundoff

        def constants() -> tuple:
            scale_weight = torch.ones_like(mean) if weight is None else weight
            shift_bias = torch.zeros_like(mean) if bias is None else bias
            # eps rounded to dtype, the add, the square root and the division: 4 roundings
            scale = scale_weight / torch.sqrt(variance + eps)
            scale_error = gamma(4, u) * scale.abs() * BOUND_SLACK
            shift = shift_bias - mean * scale
            shift_error = (mean.abs() * scale_error + gamma(2, u) * (shift_bias.abs() + (mean * scale).abs())) \
                * BOUND_SLACK
            numbers = (float(scale_error.max()), float(shift_error.norm()), float(scale.abs().max()),
                       float(shift.norm()), shift.numel())
            return scale, shift, scale_error, shift_error, numbers

        scale, shift, scale_error, shift_error, numbers = call.cached_for(variance, f"scale-{x.device}", constants)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale, shift, scale_error, shift_error = (c.view(shape) for c in (scale, shift, scale_error, shift_error))
        error, size = call.bounds[0]
        scaled = x * scale
        out = scaled + shift
        # exact: (x - E) s_exact + t_exact, with |s - s_exact| <= scale_error, |t - t_exact| <= shift_error
        componentwise = call.componentwise_bound(lambda: (
            (scale.abs() + scale_error) * error + scale_error * x.abs() + shift_error
            + gamma(2, u) * (scaled.abs() + shift.abs())))
        max_scale_error, shift_error_norm, max_scale, shift_norm, length = numbers
        norm, spread = l2(x), repeats(out, length)
        local = (max_scale_error * norm + shift_error_norm * spread
                 + gamma(2, u) * (max_scale * norm + shift_norm * spread))
        return out, (componentwise * BOUND_SLACK, ((max_scale + max_scale_error) * size + local) * BOUND_SLACK)


register(BatchNorm(), nn.BatchNorm1d, nn.BatchNorm2d, F.batch_norm)


class NormalizeRule(Rule):
    """`layers.Normalize`: `(x - mean) / std` per channel."""

    summary = "max_c 1/|std_c| in every lp norm. Rounding: gamma_2 (|x| + |mean|) / |std| added"

    def lipschitz(self, call: Call) -> float:
        return call.module.lipschitz_constant() * (1.0 + lb.NUMERIC_SLACK) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        module, x, u = call.module, call.args[0], call.unit_roundoff
        mean = module.mean.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
        std = module.std.to(x.dtype).view([1, -1] + [1] * (x.dim() - 2))
        out = (x - mean) / std
        error, size = call.bounds[0]
        componentwise = call.componentwise_bound(
            lambda: error / std.abs() + gamma(2, u) * (x.abs() + mean.abs()) / std.abs())
        mean_norm, min_std = float(module.mean.double().norm()), float(module.std.double().abs().min())
        local = gamma(2, u) * (l2(x) + mean_norm * repeats(out, module.mean.numel())) / min_std
        return out, (componentwise * BOUND_SLACK, (size / min_std + local) * BOUND_SLACK)


register(NormalizeRule(), Normalize)


# ----------------------------------------------------------------------------- activations


class Clamp(Rule):
    """Clamps and other exact 1-Lipschitz elementwise maps (ReLU, ReLU6, Hardtanh, clamp, abs, neg)."""

    summary = "1 in every lp norm (elementwise, slope at most 1). Rounding: exact, the error passes through"

    def lipschitz(self, call: Call) -> float:
        call.require_constant(0)
        return call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        call.require_constant(0)
        return exact_map(call, call.run(), call.bounds[0][0])


register(Clamp(), nn.ReLU, nn.ReLU6, nn.Hardtanh, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_", F.relu6,
         F.hardtanh, F.hardtanh_, getattr(torch._C._nn, "hardtanh_", None), torch.clamp, torch.clip, torch.clamp_min,
         torch.clamp_max, torch.clamp_, "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "clamp_min_",
         "clamp_max_", torch.abs, "abs", "abs_", torch.neg, "neg", "neg_", operator.neg, operator.pos)


class LeakyReLU(Rule):
    summary = "max(1, |slope|). Rounding: max(1, |slope|) E + u |y|"

    @staticmethod
    def slope(call: Call) -> float:
        if call.module is not None:
            return float(call.module.negative_slope)
        return float(call.arg(1, "negative_slope", 0.01))

    def lipschitz(self, call: Call) -> float:
        call.require_constant(0)
        return max(1.0, abs(self.slope(call))) * call.bound(0)

    def rounding(self, call: Call) -> tuple[torch.Tensor, tuple]:
        slope, u = self.slope(call), call.unit_roundoff
        out = F.leaky_relu(call.args[0], slope)
        factor = max(1.0, abs(slope))
        error, size = call.bounds[0]
        componentwise = call.componentwise_bound(lambda: (factor * error + u * out.abs()) * BOUND_SLACK)
        return out, (componentwise, (factor * size + u * l2(out)) * BOUND_SLACK)


register(LeakyReLU(), nn.LeakyReLU, F.leaky_relu, F.leaky_relu_)


class SmoothActivation(Rule):
    """Elementwise activations bounded by sup |phi'| (no rounding rule: their library kernels'
    errors are not specified)."""

    summary = "sup |phi'| in every lp norm (elementwise)"

    def __init__(self, constant: Any) -> None:
        self.constant = constant

    def lipschitz(self, call: Call) -> float:
        call.require_constant(0)
        return self.constant(call) * call.bound(0)


for _kind, _constant in lb.ACTIVATION_CONSTANTS.items():
    if _kind not in (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, GroupSort):
        register(SmoothActivation(lambda call, c=_constant: c(call.module)), _kind)
for _targets, _constant in (
        ((torch.tanh, F.tanh, "tanh", "tanh_", F.softsign, F.softplus, F.logsigmoid, F.tanhshrink, F.softshrink),
         lambda c: 1.0),
        ((torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"), lambda c: 0.25),
        ((F.celu, F.celu_), lambda c: lb.celu_constant(c.arg(1, "alpha", 1.0))),
        ((F.elu, F.elu_), lambda c: lb.elu_constant(c.arg(1, "alpha", 1.0))),
        ((F.selu, torch.selu, torch.selu_), lambda c: lb.SELU_CONSTANT),
        ((F.gelu,), lambda c: lb.gelu_constant(c.arg(1, "approximate", "none"))),
        ((F.silu,), lambda c: lb.silu_constant()),
        ((F.mish,), lambda c: lb.mish_constant()),
        ((F.hardswish,), lambda c: 1.5),
        ((F.hardsigmoid,), lambda c: 1.0 / 6.0),
        ((F.prelu, torch.prelu), lambda c: max(1.0, float(c.arg(1, "weight").detach().double().abs().max())))):
    register(SmoothActivation(_constant), *_targets)
