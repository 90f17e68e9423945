"""The node's ROS parameters: declarations and descriptors made from the model config schema, and
validation of live changes into one immutable `LiveParameters`.

Three kinds of parameters:
  live       - take effect on the next frame (`ros2 param set` at any time)
  configure  - read in `on_configure`; changes are refused while the node is active (deactivate,
               set, then cleanup + configure + activate, as nav2 does)
  startup    - read once when the node is constructed (read-only)
Model parameters `<model>.<key>` come from `mixclf_ros.models.schema`; a key is declared only for
a model of a kind that uses it (`ros2 param list` shows no `sigma` for a Lipschitz model).
Defaults are the shipped `config/mixclf.yaml` (the zoo's standard and Lipschitz models).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.parameter import Parameter

from mixclf_ros.models import schema
from mixclf_ros.runtime.classifier import LiveSettings
from mixclf_ros.vision.decode import INPUT_KINDS

MODELS = {"standard_model": "standard", "robust_model": "robust_lipschitz"}
"""The two model parameter prefixes and the shipped zoo model each defaults to."""

MAX_QUEUED_FRAMES = 100
"""frame_policy every: frames kept per camera before the oldest is dropped."""

LIVE, CONFIGURE, STARTUP = "live", "configure", "startup"

OS_ENTROPY_SEED = -1
"""`seed` value (the default) that draws the smoothing noise seed from the OS's entropy."""

_TYPES = {
    schema.STRING: ParameterType.PARAMETER_STRING, schema.INTEGER: ParameterType.PARAMETER_INTEGER,
    schema.DOUBLE: ParameterType.PARAMETER_DOUBLE, schema.DOUBLE_ARRAY: ParameterType.PARAMETER_DOUBLE_ARRAY,
    schema.STRING_ARRAY: ParameterType.PARAMETER_STRING_ARRAY,
}


@dataclass(frozen=True)
class NodeParameter:
    name: str
    default: Any
    type: int
    when: str
    description: str
    float_range: tuple[float, float] | None = None
    integer_range: tuple[int, int] | None = None


_LIVE_DEFAULTS = LiveSettings()
_D, _I = ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_INTEGER
_S, _B, _SA = ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_BOOL, ParameterType.PARAMETER_STRING_ARRAY

NODE_PARAMETERS: tuple[NodeParameter, ...] = (
    NodeParameter("alpha", _LIVE_DEFAULTS.alpha, _D, LIVE,
                  "weight of the robust model in the mixture; certificates need alpha >= 0.5", (0.0, 1.0)),
    # Both thresholds default to one grey level of an 8-bit camera: a certificate smaller than that
    # protects against nothing a camera can show.
    NodeParameter("safe_radius", _LIVE_DEFAULTS.safe_radius, _D, LIVE,
                  "safe = true needs certified_radius >= this; model input: [0,1] pixels at the model's input "
                  "size, before mean/std, in the certificate norm; 0 = not set; default one grey level, 1/255",
                  (0.0, 1e6)),
    NodeParameter("safe_image_radius", _LIVE_DEFAULTS.safe_image_radius, _D, LIVE,
                  "safe = true needs image_radius >= this; source image pixels scaled to [0,1], in the "
                  "certificate norm; 0 = not set; default one grey level, 1/255", (0.0, 1e6)),
    NodeParameter("max_image_age", 1.0, _D, LIVE,
                  "frames whose header stamp is older than this many seconds are STALE; 0 disables",
                  (0.0, 3600.0)),
    NodeParameter("confidence", _LIVE_DEFAULTS.confidence, _D, LIVE,
                  "randomized smoothing: probability that a certificate holds, 1 - beta", (0.5, 1.0 - 1e-12)),
    NodeParameter("camera_timeout", 2.0, _D, LIVE,
                  "seconds without frames after which a camera is reported WARN", (0.1, 3600.0)),
    NodeParameter("image_topics", ["image"], _SA, CONFIGURE,
                  "camera topics (sensor_msgs/Image), relative names so remapping and namespaces apply"),
    NodeParameter("image_transport", "raw", _S, CONFIGURE,
                  "one transport per camera, image_transport's convention: raw (sensor_msgs/Image on each "
                  "topic) | compressed (sensor_msgs/CompressedImage on <topic>/compressed)"),
    NodeParameter("input_kind", INPUT_KINDS[0], _S, CONFIGURE,
                  "what the model takes: intensity (camera images; depth encodings 16UC1/32FC1 are refused) | "
                  "depth (REP-118 depth images only)"),
    NodeParameter("debug_image", False, _B, CONFIGURE,
                  "publish ~/debug_image (the frame with class, probability, radius and a safe badge) while "
                  "someone subscribes"),
    NodeParameter("device", "auto", _S, CONFIGURE, "auto (first CUDA device, else CPU), cpu, cuda:N"),
    NodeParameter("standard_precision", "float32", _S, CONFIGURE,
                  "float32 | float16 | bfloat16 for the standard model (CUDA only)"),
    NodeParameter("torch_threads", int(os.environ.get("MIXCLF_TORCH_THREADS", "0")), _I, CONFIGURE,
                  "CPU threads for torch: 0 = chosen at warm-up by timing the real path per batch size "
                  "(one frame, all cameras); N = always N",
                  integer_range=(0, 256)),
    NodeParameter("frame_policy", "newest", _S, CONFIGURE,
                  "newest: classify only the newest frame of each camera (real time; older frames are "
                  "dropped and counted) | every: classify every frame in order, up to "
                  f"{MAX_QUEUED_FRAMES} queued per camera (playback, evaluation)"),
    NodeParameter("seed", OS_ENTROPY_SEED, _I, CONFIGURE,
                  f"seed of the randomized-smoothing noise: {OS_ENTROPY_SEED} = fresh operating-system entropy in "
                  "every process (the 1 - beta guarantee needs noise the attacker cannot predict); >= 0 = fixed, "
                  "for tests and replay only: it voids the guarantee against anyone who knows it",
                  integer_range=(OS_ENTROPY_SEED, 2**63 - 1)),
    NodeParameter("diagnostics_period", 1.0, _D, STARTUP, "seconds between /diagnostics messages", (0.05, 60.0)),
    NodeParameter("autostart", True, _B, STARTUP, "configure and activate at start-up"),
    NodeParameter("executor", "events", _S, STARTUP,
                  "events (rclpy.experimental.EventsExecutor, one thread) | multi_threaded (MultiThreadedExecutor)"),
    NodeParameter("inline_inference", False, _B, STARTUP,
                  "classify a frame in its subscription callback when the inference thread is idle (no "
                  "hand-off); frames arriving meanwhile go to the inference thread"),
)
_BY_NAME = {parameter.name: parameter for parameter in NODE_PARAMETERS}


def descriptor(description: str, parameter_type: int, read_only: bool = False,
               float_range: tuple[float, float] | None = None,
               integer_range: tuple[int, int] | None = None) -> ParameterDescriptor:
    result = ParameterDescriptor(description=description, type=parameter_type, read_only=read_only)
    if float_range is not None:
        result.floating_point_range = [
            FloatingPointRange(from_value=float(float_range[0]), to_value=float(float_range[1]), step=0.0)]
    if integer_range is not None:
        result.integer_range = [IntegerRange(from_value=integer_range[0], to_value=integer_range[1], step=0)]
    return result


def _as_parameter_value(value: Any, key: schema.ConfigKey) -> Any:
    if key.type == schema.STRING_ARRAY:
        return list(value) or [""]  # ROS cannot type an empty array; "" entries are ignored when read
    if key.type == schema.DOUBLE_ARRAY:
        return [float(v) for v in value]
    return value


DEMO_CROP = 476
"""Default centre crop of both models, in source pixels: the demo camera renders each 28x28 article
at 17x (476x476) in the centre of its 640x480 frame."""


def model_defaults(prefix: str) -> dict[str, Any]:
    """The shipped config of the model under `prefix`: a zoo model, cropped as the demo camera needs."""
    from mixclf_ros.models.loading import zoo_config

    return {**zoo_config(MODELS[prefix]), "crop_height": DEMO_CROP, "crop_width": DEMO_CROP}


def moved_parameters(node: Node) -> str:
    """Why the start-up parameters cannot be used as given ('' if they can): a former node
    parameter that is now a key of each model's config was set."""
    given = [name for name in schema.FORMER_NODE_PARAMETERS if name in node._parameter_overrides]
    if not given:
        return ""
    return ("parameter(s) " + ", ".join(given) + " moved into each model's config, since each model preprocesses "
            "the frame its own way: set " + ", ".join(f"{prefix}.{name}" for name in given for prefix in MODELS)
            + " instead")


def _coerce_overrides(node: Node, types: dict[str, int]) -> None:
    """Integers given for doubles at start-up (`-p alpha:=1`, a YAML `alpha: 1`) become doubles:
    rclpy checks start-up values against the declared type before any callback runs."""
    overrides = node._parameter_overrides  # rclpy keeps the start-up values here until declared
    for name, expected in types.items():
        if name in overrides:
            overrides[name] = coerce(overrides[name], expected)


def declare(node: Node) -> None:
    """Declares the node parameters and, for each model, the schema keys its kind uses."""
    types = {parameter.name: parameter.type for parameter in NODE_PARAMETERS}
    types.update({f"{prefix}.{key.name}": _TYPES[key.type] for prefix in MODELS for key in schema.SCHEMA})
    _coerce_overrides(node, types)
    for parameter in NODE_PARAMETERS:
        node.declare_parameter(parameter.name, parameter.default, descriptor(
            f"{parameter.description} ({parameter.when})", parameter.type, read_only=parameter.when == STARTUP,
            float_range=parameter.float_range, integer_range=parameter.integer_range))
    for prefix in MODELS:
        kind = schema.KEYS["kind"]
        node.declare_parameter(f"{prefix}.kind", model_defaults(prefix)["kind"],
                               _model_descriptor(prefix, kind))
        declare_model_keys(node, prefix)


def _model_descriptor(prefix: str, key: schema.ConfigKey) -> ParameterDescriptor:
    units = f" [{key.units}]" if key.units else ""
    return descriptor(f"{prefix}: {key.description}{units} ({CONFIGURE})", _TYPES[key.type])


def declare_model_keys(node: Node, prefix: str) -> None:
    """Declares the keys the model's current kind uses and undeclares the others."""
    kind = node.get_parameter(f"{prefix}.kind").value
    defaults = model_defaults(prefix)
    for key in schema.SCHEMA:
        if key.name == "kind" or key.node_parameter:
            continue
        name = f"{prefix}.{key.name}"
        wanted = key.used_by(kind) or kind not in schema.KINDS
        if wanted and not node.has_parameter(name):
            node.declare_parameter(name, _as_parameter_value(defaults[key.name], key), _model_descriptor(prefix, key))
        elif not wanted and node.has_parameter(name):
            node.undeclare_parameter(name)


def model_config(node: Node, prefix: str, confidence: float) -> dict[str, Any]:
    """The model config of `prefix` from the declared parameters (schema keys of its kind)."""
    config = {}
    for key in schema.SCHEMA:
        name = f"{prefix}.{key.name}"
        if node.has_parameter(name):
            value = node.get_parameter(name).value
            if key.type == schema.STRING_ARRAY:
                value = [item for item in value if item]
            elif key.type == schema.DOUBLE_ARRAY:
                value = list(value)
            config[key.name] = value
    if config.get("kind") == "smoothing":
        config["beta"] = 1.0 - confidence
    return config


def coerce(parameter: Parameter, expected: int) -> Parameter:
    """An integer (array) given for a double (array) parameter, as that double (array)."""
    if expected == ParameterType.PARAMETER_DOUBLE and parameter.type_ == Parameter.Type.INTEGER:
        return Parameter(parameter.name, Parameter.Type.DOUBLE, float(parameter.value))
    if expected == ParameterType.PARAMETER_DOUBLE_ARRAY and parameter.type_ == Parameter.Type.INTEGER_ARRAY:
        return Parameter(parameter.name, Parameter.Type.DOUBLE_ARRAY, [float(v) for v in parameter.value])
    return parameter


def coerce_integers(parameters: list[Parameter], node: Node) -> list[Parameter]:
    """Pre-set callback: an integer for a double parameter (`ros2 param set /mixclf alpha 1` sends
    an integer) becomes that double; integer arrays for double arrays likewise."""
    return [coerce(parameter, node.describe_parameter(parameter.name).type)
            if node.has_parameter(parameter.name) else parameter for parameter in parameters]


@dataclass(frozen=True)
class LiveParameters:
    """The live parameters, swapped as one object (readers take one consistent snapshot)."""

    classifier: LiveSettings
    max_image_age: float
    camera_timeout: float


def initial_live(node: Node) -> LiveParameters:
    value = lambda name: node.get_parameter(name).value  # noqa: E731
    return LiveParameters(LiveSettings(alpha=value("alpha"), safe_radius=value("safe_radius"),
                                       confidence=value("confidence"), safe_image_radius=value("safe_image_radius")),
                          max_image_age=value("max_image_age"), camera_timeout=value("camera_timeout"))


CLASSIFIER_SETTINGS = ("alpha", "safe_radius", "safe_image_radius", "confidence")
"""The live parameters that are `LiveSettings` fields (they decide whether a frame can be safe)."""


def smoothing_seed(node: Node) -> int | None:
    """The `seed` parameter for `CertifiedClassifier`: None (OS entropy) for a negative value."""
    seed = node.get_parameter("seed").value
    return None if seed < 0 else int(seed)


def is_live(name: str) -> bool:
    return name in _BY_NAME and _BY_NAME[name].when == LIVE


def needs_configure(name: str) -> bool:
    """Read in on_configure (rclpy's own parameters, such as use_sim_time, are not)."""
    return (name in _BY_NAME and _BY_NAME[name].when == CONFIGURE) or name.split(".", 1)[0] in MODELS


def apply_changes(current: LiveParameters, parameters: list[Parameter], active: bool) -> LiveParameters:
    """The live parameters after `parameters`; raises ValueError (the reason) for a change that is
    invalid, or that needs a reconfigure while the node is active. Types and ranges of declared
    parameters are also checked by rclpy from the descriptors."""
    changes: dict[str, float] = {}
    for parameter in parameters:
        if not is_live(parameter.name):
            if active and needs_configure(parameter.name):
                raise ValueError(f"{parameter.name} is read at configure: deactivate and clean up the node, "
                                 "set it, then configure and activate")
            continue
        value = parameter.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{parameter.name} must be a double")
        if not math.isfinite(value):
            raise ValueError(f"{parameter.name} must be finite")
        changes[parameter.name] = float(value)
    if "alpha" in changes and not 0.0 <= changes["alpha"] <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    for name in ("safe_radius", "safe_image_radius", "max_image_age"):
        if changes.get(name, 0.0) < 0.0:
            raise ValueError(f"{name} must be >= 0")
    if "confidence" in changes and not 0.5 <= changes["confidence"] < 1.0:
        raise ValueError("confidence must be in [0.5, 1)")
    if changes.get("camera_timeout", 1.0) <= 0.0:
        raise ValueError("camera_timeout must be > 0")
    classifier = {key: changes[key] for key in CLASSIFIER_SETTINGS if key in changes}
    node_side = {key: changes[key] for key in ("max_image_age", "camera_timeout") if key in changes}
    return replace(current, classifier=replace(current.classifier, **classifier), **node_side)


def usage() -> str:
    """The parameters, their defaults and when they are read, for `mixclf_node --help`."""
    lines = ["parameters (live: any time; configure: read at configure, changed only while not active; "
             "startup: read once):"]
    for parameter in NODE_PARAMETERS:
        lines.append(f"  {parameter.name} = {parameter.default!r} ({parameter.when}): {parameter.description}")
    for prefix, zoo_name in MODELS.items():
        lines.append(f"  {prefix}.<key> (configure; default: the zoo's {zoo_name} model): the model config keys "
                     "its kind uses, see mixclf_ros/models/schema.py")
    return "\n".join(lines)
