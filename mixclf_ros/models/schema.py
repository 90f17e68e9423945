"""The model config schema, declared once.

A model config is a flat dict (the same keys in the node's parameters file under `standard_model.`
and `robust_model.`, and in `mixclf-eval --params`). It also says how a decoded camera frame
becomes this model's input (`crop_*`, `resize`, and the `input_*` size and channels the frame is
resized and colour-converted to): each model of the pair has its own. Every key is declared here with its type,
default, units, description and the model kinds that use it. `models.loading` fills defaults and
checks types from it, the node declares its ROS parameters and descriptors from it, and
`docs/ARCHITECTURE.md` carries the table `markdown_table()` renders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

KINDS = ("standard", "empirical", "lipschitz", "smoothing")
ALL_KINDS = frozenset(KINDS)

# value types of a key (the node maps them to rcl_interfaces ParameterType)
STRING, INTEGER, DOUBLE, DOUBLE_ARRAY, STRING_ARRAY = "string", "integer", "double", "double[]", "string[]"


@dataclass(frozen=True)
class ConfigKey:
    """One model config key."""

    name: str
    type: str
    default: Any
    units: str
    description: str
    kinds: frozenset = ALL_KINDS
    minimum: int = 1
    """Smallest value of an integer key."""
    node_parameter: str = ""
    """Non-empty when the node exposes this key through another parameter (named here) instead of
    `<model>.<name>`."""

    def used_by(self, kind: str) -> bool:
        return kind in self.kinds


SCHEMA: tuple[ConfigKey, ...] = (
    ConfigKey("architecture", STRING, "", "",
              "project builder name (mixclf_ros.models.architectures), 'torchvision:<name>', or "
              "'package.module:Callable' (called with num_classes=...); required"),
    ConfigKey("weights", STRING, "", "",
              "'zoo:<file>' (shipped in mixclf_ros/models/zoo/) or a path: a state_dict (.pt/.pth, read with "
              "torch.load(weights_only=True)) or a TorchScript file (.ts/.jit/.torchscript); required"),
    ConfigKey("sha256", STRING, "", "hex digest", "expected sha256 of the weights file ('' = unchecked)"),
    ConfigKey("num_classes", INTEGER, 10, "", "number of output classes"),
    ConfigKey("input_channels", INTEGER, 1, "",
              "model input channels: 1 (grey, BT.601 from colour frames) or 3 (RGB; grey frames replicated)"),
    ConfigKey("input_height", INTEGER, 28, "pixels", "model input height"),
    ConfigKey("input_width", INTEGER, 28, "pixels", "model input width"),
    ConfigKey("mean", DOUBLE_ARRAY, [0.0], "[0,1] pixels",
              "per-channel mean (1 or input_channels values), applied inside the loaded model"),
    ConfigKey("std", DOUBLE_ARRAY, [1.0], "[0,1] pixels",
              "per-channel std (1 or input_channels values, > 0), applied inside the loaded model"),
    ConfigKey("crop_height", INTEGER, 0, "source pixels",
              "centre crop height of the camera frame, taken before the resize to input_height (0 = the full "
              "height)", minimum=0),
    ConfigKey("crop_width", INTEGER, 0, "source pixels",
              "centre crop width of the camera frame, taken before the resize to input_width (0 = the full width)",
              minimum=0),
    ConfigKey("resize", STRING, "area", "",
              "resize of the (cropped) frame to input_height x input_width: area (average) | bilinear"),
    ConfigKey("kind", STRING, "standard", "",
              "standard | empirical (no certificate) | lipschitz (Theorem 1) | smoothing (Theorem 2)"),
    ConfigKey("norm", STRING, "l2", "", "certificate norm: l2 | linf", frozenset({"lipschitz", "empirical"})),
    ConfigKey("lipschitz_constant", DOUBLE, 0.0, "per [0,1] pixel, in `norm`",
              "> 0 declares the Lipschitz constant of the probability outputs (reported as declared); "
              "0 computes a sound bound with mixclf_ros.core.lipschitz", frozenset({"lipschitz"})),
    ConfigKey("sigma", DOUBLE, 0.25, "[0,1] pixels, l2", "smoothing noise standard deviation",
              frozenset({"smoothing"})),
    ConfigKey("n0", INTEGER, 64, "samples", "noise samples that select the class", frozenset({"smoothing"})),
    ConfigKey("n", INTEGER, 1000, "samples", "noise samples that bound the class probability",
              frozenset({"smoothing"})),
    ConfigKey("beta", DOUBLE, 0.001, "probability", "failure probability of the smoothing certificate",
              frozenset({"smoothing"}), node_parameter="confidence"),
    ConfigKey("class_names", STRING_ARRAY, [], "", "class names, index = class id (optional)"),
    ConfigKey("class_names_file", STRING, "", "", "text file with one class name per line (optional; "
              "replaces class_names)"),
)

KEYS: dict[str, ConfigKey] = {key.name: key for key in SCHEMA}
FORMER_NODE_PARAMETERS = ("crop_height", "crop_width", "resize")
"""Keys that were once node parameters (one preprocessing for both models): the node and
`mixclf-eval --params` refuse them at the top level, naming `<model>.<key>`."""
DEFAULTS: dict[str, Any] = {key.name: key.default for key in SCHEMA}


def defaults() -> dict[str, Any]:
    """A fresh copy of every key's default."""
    return copy.deepcopy(DEFAULTS)


def keys_for_kind(kind: str) -> tuple[ConfigKey, ...]:
    """The keys a model of `kind` uses (every key for an unknown kind, so validation can name it)."""
    if kind not in KINDS:
        return SCHEMA
    return tuple(key for key in SCHEMA if key.used_by(kind))


def markdown_table() -> str:
    """The schema as a markdown table (kept in docs/ARCHITECTURE.md; a test compares them)."""
    rows = ["| key | type | default | units | kinds | description |", "|---|---|---|---|---|---|"]
    for key in SCHEMA:
        kinds = "all" if key.kinds == ALL_KINDS else ", ".join(kind for kind in KINDS if kind in key.kinds)
        default = f'"{key.default}"' if key.type == STRING else str(key.default)
        description = key.description
        if key.node_parameter:
            description += f" (the node: 1 - its live parameter `{key.node_parameter}`)"
        rows.append(f"| `{key.name}` | {key.type} | `{default}` | {key.units} | {kinds} | "
                    f"{description.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"
