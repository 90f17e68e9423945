"""Model configs from a ROS 2 parameters YAML file (`--params`): the node's file, read without ROS."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixclf_ros.evaluation.settings import EvaluationError
from mixclf_ros.runtime.frame_result import LiveSettings
from mixclf_ros.runtime.node_parameters import CERTIFICATE_PRECISIONS


def _flatten_parameters(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2} (ROS parameter names, nested or dotted)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_parameters(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_ros_parameters(path: str | Path) -> dict[str, Any]:
    """Flat `{name: value}` of a ROS 2 parameters YAML file (`<node>: ros__parameters: ...`).

    Sections of every node are merged, wildcard sections (`/**`, `*`) first so that a section
    naming a node overrides them, as ROS does for that node."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise EvaluationError(f"--params {path}: {error}") from error
    sections: list[tuple[bool, dict[str, Any]]] = []

    def visit(node: Any, names: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        parameters = node.get("ros__parameters")
        if isinstance(parameters, dict):
            sections.append((any("*" in name for name in names), parameters))
        for key, value in node.items():
            if key != "ros__parameters":
                visit(value, (*names, str(key)))

    visit(document, ())
    if not sections:
        raise EvaluationError(f"--params {path}: no 'ros__parameters' section found")
    merged: dict[str, Any] = {}
    for _, parameters in sorted(sections, key=lambda section: not section[0]):
        merged.update(_flatten_parameters(parameters))
    return merged


def model_configs_from_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """`{"standard_model": config, "robust_model": config}` from a ROS parameters file, read as the
    node reads it: a file the node refuses (`runtime.node_parameters.refused_parameters`: unknown or
    misspelled names and sections, keys the model's kind does not use, former names) is refused
    here with the same reasons; `beta` comes from the node's `confidence` (beta = 1 - confidence)
    when the file sets it; a model without `kind` has its zoo default's kind, as in the node."""
    from mixclf_ros.models import schema
    from mixclf_ros.runtime.node_parameters import MODELS, default_kind, refused_parameters

    parameters = read_ros_parameters(path)
    refused = refused_parameters(parameters)
    if refused:
        raise EvaluationError(f"--params {path}: the node would refuse this file:\n  " + "\n  ".join(refused))
    configs: dict[str, dict[str, Any]] = {}
    for prefix in MODELS:
        given = {name[len(prefix) + 1:]: value for name, value in parameters.items()
                 if name.startswith(prefix + ".")}
        if not given:
            sections = sorted({name.split(".", 1)[0] for name in parameters if "." in name})
            raise EvaluationError(f"--params {path}: no '{prefix}.*' parameters (sections in the file: "
                                  f"{', '.join(sections) or 'none'}); mixclf-eval needs both models' configs")
        config = dict(given)
        kind = config.setdefault("kind", default_kind(prefix))
        for key in schema.keys_for_kind(kind) if isinstance(kind, str) else ():
            if key.node_parameter and key.node_parameter in parameters:
                config[key.name] = 1.0 - float(parameters[key.node_parameter])
        configs[prefix] = config
    return configs




@dataclass(frozen=True)
class NodeSettings:
    """The node's settings that decide its results, as the node reads them from a parameters file
    (defaults: the node's, `runtime.classifier.LiveSettings`): the live classifier settings
    (alpha, safe_radius and safe_image_radius in [0,1] pixels, confidence), `input_kind`, the
    smoothing `seed` (-1: OS entropy), `standard_precision` and `certificate_precision`."""

    live: LiveSettings = field(default_factory=LiveSettings)
    input_kind: str = "intensity"
    seed: int = -1
    standard_precision: str = "float32"
    certificate_precision: str = CERTIFICATE_PRECISIONS[0]


def node_settings_from_parameters(path: str | Path | None) -> NodeSettings:
    """`NodeSettings` of a ROS parameters file (None: the node's defaults); `EvaluationError` for a
    value the node would refuse."""
    from mixclf_ros.vision.decode import INPUT_KINDS

    parameters = read_ros_parameters(path) if path is not None else {}
    defaults = LiveSettings()
    live: dict[str, float] = {}
    for name in ("alpha", "safe_radius", "safe_image_radius", "confidence"):
        value = parameters.get(name, getattr(defaults, name))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise EvaluationError(f"--params {path}: {name} must be a finite number, got {value!r}")
        live[name] = float(value)
    if not 0.0 <= live["alpha"] <= 1.0 or live["safe_radius"] < 0 or live["safe_image_radius"] < 0 \
            or not 0.5 <= live["confidence"] < 1.0:
        raise EvaluationError(f"--params {path}: need alpha in [0, 1], safe_radius and safe_image_radius >= 0, "
                              f"confidence in [0.5, 1); got {live}")
    input_kind = parameters.get("input_kind", INPUT_KINDS[0])
    if input_kind not in INPUT_KINDS:
        raise EvaluationError(f"--params {path}: input_kind must be one of {', '.join(INPUT_KINDS)}, "
                              f"got {input_kind!r}")
    seed = parameters.get("seed", -1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvaluationError(f"--params {path}: seed must be an integer, got {seed!r}")
    return NodeSettings(LiveSettings(**live), input_kind, seed, str(parameters.get("standard_precision", "float32")),
                        str(parameters.get("certificate_precision", CERTIFICATE_PRECISIONS[0])))
