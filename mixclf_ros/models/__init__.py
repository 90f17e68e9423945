"""Model builders, the model config, safe loading and the shipped zoo (weights and model cards)."""

from mixclf_ros.models.loading import (
    DEFAULTS,
    ZOO_DIR,
    LoadedModel,
    ModelConfigError,
    check_compatible,
    load_model,
    resolve_weights,
    sha256_of,
    unpinned_note,
    validate_config,
    zoo_config,
)

__all__ = [
    "DEFAULTS",
    "ZOO_DIR",
    "LoadedModel",
    "ModelConfigError",
    "check_compatible",
    "load_model",
    "resolve_weights",
    "sha256_of",
    "unpinned_note",
    "validate_config",
    "zoo_config",
]
