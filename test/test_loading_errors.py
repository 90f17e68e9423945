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


def test_a_zoo_hash_follows_the_zoo_weights_only(tmp_path, standard_state, capsys):
    """The zoo's card hash checks the zoo's file (also when the config pins none); a user's weights
    with no sha256 load, and the note gives their hash and how to pin it."""
    from mixclf_ros.models import unpinned_note
    from mixclf_ros.models.loading import sha256_of, zoo_sha256

    own = tmp_path / "own.pt"
    torch.save(standard_state, own)
    assert zoo_sha256("zoo:standard.pt") == zoo_config("standard")["sha256"] and zoo_sha256(str(own)) == ""
    model = load_model(_config(weights=str(own)))
    note = unpinned_note(model, "standard_model")
    assert f'standard_model.sha256: "{sha256_of(own)}"' in note and str(own) in note
    assert unpinned_note(load_model(_config()), "standard_model") == ""  # the zoo's file: its card pins it
    pinned = load_model(_config(weights=str(own), sha256=sha256_of(own)))
    assert unpinned_note(pinned, "standard_model") == ""


def test_a_changed_zoo_file_is_refused_even_unpinned(tmp_path, monkeypatch, standard_state):
    from mixclf_ros.models import loading

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "standard.json").write_text((loading.ZOO_DIR / "standard.json").read_text())
    torch.save(standard_state, zoo / "standard.pt")  # untrained: not the shipped file
    monkeypatch.setattr(loading, "ZOO_DIR", zoo)
    with pytest.raises(ModelConfigError, match="its card says"):
        load_model(_config(weights="zoo:standard.pt", sha256=""))


def test_a_missing_weights_file_is_named_by_its_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelConfigError) as error:
        load_model(_config(weights="models/mine.pt"))
    assert str(tmp_path / "models" / "mine.pt") in str(error.value)


def test_an_architecture_mismatch_names_input_channels_and_every_key(tmp_path, standard_state):
    """The message gives input_channels' value and every differing key and shape, not 300 characters of them."""
    renamed = tmp_path / "renamed.pt"
    torch.save({f"backbone.{key}": value for key, value in standard_state.items()}, renamed)
    with pytest.raises(ModelConfigError) as refused:
        load_model(_config(weights=str(renamed)))
    message = str(refused.value)
    assert "'input_channels' = 1" in message
    assert all(key in message and f"backbone.{key}" in message for key in standard_state)
    grey = tmp_path / "grey.pt"
    torch.save(standard_state, grey)
    with pytest.raises(ModelConfigError, match=r"'input_channels' = 3 .*shapes that differ \(\d+\): .*file \(1,\), "
                                               r"model \(3,\)"):
        load_model(_config(weights=str(grey), input_channels=3))
