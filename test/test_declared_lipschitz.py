"""A declared `lipschitz_constant` is checked against the gradients of the model it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mixclf_ros.core import lipschitz
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
    assert in_pixels == pytest.approx(normalised / STD, rel=1e-9)
    model = load_model(steep_config(steep_weights, norm=norm, lipschitz_constant=in_pixels))
    assert (model.lipschitz_source, model.lipschitz_constant) == ("declared", in_pixels)
    assert normalised < model.lipschitz_lower_bound <= in_pixels


def test_the_search_is_deterministic_and_recorded(steep_weights: Path):
    config = steep_config(steep_weights, lipschitz_constant=1e6)
    first, second = load_model(config), load_model(config)
    assert first.lipschitz_lower_bound == second.lipschitz_lower_bound > 0
    computed = load_model(steep_config(steep_weights))
    assert (computed.lipschitz_source, computed.lipschitz_lower_bound) == ("computed", 0.0)
