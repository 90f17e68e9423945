"""A declared `lipschitz_constant` is checked against the gradients of the model it describes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mixclf_ros.core import lipschitz, lipschitz_search
from mixclf_ros.core.layers import Normalize
from mixclf_ros.models import loading
from mixclf_ros.models.loading import ModelConfigError, load_model

MEAN, STD = 0.5, 0.25


def steep_linear(num_classes: int = 10) -> nn.Sequential:
    """A linear classifier of 28x28 grey images with large weights (probabilities far from uniform)."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))
    with torch.no_grad():
        model[1].weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def steep_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("declared") / "steep.pt"
    torch.save(steep_linear().state_dict(), path)
    return path


def steep_config(path: Path, **overrides) -> dict:
    return {"architecture": f"{__name__}:steep_linear", "weights": str(path), "kind": "lipschitz",
            "mean": [MEAN], "std": [STD], **overrides}


def found_in(message: str) -> float:
    return float(re.search(r"up to ([0-9.e+-]+) per \[0,1\] pixel", message).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_declared_constant_below_the_gradients_found_is_refused(norm):
    config = loading.zoo_config("robust_lipschitz")
    sound = load_model({**config, "norm": norm}).lipschitz_constant
    declared = sound * (0.1 if norm == "l2" else 1e-4)  # the linf bound is far from tight (6325 vs slopes ~8)
    with pytest.raises(ModelConfigError) as caught:
        load_model({**config, "norm": norm, "lipschitz_constant": declared})
    message = str(caught.value)
    assert "'lipschitz_constant'" in message and "fmnist_lipschitz_cnn" in message and "robust_lipschitz.pt" in message
    assert str(declared) in message
    assert declared < found_in(message) <= sound  # the search finds a true slope, below the sound bound


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_a_constant_quoted_for_normalised_inputs_is_refused(norm, steep_weights: Path):
    """Papers quote Lip(h) for the network after mean/std; at the [0,1] pixels the model sees, the
    slope is 1/std (here 4) times larger."""
    body = steep_linear()
    body.load_state_dict(torch.load(steep_weights, weights_only=True))
    normalised = lipschitz.probability_lipschitz_bound(body, norm, (1, 28, 28))
    with pytest.raises(ModelConfigError, match="per \\[0,1\\] pixel at the model input"):
        load_model(steep_config(steep_weights, norm=norm, lipschitz_constant=normalised))
    in_pixels = lipschitz.probability_lipschitz_bound(nn.Sequential(Normalize([MEAN], [STD]), body), norm,
                                                      (1, 28, 28))
    # each spectral norm is a certified upper bound within a few 1e-9 of the exact one (core.spectral_norms)
    assert in_pixels == pytest.approx(normalised / STD, rel=1e-8)
    model = load_model(steep_config(steep_weights, norm=norm, lipschitz_constant=in_pixels))
    assert (model.lipschitz_source, model.lipschitz_constant) == ("declared", in_pixels)
    assert normalised < model.lipschitz_lower_bound <= in_pixels


def test_the_search_is_deterministic_and_recorded(steep_weights: Path):
    config = steep_config(steep_weights, lipschitz_constant=1e6)
    first, second = load_model(config), load_model(config)
    assert first.lipschitz_lower_bound == second.lipschitz_lower_bound > 0
    computed = load_model(steep_config(steep_weights))
    assert (computed.lipschitz_source, computed.lipschitz_lower_bound) == ("computed", 0.0)


# ----------------------------------------------------------------------------- issue 19, item 4

DARK_SCALE, DARK_LEVEL = 0.1, 0.1
"""`dark_boundary_linear`: logit 0 is `DARK_SCALE * (sum of pixels - DARK_LEVEL * 784)`, the others 0."""


def dark_boundary_linear(num_classes: int = 10) -> nn.Sequential:
    """A classifier whose class 0 turns on at a mean pixel of 0.1 (dark images): saturated on
    uniform noise (mean pixel 0.5, logit ~31), steep only near dark inputs. Its probability
    outputs' Lipschitz constant is exactly `DARK_SCALE * 28 / 4` in l2 (`grad p_0 = p_0 (1 - p_0) a 1`,
    `grad p_j = -p_j p_0 a 1`, both at most `a ||1||_2 / 4`, attained at p_0 = 1/2, logit 0 = log 9)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].weight[0].fill_(DARK_SCALE)
        model[1].bias[0] = -DARK_SCALE * DARK_LEVEL * 28 * 28
    return model


DARK_L2_CONSTANT = DARK_SCALE * 28 / 4


def tiny_vit(num_classes: int = 10) -> nn.Module:
    """A one-block torchvision VisionTransformer on 1x28x28 (7x7 patches, 2 heads, width 16),
    with a random head (torchvision initialises it to 0, a constant model)."""
    import torchvision

    torch.manual_seed(7)
    model = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=num_classes)
    model.conv_proj = nn.Conv2d(1, 16, 7, stride=7)
    nn.init.normal_(model.heads.head.weight)
    return model


def _saved(builder, path: Path) -> Path:
    torch.save(builder().state_dict(), path)
    return path


def _config(builder, path: Path, constant: float, **overrides) -> dict:
    return {"architecture": f"{__name__}:{builder.__name__}", "weights": str(path), "kind": "lipschitz",
            "mean": [0.0], "std": [1.0], "lipschitz_constant": constant, **overrides}


def test_the_search_finds_the_slope_of_a_model_saturated_on_uniform_noise():
    model = dark_boundary_linear().double().eval()
    exact = float(model[1].weight[0, 0]) * 28 / 4  # DARK_L2_CONSTANT for the float32-rounded weight
    found = lipschitz_search.probability_gradient_norm_search(model, "l2", (1, 28, 28))
    assert 0.9 * exact <= found <= exact * (1 + 1e-9)
    level = DARK_LEVEL + math.log(9) / (DARK_SCALE * 28 * 28)  # logit 0 = log 9: p_0 = 1/2 against 9 zeros
    boundary = torch.full((1, 1, 28, 28), level, dtype=torch.float64)
    at_data = lipschitz_search.probability_gradient_norm_search(model, "l2", (1, 28, 28), points=0, steps=0,
                                                                starts=boundary)
    assert at_data == pytest.approx(exact, rel=1e-9)


def test_a_constant_below_the_slope_near_dark_images_is_refused(tmp_path: Path):
    """Uniform noise and 4 ascent steps of 0.05 never leave the saturated region of this model."""
    path = _saved(dark_boundary_linear, tmp_path / "dark.pt")
    with pytest.raises(ModelConfigError) as caught:
        load_model(_config(dark_boundary_linear, path, DARK_L2_CONSTANT / 2))
    assert DARK_L2_CONSTANT / 2 < found_in(str(caught.value)) <= DARK_L2_CONSTANT * (1 + 1e-6)


def test_a_declared_constant_is_checked_on_an_attention_model(tmp_path: Path):
    """The fused CPU attention kernels have no double backward; the check runs on the math kernel."""
    path = _saved(tiny_vit, tmp_path / "vit.pt")
    model = load_model(_config(tiny_vit, path, 1e3))
    assert model.lipschitz_source == "declared" and 0 < model.lipschitz_lower_bound < 1e3


def test_the_refusal_for_an_attention_model_gives_advice_that_works(tmp_path: Path):
    path = _saved(tiny_vit, tmp_path / "vit.pt")
    with pytest.raises(ModelConfigError) as caught:
        load_model(_config(tiny_vit, path, 1e-6))
    message = str(caught.value)
    found = found_in(message)
    assert found > 1e-6 and "gradients fail" not in message
    network = nn.Sequential(Normalize([0.0], [1.0]), tiny_vit())
    try:
        sound = lipschitz.probability_lipschitz_bound(network, "l2", (1, 28, 28))
    except lipschitz.UnsupportedLayerError:
        assert "cannot bound this model" in message and "set lipschitz_constant: 0" not in message
        assert "set 0" not in message
        assert f"at least {found:.6g}" in message and "per [0,1] pixel" in message
    else:
        assert "set lipschitz_constant: 0" in message and f"{sound:.6g}" in message


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_the_refusal_advises_the_sound_bound_where_the_engine_can_bound_the_model(norm, steep_weights: Path):
    config = steep_config(steep_weights, norm=norm, lipschitz_constant=1e-6)
    with pytest.raises(ModelConfigError) as caught:
        load_model(config)
    sound = load_model(steep_config(steep_weights, norm=norm)).lipschitz_constant
    assert "set lipschitz_constant: 0" in str(caught.value) and f"({sound:.6g})" in str(caught.value)
    assert "softmax_lipschitz_factor" in str(caught.value)  # how to convert a quoted logit constant


def test_the_guide_converts_a_quoted_logit_constant_with_the_factors_the_code_uses():
    """docs/BRING_YOUR_OWN.md's worked example: a 1-Lipschitz logit network on inputs normalised
    with std 0.3530 (Fashion-MNIST) and ImageNet's std, certified in l2."""
    from mixclf_ros.core.certify import softmax_lipschitz_factor

    guide = (Path(__file__).resolve().parents[1] / "docs" / "BRING_YOUR_OWN.md").read_text()
    section = guide.split("## Declaring a Lipschitz constant: the units", 1)[1].split("\n## ", 1)[0]
    factor = softmax_lipschitz_factor("l2")
    assert f"`sqrt(2)/4 = {factor:.6f}` in l2, `1/2` in linf" in section and softmax_lipschitz_factor("linf") == 0.5
    assert f"{factor:.6f} × 1 / 0.3530 = {factor / 0.3530:.5f}" in section
    assert f"`{factor:.6f} / 0.224 =\n{factor / 0.224:.4f}`" in section
    # the conversion is what the engine computes for a network whose logits are exactly 1-Lipschitz
    body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10, bias=False))
    with torch.no_grad():
        body[1].weight.copy_(torch.linalg.qr(torch.randn(28 * 28, 10, generator=torch.Generator().manual_seed(0)))[0].T)
    in_pixels = lipschitz.probability_lipschitz_bound(nn.Sequential(Normalize([0.2860], [0.3530]), body), "l2",
                                                      (1, 28, 28))
    assert in_pixels == pytest.approx(factor / 0.3530, rel=1e-6)
