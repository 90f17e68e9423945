"""The Lipschitz bound describes what actually runs: in-place operations, wrappers, hooks.

Each network here is one where a bound computed from the layers alone would not describe the
function that runs; the bound must then account for it, or the model must be refused.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from slope_search import largest_slope
from torch import nn
from torch.nn.modules import module as module_globals

from mixclf_ros.core.layers import Residual
from mixclf_ros.core.lipschitz import UnsupportedLayerError, logit_lipschitz_bound

NORMS = ["l2", "linf"]


def identity_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(c_out, c_in).view(c_out, c_in, 1, 1))
    return conv


# ----------------------------------------------------------------------------- in-place operations


@pytest.mark.parametrize("norm", NORMS)
def test_inplace_activation_at_the_start_of_a_residual_block_is_bounded_as_it_runs(norm):
    """ELU(alpha=2, inplace=True) rewrites the block input, so the skip connection carries
    ELU(x) too: the map is 2 ELU(x) (slope 4 for x < 0), not x + ELU(x) (slope 3)."""
    model = nn.Sequential(identity_conv(1, 2), Residual(nn.Sequential(nn.ELU(alpha=2.0, inplace=True),
                                                                    identity_conv(2, 2))), nn.Flatten())
    model = model.double().eval()
    bound = logit_lipschitz_bound(model, norm, (1, 3, 3))
    found = largest_slope(model, norm, (1, 3, 3))
    assert found > 3.9  # the search sees the real slope, 4
    assert found <= bound


class AliasedAugmentedAdd(nn.Module):
    """`x += f(x)` while `skip` still refers to x: the final add reads the updated tensor twice."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        x = self.conv0(x)
        skip = x
        x += self.conv(skip.clone())  # (the clone keeps autograd's saved input intact)
        return self.fc((x + skip).flatten(1))


class TorchvisionBlock(nn.Module):
    """The torchvision BasicBlock pattern: in-place ReLUs and `out += identity` on fresh tensors."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 5 * 5, 3)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_var.uniform_(0.2, 2.0)
                bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.cat([x, -x], dim=1)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(out, 1))


class ChainedInplace(nn.Module):
    """Two in-place writes in a row, a skip that is the same tensor, a view sized by x.size(0)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        x = self.conv(x)
        skip = x
        x.mul_(-2.0)
        x.relu_()
        return self.fc(x.view(x.size(0), -1)) + self.fc(skip.flatten(1))


@pytest.mark.parametrize("builder", [AliasedAugmentedAdd, TorchvisionBlock, ChainedInplace])
@pytest.mark.parametrize("norm", NORMS)
def test_augmented_assignments_and_inplace_layers_are_bounded_as_they_run(builder, norm):
    torch.manual_seed(11)
    model = builder().double().eval()
    bound = logit_lipschitz_bound(model, norm, (1, 5, 5))
    assert largest_slope(model, norm, (1, 5, 5)) <= bound


def test_an_aliased_augmented_add_counts_the_skip_twice():
    """x += c(x); return x + skip (skip is x): the map is 2 (x + c(x)), so the bound doubles."""
    torch.manual_seed(12)
    model = AliasedAugmentedAdd().double().eval()
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)
    inner = model.conv0(x)
    torch.testing.assert_close(model(x), model.fc((2 * (inner + model.conv(inner))).flatten(1)))


class WriteThroughView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        x = self.conv(x)
        flat = x.flatten(1)  # a view of x
        x.mul_(3.0)  # also scales flat
        return self.fc(flat) + self.fc(x.flatten(1))


class WriteToInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        F.relu(x, inplace=True)
        return self.fc(x.flatten(1))


class WriteToBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls.add_(1.0)
        return self.fc(x.flatten(1)) * self.calls


@pytest.mark.parametrize("model, match", [
    (WriteThroughView(), "read later through a view"),
    (WriteToInput(), "writes to the model input"),
    (nn.Sequential(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16, 3)), "writes to the model input"),
    (WriteToBuffer(), "writes to calls"),
])
def test_inplace_writes_that_cannot_be_followed_are_refused(model, match):
    with pytest.raises(UnsupportedLayerError, match=match):
        logit_lipschitz_bound(model, "l2", (1, 4, 4))


# ----------------------------------------------------------------------------- wrappers and hooks


def mlp() -> nn.Sequential:
    torch.manual_seed(13)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_an_instance_level_forward_override_is_refused():
    """A wrapper that replaces `forward` on the instance (as wrappers do) changes what runs; the
    weights alone say nothing about it."""
    model = mlp()
    original = model[2].forward
    model[2].forward = lambda x: 40.0 * original(x)
    assert largest_slope(model.double(), "l2", (6,)) > 40 * 0.3  # the wrapper really scales
    with pytest.raises(UnsupportedLayerError, match="instance-level forward override"):
        logit_lipschitz_bound(model, "l2", (6,))


def test_an_instance_level_override_of_a_helper_method_is_refused():
    """Conv2d.forward calls self._conv_forward: replacing it on the instance changes what runs."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    original = model[0]._conv_forward
    model[0]._conv_forward = lambda x, weight, bias: 40.0 * original(x, weight, bias)
    with pytest.raises(UnsupportedLayerError, match="instance-level _conv_forward override"):
        logit_lipschitz_bound(model, "l2", (1, 4, 4))


def test_a_forward_override_on_the_root_module_is_refused():
    model = mlp()
    model.forward = lambda x: 40.0 * nn.Sequential.forward(model, x)
    with pytest.raises(UnsupportedLayerError, match="instance-level forward override"):
        logit_lipschitz_bound(model, "linf", (6,))


def test_a_patched_library_forward_is_refused(monkeypatch):
    original = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: 40.0 * original(self, x))
    with pytest.raises(UnsupportedLayerError, match=r"Linear\.forward was replaced"):
        logit_lipschitz_bound(mlp(), "l2", (6,))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("register", [
    lambda m: m[0].register_forward_hook(lambda module, args, output: 40.0 * output),
    lambda m: m[0].register_forward_pre_hook(lambda module, args: (40.0 * args[0],)),
    lambda m: m.register_forward_hook(lambda module, args, output: 40.0 * output),
])
def test_forward_hooks_and_pre_hooks_are_refused(register):
    model = mlp()
    handle = register(model)
    with pytest.raises(UnsupportedLayerError, match="hooks"):
        logit_lipschitz_bound(model, "l2", (6,))
    handle.remove()
    assert logit_lipschitz_bound(model, "l2", (6,)) > 0


def test_a_hook_on_a_traced_through_module_is_refused():
    model = Scaled()
    handle = model.body.register_forward_hook(lambda module, args, output: 40.0 * output)
    with pytest.raises(UnsupportedLayerError, match="hooks"):
        logit_lipschitz_bound(model, "l2", (6,))
    handle.remove()


@pytest.mark.parametrize("register", [module_globals.register_module_forward_hook,
                                      module_globals.register_module_forward_pre_hook])
def test_global_hooks_are_refused(register):
    if register is module_globals.register_module_forward_hook:
        handle = register(lambda module, args, output: output)
    else:
        handle = register(lambda module, args: None)
    try:
        with pytest.raises(UnsupportedLayerError, match="global forward hooks"):
            logit_lipschitz_bound(mlp(), "l2", (6,))
    finally:
        handle.remove()
    assert logit_lipschitz_bound(mlp(), "l2", (6,)) > 0


# ----------------------------------------------------------------------------- random DAGs with in-place ops

DAG_OPS = ["conv", "add", "cat_mix", "elu2_", "relu_", "maxmin", "tanh", "pool", "mean", "view"]


class InplaceDag(nn.Module):
    """Each step combines earlier nodes of a (N, 2, 4, 4) pool; `elu2_` and `relu_` write in place to
    a node that later steps may read again."""

    def __init__(self, program: list[tuple[str, int, int]]):
        super().__init__()
        self.program = program
        self.head = nn.Conv2d(1, 2, 1)
        self.layers = nn.ModuleDict({str(k): nn.Conv2d(2 if op == "conv" else 4, 2, 3 if op == "conv" else 1,
                                                       padding=1 if op == "conv" else 0)
                                     for k, (op, _, _) in enumerate(program) if op in ("conv", "cat_mix")})

    def forward(self, x):
        pool = [self.head(x)]
        for k, (op, i, j) in enumerate(self.program):
            a, b = pool[i % len(pool)], pool[j % len(pool)]
            if op == "conv":
                y = self.layers[str(k)](a)
            elif op == "add":
                y = a + b
            elif op == "cat_mix":
                y = self.layers[str(k)](torch.cat([a, b], 1))
            elif op == "elu2_":
                y = F.elu(a, 2.0, inplace=True)
            elif op == "relu_":
                y = a.relu_()
            elif op == "maxmin":
                p, q = a.chunk(2, dim=1)
                y = torch.cat([torch.maximum(p, q), torch.minimum(p, q)], 1)
            elif op == "tanh":
                y = torch.tanh(a)
            elif op == "pool":
                y = F.avg_pool2d(a, 3, 1, 1)
            elif op == "mean":
                y = a.mean((2, 3), keepdim=True).expand_as(a) * 3
            else:
                y = a.view(a.size(0), 2, 4, 4)
            pool.append(y)
        return pool[-1].flatten(1)


@settings(max_examples=20, deadline=None)
@example(program=[("conv", 0, 0), ("add", 1, 0), ("tanh", 2, 0)], seed=0, norm="l2")  # must be bounded
@given(program=st.lists(st.tuples(st.sampled_from(DAG_OPS), st.integers(0, 9), st.integers(0, 9)), min_size=1,
                        max_size=7), seed=st.integers(0, 2**16), norm=st.sampled_from(NORMS))
def test_random_dags_with_inplace_writes_are_bounded_or_refused(program, seed, norm):
    """Difference quotients of random nearby pairs (no autograd: in-place writes may forbid it)."""
    torch.manual_seed(seed)
    model = InplaceDag(program).double().eval()
    try:
        bound = logit_lipschitz_bound(model, norm, (1, 4, 4))
    except UnsupportedLayerError as error:
        assert "read later through a view" in str(error)
        assert any(op in ("elu2_", "relu_") for op, _, _ in program), f"refused without in-place writes: {error}"
        return
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 1, 4, 4, generator=generator, dtype=torch.float64) * 3
    delta = torch.randn(x.shape, generator=generator, dtype=torch.float64) * 1e-3
    p = math.inf if norm == "linf" else 2
    with torch.no_grad():
        quotient = (model(x + delta) - model(x)).flatten(1).norm(p=p, dim=1) / delta.flatten(1).norm(p=p, dim=1)
    assert float(quotient.max()) <= bound * (1 + 1e-9)
