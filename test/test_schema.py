"""The model config schema is the one source of the config keys: loading, the docs table and the
node's parameters come from it."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT

from mixclf_ros.models import DEFAULTS, ModelConfigError, schema, validate_config, zoo_config


def test_docs_carry_the_rendered_schema_table():
    text = (REPO_ROOT / "docs" / "ARCHITECTURE.md").read_text()
    assert schema.markdown_table() in text


def test_loading_defaults_and_known_keys_are_the_schema():
    assert DEFAULTS == schema.DEFAULTS
    with pytest.raises(ModelConfigError, match="unknown model config key"):
        validate_config({**zoo_config("standard"), "temperature": 1.0})
    for name in ("standard", "robust_at", "robust_lipschitz", "robust_lipschitz_gnp", "robust_smoothing"):
        assert set(zoo_config(name)) == {key.name for key in schema.SCHEMA}


@pytest.mark.parametrize("key", schema.SCHEMA, ids=lambda key: key.name)
def test_validation_checks_each_key_type(key):
    wrong = {schema.STRING: 3, schema.INTEGER: "3", schema.DOUBLE: "0.5", schema.DOUBLE_ARRAY: "0.5",
             schema.STRING_ARRAY: 7}[key.type]
    with pytest.raises(ModelConfigError, match=f"'{key.name}'"):
        validate_config({**zoo_config("robust_smoothing"), key.name: wrong})


def test_kind_specific_keys():
    names = lambda kind: {key.name for key in schema.keys_for_kind(kind)}  # noqa: E731
    assert not {"sigma", "n0", "n", "beta", "norm", "lipschitz_constant"} & names("standard")
    assert {"sigma", "n0", "n", "beta"} <= names("smoothing") and "lipschitz_constant" not in names("smoothing")
    assert {"norm", "lipschitz_constant"} <= names("lipschitz") and "sigma" not in names("lipschitz")


def test_shipped_parameters_file_sets_only_keys_the_models_kind_uses():
    parameters = yaml.safe_load((REPO_ROOT / "config" / "mixclf.yaml").read_text())["/**"]["ros__parameters"]
    for prefix in ("standard_model", "robust_model"):
        config = parameters[prefix]
        assert set(config) <= {key.name for key in schema.keys_for_kind(config["kind"])}, prefix
