"""Theorem 1 bounds for networks with their own forward: traced graphs bounded node by node."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from linear_maps import Lambda, dense_matrix
from slope_search import largest_slope
from torch import nn

from mixclf_ros.core.layers import GroupSort, Normalize
from mixclf_ros.core.lipschitz import UnsupportedLayerError, logit_lipschitz_bound
from mixclf_ros.models import loading
from mixclf_ros.models.architectures import fmnist_lipschitz_cnn

NORMS = ["l2", "linf"]
ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "elu2": lambda: nn.ELU(alpha=2.0, inplace=True),
    "leaky": lambda: nn.LeakyReLU(0.2),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "groupsort": lambda: GroupSort(2),
}


def randomise_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 2 + 0.1)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + identity)


class TinyResNet(nn.Module):
    """A ResNet-style network with its own forward: stem, `depth` residual blocks (the second one
    strided), two pooled branches concatenated, view, linear head."""

    def __init__(self, depth: int, width: int, activation: str, cat_branches: bool, classes: int = 5):
        super().__init__()
        self.normalize = Normalize([0.4], [0.3])
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(Block(width if i == 0 else 2 * width if i > 1 else width,
                                          2 * width if i >= 1 else width, 2 if i == 1 else 1, activation)
                                    for i in range(depth))
        self.cat_branches = cat_branches
        features = (2 * width if depth > 1 else width) * (2 if cat_branches else 1)
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        x = F.relu(self.stem(self.normalize(x)))
        for block in self.blocks:
            x = block(x)
        pooled = F.adaptive_avg_pool2d(x, 1)
        if self.cat_branches:
            pooled = torch.cat([pooled, F.max_pool2d(x, x.shape[-1])], dim=1)
        return self.fc(pooled.view(pooled.size(0), -1))


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 3), width=st.sampled_from([2, 4]), activation=st.sampled_from(sorted(ACTIVATIONS)),
       cat_branches=st.booleans(), seed=st.integers(0, 2**16), norm=st.sampled_from(NORMS))
def test_resnet_style_bound_is_never_below_the_largest_slope_found(depth, width, activation, cat_branches, seed,
                                                                    norm):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyResNet(depth, width, activation, cat_branches)
    randomise_batch_norm(model, generator)
    model = model.double().eval()
    bound = logit_lipschitz_bound(model, norm, (1, 8, 8))
    assert 0 < largest_slope(model, norm, (1, 8, 8), samples=32, seed=seed) <= bound


class Branches(nn.Module):
    """Avg-pool and strided-conv branches, cat, residual add of a deeper path, flatten by view."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 3, padding=1)
        self.deep = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 1))
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        y = torch.cat([F.elu(self.a(x)), torch.sigmoid(self.b(x)) * 2.0], dim=1)
        y = y + self.deep(y) - 0.5 * self.deep(y)
        y = self.pool(y)[:, :, :3, :3]
        return self.fc(y.reshape(-1, 4 * 3 * 3)) / 3.0


@pytest.mark.parametrize("norm", NORMS)
def test_branches_and_slices_are_attacked_without_exceeding_the_bound(norm):
    torch.manual_seed(21)
    model = Branches().double().eval()
    assert largest_slope(model, norm, (1, 7, 7)) <= logit_lipschitz_bound(model, norm, (1, 7, 7))


# ----------------------------------------------------------------------------- random linear DAGs

DAG_OPS = ["conv", "add", "sub_scaled", "cat_mix", "pool", "mean", "permute", "pad", "iadd", "bn"]


class RandomDag(nn.Module):
    """A random DAG of linear operations on (N, 2, 4, 4) tensors: each step combines earlier nodes."""

    def __init__(self, program: list[tuple[str, int, int]]):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict()
        for k, (op, _, _) in enumerate(program):
            if op in ("conv", "iadd"):
                self.layers[str(k)] = nn.Conv2d(2, 2, 3, padding=1)
            elif op == "cat_mix":
                self.layers[str(k)] = nn.Conv2d(4, 2, 1)
            elif op == "bn":
                self.layers[str(k)] = nn.BatchNorm2d(2)

    def forward(self, x):
        pool = [x]
        for k, (op, i, j) in enumerate(self.program):
            a, b = pool[i % len(pool)], pool[j % len(pool)]
            if op in ("conv", "bn"):
                y = self.layers[str(k)](a)
            elif op == "add":
                y = a + b
            elif op == "sub_scaled":
                y = a - 0.5 * b
            elif op == "cat_mix":
                y = self.layers[str(k)](torch.cat([a, b], dim=1))
            elif op == "pool":
                y = F.avg_pool2d(a, 3, 1, 1)
            elif op == "mean":
                y = a.mean(dim=(2, 3), keepdim=True).expand_as(a)
            elif op == "permute":
                y = a.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
            elif op == "pad":
                y = F.pad(a, (1, 1, 1, 1))[:, :, 1:-1, 1:-1]
            else:  # iadd: in place on a fresh tensor
                y = self.layers[str(k)](a)
                y += b
            pool.append(y)
        return pool[-1].flatten(1)


@settings(max_examples=25, deadline=None)
@given(program=st.lists(st.tuples(st.sampled_from(DAG_OPS), st.integers(0, 9), st.integers(0, 9)), min_size=1,
                        max_size=8), seed=st.integers(0, 2**16))
def test_random_linear_dags_are_bounded_above_their_exact_norm(program, seed):
    """A linear network's Lipschitz constant is the norm of its (constant) Jacobian: l2 spectral
    norm, linf max row sum. The bound may exceed it, never fall below."""
    torch.manual_seed(seed)
    model = RandomDag(program)
    randomise_batch_norm(model, torch.Generator().manual_seed(seed))
    model = model.double().eval()
    matrix = dense_matrix(model, (1, 2, 4, 4))
    assert logit_lipschitz_bound(model, "l2", (2, 4, 4)) >= float(torch.linalg.matrix_norm(matrix, 2)) * (1 - 1e-9)
    assert logit_lipschitz_bound(model, "linf", (2, 4, 4)) >= float(matrix.abs().sum(1).max()) * (1 - 1e-9)


# ----------------------------------------------------------------------------- exact values






LINEAR_GRAPHS = [
    ("add", lambda x: x + x),
    ("cat", lambda x: torch.cat([x, 2 * x], dim=1)),
    ("mean", lambda x: x.mean(dim=(2, 3))),
    ("sum", lambda x: torch.sum(x, -1)),
    ("div", lambda x: x / 4.0),
    ("pad+slice", lambda x: F.pad(x, (1, 1))[:, :, 1:, ::2]),
    ("permute", lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)),
    ("expand", lambda x: x.mean(1, keepdim=True).expand(-1, 3, -1, -1)),
    ("broadcast", lambda x: x[:, :1] + torch.zeros(1, 2, 1, 1, dtype=torch.float64)),
    ("stack", lambda x: torch.stack([x, -x], dim=2).flatten(1)),
    ("chunk", lambda x: x.chunk(2, dim=1)[1] * 3),
    ("unbind", lambda x: torch.cat([torch.unbind(x, 1)[0], x.unbind(dim=-1)[2] * 2], dim=1)),
]


@pytest.mark.parametrize("name, function", LINEAR_GRAPHS, ids=[name for name, _ in LINEAR_GRAPHS])
def test_linear_graphs_get_their_exact_operator_norm(name, function):
    """For these linear maps the rules are exact: bound = spectral norm (l2), max row sum (linf)."""
    model = Lambda(function)
    shape = (2, 3, 3)
    matrix = dense_matrix(function, (1, *shape))
    assert logit_lipschitz_bound(model, "l2", shape) == pytest.approx(float(torch.linalg.matrix_norm(matrix, 2)),
                                                                       rel=1e-9)
    assert logit_lipschitz_bound(model, "linf", shape) == pytest.approx(float(matrix.abs().sum(1).max()), rel=1e-9)


class FunctionalLipschitzCNN(nn.Module):
    """The zoo's Lipschitz CNN written with its own forward and functional calls."""

    def __init__(self):
        super().__init__()
        chain = fmnist_lipschitz_cnn()
        self.normalize, self.conv1, self.conv2, self.fc1, self.fc2 = chain[0], chain[1], chain[4], chain[8], chain[10]

    def forward(self, x):
        x = F.avg_pool2d(torch.relu(F.conv2d(self.normalize(x), self.conv1.weight, self.conv1.bias, padding=1)), 2)
        x = F.avg_pool2d(F.relu(self.conv2(x)), kernel_size=2)
        x = torch.flatten(x, 1)
        return self.fc2(F.linear(x, self.fc1.weight, self.fc1.bias).relu())


@pytest.mark.parametrize("norm", NORMS)
def test_a_custom_forward_gets_the_same_bound_as_the_equivalent_chain(norm):
    zoo = loading.load_model(loading.zoo_config("robust_lipschitz"))
    functional = FunctionalLipschitzCNN()
    with torch.no_grad():
        chain = zoo.network
        for mine, theirs in ((functional.conv1, chain[1]), (functional.conv2, chain[4]), (functional.fc1, chain[8]),
                             (functional.fc2, chain[10])):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(functional(x), chain(x))
    expected = logit_lipschitz_bound(chain, norm, (1, 28, 28))
    assert logit_lipschitz_bound(functional, norm, (1, 28, 28)) == pytest.approx(expected, rel=1e-12)


class ClaimsOneLipschitz(nn.Module):
    """A layer that says it is 1-Lipschitz (as Lipschitz layer libraries do), with a weight that is
    only approximately orthogonal: the bound uses the weight it computes with."""

    lipschitz_constant = 1.0

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(4, 4))[0] * 1.3)

    def forward(self, x):
        return F.linear(x, self.weight)


def test_the_bound_comes_from_the_weights_not_from_a_claimed_constant():
    torch.manual_seed(22)
    model = nn.Sequential(ClaimsOneLipschitz(), nn.ReLU(),
                          torch.nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)))
    expected = 1.3 * float(torch.linalg.matrix_norm(model[2].weight.detach().double(), 2))
    assert logit_lipschitz_bound(model, "l2", (4,)) == pytest.approx(expected, rel=1e-6)


def test_the_model_is_left_as_it_was():
    model = Lambda(lambda x: x * torch.tensor([2.0, 3.0]).view(1, 2, 1, 1))
    before = dict(vars(model))
    logit_lipschitz_bound(model, "l2", (2, 3, 3))
    assert dict(vars(model)).keys() == before.keys()
    assert logit_lipschitz_bound(model, "l2", (2, 3, 3)) == pytest.approx(3.0)


# ----------------------------------------------------------------------------- refused by name


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


REFUSED = [
    (Lambda(torch.exp), "torch.exp"),
    (nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)), "Softmax"),
    (nn.Sequential(nn.LayerNorm([2, 3, 3])), "LayerNorm"),
    (nn.Sequential(nn.Upsample(scale_factor=2)), "Upsample"),
    (Lambda(lambda x: x * x), "product of two input-dependent"),
    (Lambda(lambda x: x / (x.abs() + 1)), "division by an input-dependent"),
    (Lambda(lambda x: x - x.mean(0, keepdim=True)), "batch dimension"),
    (Lambda(lambda x: torch.cat([x, x], dim=0)), "batch dimension"),
    (Lambda(lambda x: x.view(-1)), "batch dimension"),
    (Lambda(lambda x: x.transpose(0, 1)), "batch dimension"),
    (Lambda(lambda x: x.sum()), "all dimensions"),
    (Lambda(lambda x: x + x.sort(dim=1).indices), "indices"),
    (Lambda(lambda x: x + torch.randn_like(x)), "random"),
    (Lambda(lambda x: x[:, torch.tensor([0, 0])]), "advanced"),
    (Lambda(lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")), "constant padding"),
    (TwoInputs(), "second input"),
    (DataDependent(), "cannot trace"),
    (nn.Sequential(torch.jit.script(nn.Flatten())), "ScriptModule"),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("model, match", REFUSED, ids=[match for _, match in REFUSED])
@pytest.mark.parametrize("norm", NORMS)
def test_operations_without_a_sound_rule_are_refused_by_name(model, match, norm):
    with pytest.raises(UnsupportedLayerError, match=match):
        logit_lipschitz_bound(model, norm, (2, 3, 3))


def test_constant_subgraphs_may_use_any_operation():
    scale = Lambda(lambda x: x * torch.exp(torch.zeros(1)) * math.e)
    assert logit_lipschitz_bound(scale, "linf", (2, 3, 3)) == pytest.approx(math.e)


# ----------------------------------------------------------------------------- MaxMin written out


class SplitMaxMin(nn.Module):
    def forward(self, z):
        a, b = z.split(z.shape[1] // 2, 1)
        return torch.cat([torch.max(a, b), torch.min(a, b)], dim=1)


class ReshapeMaxMin(nn.Module):
    def forward(self, x):
        y = torch.reshape(x, (x.shape[0], x.shape[1] // 2, 2, x.shape[2]))
        maxes, _ = torch.max(y, 2)
        mins = torch.min(y, dim=2, keepdim=False)[0]
        return torch.cat((maxes, mins), dim=1)


class ChunkMaxMin(nn.Module):
    """Two MaxMins of the same input: one from chunks, one from a reduction over the last dim."""

    def forward(self, x):
        a, b = torch.chunk(x, 2, dim=-1)
        return torch.cat((torch.minimum(b, a), x.amax(dim=-1, keepdim=True), torch.maximum(a, b),
                          x.amin(-1, keepdim=True)), dim=-1)


class ScaledPair(nn.Module):
    """max and min of x and 2x: a sorted pair of (x, 2x), whose joint bound is sqrt(1 + 4)."""

    def forward(self, x):
        y = 2 * x
        return torch.cat([torch.maximum(x, y), torch.minimum(x, y)], dim=1)


class ChunkedMaxMin(nn.Module):
    def forward(self, v):
        a, b = v.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


@pytest.mark.parametrize("activation, shape, expected_l2, expected_linf", [
    (SplitMaxMin(), (4, 3), 1.0, 1.0), (ReshapeMaxMin(), (4, 3), 1.0, 1.0), (ChunkedMaxMin(), (4, 3), 1.0, 1.0),
    (ChunkMaxMin(), (4, 2), math.sqrt(2.0), 1.0), (ScaledPair(), (4, 3), math.sqrt(1 + 4.0), 2.0),
])
def test_maxmin_written_with_tensor_functions_is_bounded_jointly(activation, shape, expected_l2, expected_linf):
    """MaxMin is 1-Lipschitz; counted operand by operand it would be 2 (l2)."""
    assert logit_lipschitz_bound(activation, "l2", shape) == pytest.approx(expected_l2, rel=1e-12)
    assert logit_lipschitz_bound(activation, "linf", shape) == pytest.approx(expected_linf, rel=1e-12)
    assert largest_slope(activation.double(), "l2", shape) <= expected_l2 * (1 + 1e-9)


def test_a_deep_maxmin_network_keeps_its_product_bound():
    torch.manual_seed(23)
    layers = []
    for _ in range(6):
        layers += [torch.nn.utils.parametrizations.orthogonal(nn.Linear(8, 8)), ChunkedMaxMin()]
    model = nn.Sequential(*layers, nn.Linear(8, 3)).eval()
    expected = math.prod(float(torch.linalg.matrix_norm(m.weight.detach().double(), 2))
                         for m in model.modules() if isinstance(m, nn.Linear))
    assert logit_lipschitz_bound(model, "l2", (8,)) == pytest.approx(expected, rel=1e-6)
