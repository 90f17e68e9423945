"""Loading mistakes a user makes with their own models get a `ModelConfigError` that says what to do."""

from __future__ import annotations

import pytest
import torch

from mixclf_ros.models import ModelConfigError, load_model, zoo_config
from mixclf_ros.models.architectures import ARCHITECTURES


def _config(**overrides):
    return {**zoo_config("standard"), "sha256": "", **overrides}


@pytest.fixture(scope="module")
def standard_state():
    config = zoo_config("standard")
    return ARCHITECTURES[config["architecture"]](num_classes=10, mean=config["mean"], std=config["std"]).state_dict()


@pytest.mark.parametrize("architecture", ["torchvision:get_model", "torchvision:list_models",
                                          "torchvision:no_such_net", "torchvision:resnet"])
def test_every_torchvision_builder_failure_is_a_config_error(tmp_path, architecture):
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    with pytest.raises(ModelConfigError, match="architecture"):
        load_model(_config(architecture=architecture, weights=str(weights)))


def test_a_directory_is_not_reported_as_missing(tmp_path):
    with pytest.raises(ModelConfigError, match="is a directory"):
        load_model(_config(weights=str(tmp_path)))


def test_data_parallel_prefix_gets_a_hint(tmp_path, standard_state):
    weights = tmp_path / "ddp.pt"
    torch.save({f"module.{key}": value for key, value in standard_state.items()}, weights)
    with pytest.raises(ModelConfigError, match=r"module\.state_dict\(\)"):
        load_model(_config(weights=str(weights)))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_training_checkpoints_get_a_hint(tmp_path, standard_state, wrapper):
    weights = tmp_path / "checkpoint.pt"
    torch.save({wrapper: standard_state, "epoch": 3}, weights)
    with pytest.raises(ModelConfigError, match=f"training checkpoint.*'{wrapper}'"):
        load_model(_config(weights=str(weights)))


def test_errors_name_the_model(tmp_path):
    with pytest.raises(ModelConfigError, match=r"^robust_model: model config key 'sha256'"):
        load_model({**zoo_config("robust_lipschitz"), "sha256": "0" * 64}, name="robust_model")
