"""The bound engine itself (issue 19): one plan shared by the domains, the rule table and its docs,
and the rules that make 1-Lipschitz building blocks tight, each attacked by a slope search or
checked against an exact dense norm so that a bound below the truth fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT
from linear_maps import Lambda, dense_matrix
from slope_search import largest_slope
from torch import nn

from mixclf_ros.core.engine import BoundPlan, supported_operations_markdown
from mixclf_ros.core.forward_error import ErrorBoundedForward
from mixclf_ros.core.lipschitz import UnsupportedLayerError, logit_lipschitz_bound

pytestmark = pytest.mark.usefixtures("both_rounding_domains")

DOC = REPO_ROOT / "docs" / "SUPPORTED_OPERATIONS.md"






def test_the_supported_operations_doc_is_the_rule_table():
    """One source: docs/SUPPORTED_OPERATIONS.md carries the table `supported_operations_markdown`
    renders from `bound_rules.RULES` (regenerate it with the command in the doc)."""
    text = DOC.read_text(encoding="utf-8")
    assert supported_operations_markdown() in text


class GradientStep(nn.Module):
    """`x - c * conv_transpose2d(relu(conv2d(x, K) + b), K)`, as orthogonium writes an SLL block."""

    def __init__(self, scale: float, same_kernel: bool = True):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.kernel = nn.Parameter(torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64) * 0.3)
        self.other = nn.Parameter(self.kernel.detach() if same_kernel else torch.randn(
            6, 2, 3, 3, generator=generator, dtype=torch.float64) * 0.3)
        self.bias = nn.Parameter(torch.randn(1, 6, 1, 1, generator=generator, dtype=torch.float64))
        self.scale = scale

    def forward(self, x):
        inner = torch.relu(F.conv2d(x, self.kernel, padding=1) + self.bias)
        return x - self.scale * F.conv_transpose2d(inner, self.other, padding=1)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_a_gradient_step_layer_gets_max_of_1_and_c_norm_squared_minus_1(scale):
    from mixclf_ros.core.layer_bounds import conv2d_weight_l2_bound

    model = GradientStep(scale).eval()
    exact = float(torch.linalg.matrix_norm(dense_matrix(lambda x: F.conv2d(x, model.kernel, padding=1),
                                                        (1, 2, 5, 5)), 2))
    norm = conv2d_weight_l2_bound(model.kernel.detach(), (5, 5), 1)  # the engine's ||K||, >= the exact one
    assert norm >= exact * (1 - 1e-9)
    scale = scale / norm**2  # c ||K||^2 = 0.5, 2, 4
    model.scale = scale
    bound = logit_lipschitz_bound(model, "l2", (2, 5, 5))
    assert bound == pytest.approx(max(1.0, scale * norm * norm - 1.0), rel=1e-6)
    assert largest_slope(model, "l2", (2, 5, 5), samples=16) <= bound * (1 + 1e-9)


def test_a_gradient_step_with_two_kernels_is_not_taken_for_one():
    model = GradientStep(1.0, same_kernel=False).eval()
    bound = logit_lipschitz_bound(model, "l2", (2, 5, 5))
    assert bound > 1.5  # 1 + ||K_1|| ||K_2||: no 1-Lipschitz claim
    assert largest_slope(model, "l2", (2, 5, 5), samples=16) <= bound


@pytest.mark.parametrize("stride, padding, groups", [(1, 1, 1), (2, 1, 1), (1, 0, 2), (2, 2, 2)])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_conv_transpose_is_bounded_by_its_exact_norm(stride, padding, groups, norm):
    weight = torch.randn(4, 6 // groups, 3, 3, generator=torch.Generator().manual_seed(stride), dtype=torch.float64)
    model = Lambda(lambda x: F.conv_transpose2d(x, weight.to(x.dtype), stride=stride, padding=padding, groups=groups))
    matrix = dense_matrix(model, (1, 4, 5, 5))
    exact = float(torch.linalg.matrix_norm(matrix, 2)) if norm == "l2" else float(matrix.abs().sum(1).max())
    bound = logit_lipschitz_bound(model, norm, (4, 5, 5))
    assert exact * (1 - 1e-9) <= bound <= (1.3 if norm == "l2" else 1.0 + 1e-9) * exact


def test_conv_transpose_rounding_bound_covers_the_float32_error():
    torch.manual_seed(2)
    chain = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    weight, bias = chain[0].weight.detach(), chain[0].bias.detach()
    functional = nn.Sequential(Lambda(lambda x: F.conv_transpose2d(x, weight.to(x.dtype), bias.to(x.dtype),
                                                                   padding=1)), *chain[1:]).eval()
    x = torch.rand(16, 2, 6, 6, generator=torch.Generator().manual_seed(2))
    logits32, bound32 = ErrorBoundedForward(functional, torch.float32, input_shape=(2, 6, 6))(x)
    logits64, bound64 = ErrorBoundedForward(functional, input_shape=(2, 6, 6))(x)
    assert ((logits32.double() - logits64).abs() <= bound32.double() + bound64).all()


@pytest.mark.parametrize("overlap", [0, 1])
def test_max_min_of_overlapping_slices_keeps_the_generic_bound(overlap):
    """Disjoint halves pair up (1-Lipschitz); halves that share a coordinate do not."""
    def maxmin(x):
        a, b = x[:, :4 + overlap], x[:, 4 - overlap:]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)

    model = Lambda(maxmin)
    bound = logit_lipschitz_bound(model, "l2", (8,))
    # overlapping halves: each pair (a_j, b_j) is still sorted jointly, but a and b share coordinates
    assert bound == pytest.approx(1.0 if overlap == 0 else 2**0.5)
    assert largest_slope(model.double(), "l2", (8,), samples=16) <= bound * (1 + 1e-9)


class ShapeBranch(nn.Module):
    def forward(self, x):
        return x if x.shape[1] > 2 else -x


def test_a_trace_failure_names_the_innermost_module_and_what_to_do():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), ShapeBranch()))
    with pytest.raises(UnsupportedLayerError, match=r"Sequential\.1\.1 \(.*ShapeBranch\).*needs a rule of its own"):
        logit_lipschitz_bound(model, "l2", (4,))


class PowerIterated(nn.Module):
    """A weight that changes at each access, as a power iteration updating its state in eval mode."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.base = weight

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return weight * (1 + 1e-7 * self.calls)


def test_a_plan_bounds_the_weights_it_froze_and_runs_them():
    layer = nn.Linear(5, 3).double()
    nn.utils.parametrize.register_parametrization(layer, "weight", PowerIterated(layer.weight.detach()))
    model = nn.Sequential(layer).eval()
    plan = BoundPlan(model, (5,))
    frozen = plan.network[0].weight
    assert not nn.utils.parametrize.is_parametrized(plan.network[0])
    assert plan.lipschitz("l2") == pytest.approx(float(torch.linalg.matrix_norm(frozen, 2)), rel=1e-8)
    x = torch.rand(4, 5, dtype=torch.float64)
    logits, _ = plan.rounding(x)
    torch.testing.assert_close(logits, F.linear(x, frozen, plan.network[0].bias), rtol=0, atol=1e-14)
    assert nn.utils.parametrize.is_parametrized(model[0])  # the user's model is left as it was


def test_loading_runs_the_frozen_network_of_a_lipschitz_model(tmp_path: Path):
    from mixclf_ros.models.loading import load_model

    module_file = tmp_path / "changing_net.py"
    module_file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Scale(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.register_buffer('calls', torch.zeros(()))\n"
        "    def forward(self, w):\n        self.calls += 1\n        return w * (1 + 1e-7 * self.calls)\n\n"
        "def build(num_classes=10):\n"
        "    net = nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n"
        "    nn.utils.parametrize.register_parametrization(net[1], 'weight', Scale())\n"
        "    return net\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        from changing_net import build

        path = tmp_path / "weights.pt"
        torch.save(build().state_dict(), path)
        model = load_model({"architecture": "changing_net:build", "weights": str(path), "kind": "lipschitz"})
    finally:
        sys.path.remove(str(tmp_path))
    x = torch.rand(2, 1, 28, 28)
    first, second = model(x), model(x)
    assert torch.equal(first, second)  # the frozen weights: one function, the certified one
    assert model.bound_plan is not None
    torch.testing.assert_close(model.bound_plan.rounding(x.double())[0], first.double(), rtol=1e-5, atol=1e-6)


def test_operator_norms_are_reused_across_plans_and_never_for_changed_weights(monkeypatch):
    from mixclf_ros.core import layer_bounds

    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    store: dict[str, float] = {}
    first = BoundPlan(model, (1, 6, 6), norm_store=store).lipschitz("l2")
    # the convolution's and the dense layer's l2 norms, and the l2 norms of their |W| (rounding bound)
    assert sorted(key.split(":")[3] for key in store) == ["conv2d", "linear", "magnitude", "magnitude"]

    def no_computing(*args, **kwargs):
        raise AssertionError("a stored norm was computed again")

    monkeypatch.setattr(layer_bounds, "circular_conv_spectral_norm", no_computing)
    monkeypatch.setattr(layer_bounds, "linear_bound", no_computing)
    monkeypatch.setattr(layer_bounds, "magnitude_l2_bound", no_computing)
    assert BoundPlan(model, (1, 6, 6), norm_store=store).lipschitz("l2") == first
    with torch.no_grad():
        model[0].weight[0, 0, 1, 1] += 1.0
    with pytest.raises(UnsupportedLayerError, match="computed again"):
        BoundPlan(model, (1, 6, 6), norm_store=store)


def test_the_norm_store_survives_a_restart_and_an_unreadable_file(tmp_path: Path, monkeypatch):
    from mixclf_ros.models.norm_cache import CACHE_DIR_VARIABLE, NormStore

    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    store = NormStore.open()
    store["key"] = 1.25
    store.save()
    assert NormStore.open() == {"key": 1.25}
    (tmp_path / "operator_norms.json").write_text("{not json", encoding="utf-8")
    with pytest.warns(UserWarning, match="unreadable"):
        assert NormStore.open() == {}
