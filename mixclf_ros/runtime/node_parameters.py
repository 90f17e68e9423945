"""The node's parameter names, declared once without ROS, and the one check of a parameters file.

`NODE_PARAMETERS` are the node's own parameters (name, default, type, when read); each model's
parameters are `<model>.<key>` with the keys of `mixclf_ros.models.schema`. `ros.parameters` declares
them to rclpy from here; `refused_parameters` is the one judgement of which start-up values the
node and `mixclf-eval --params` refuse (a flat `{name: value}` dict, no rclpy needed), so both
refuse the same names for the same reasons.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mixclf_ros.models import schema
from mixclf_ros.runtime.frame_result import LiveSettings
from mixclf_ros.vision.decode import INPUT_KINDS

MODELS = {"standard_model": "standard", "robust_model": "robust_lipschitz_gnp"}
"""The two model parameter prefixes and the shipped zoo model each defaults to."""

MAX_QUEUED_FRAMES = 100
"""frame_policy every: frames kept per camera before the oldest is dropped."""

LIVE, CONFIGURE, STARTUP = "live", "configure", "startup"

CERTIFICATE_PRECISIONS = ("auto", "float64", "float32")
"""`certificate_precision` values (the first is the default): float64 = the Lipschitz certificate's
float64 routes only, float32 = its float32 route first (`runtime.lipschitz_pass`), auto = float32
first on CUDA (GPUs run float64 at 1/2 of float32's rate down to 1/32 or less, robot-class ones at
the low end) and float64 on the CPU (measured faster there, docs/BENCHMARKS.md)."""

OS_ENTROPY_SEED = -1
"""`seed` value (the default) that draws the smoothing noise seed from the OS's entropy."""

BOOL = "bool"
"""Value type of a node parameter beside the schema's (schema.STRING, INTEGER, DOUBLE, ...)."""

ROS_OWN_PARAMETERS = ("use_sim_time", "start_type_description_service", "start_parameter_event_publisher")
"""Parameters that rclpy (or launch, through it) declares on every node: always allowed."""
ROS_OWN_PREFIXES = ("qos_overrides.",)
"""Prefixes of parameters rclpy declares per topic (`qos_overrides./image.subscription.depth`)."""


@dataclass(frozen=True)
class NodeParameter:
    """One node parameter; `type` is a schema type name or `BOOL`; ranges are inclusive; `choices`:
    the values a string parameter takes (empty: any)."""

    name: str
    default: Any
    type: str
    when: str
    description: str
    float_range: tuple[float, float] | None = None
    integer_range: tuple[int, int] | None = None
    choices: tuple[str, ...] = ()


_D, _I, _S, _B, _SA = schema.DOUBLE, schema.INTEGER, schema.STRING, BOOL, schema.STRING_ARRAY

_LIVE_DEFAULTS = LiveSettings()
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
    NodeParameter("certificate_precision", CERTIFICATE_PRECISIONS[0], _S, CONFIGURE,
                  "auto: float32 on CUDA, float64 on the CPU | float64: a Lipschitz robust model's certificate "
                  "pass runs in float64 | float32: first in float32 with its own rigorous error bound, and again in "
                  "float64 for the frames where that bound could change safe or cost radius (the float32 route is "
                  "dropped after its first 32 frames where float32 first, measured, costs more than float64 alone)",
                  choices=CERTIFICATE_PRECISIONS),
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
BY_NAME = {parameter.name: parameter for parameter in NODE_PARAMETERS}


def default_kind(prefix: str) -> str:
    """The kind of the model under `prefix` when the parameters do not set one (its zoo model's)."""
    from mixclf_ros.models.loading import zoo_config

    return zoo_config(MODELS[prefix])["kind"]


def known_names() -> list[str]:
    """Every parameter name the node declares for some kind of model (for nearest-name hints)."""
    return [*BY_NAME, *(f"{prefix}.{key.name}" for prefix in MODELS for key in schema.SCHEMA
                        if not key.node_parameter)]


def _nearest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (nearest known: {close[0]})" if close else ""


def _is_ros_own(name: str) -> bool:
    return name in ROS_OWN_PARAMETERS or name.startswith(ROS_OWN_PREFIXES)


def refused_parameters(given: Mapping[str, Any]) -> list[str]:
    """Why each refused name in `given` (flat start-up values of the node, `{name: value}`) is
    refused, one line per name or misspelled section; [] when all are accepted.

    Refused: a name the node does not declare for any kind (a typo, a misspelled section such as
    `standard_modle.*`, a former name: these once ran another model in silence); a value outside
    a parameter's `choices`; a model key the model's kind does not use (e.g. `robust_model.sigma`
    for a lipschitz model: it would have no effect, which is a mistake of the file, not a choice);
    a model key the node takes from another parameter (`beta`: set `confidence`). Accepted: the
    node's parameters, the schema keys of each model's kind, and rclpy's own parameters
    (`use_sim_time`, `qos_overrides.*`, ...)."""
    known = known_names()
    reasons: list[str] = []
    unknown_sections: dict[str, list[str]] = {}
    for name in sorted(given):
        if name in BY_NAME:
            choices = BY_NAME[name].choices
            if choices and given[name] not in choices:
                reasons.append(f"{name}: {given[name]!r} is not one of {', '.join(choices)}"
                               f"{_nearest(str(given[name]), list(choices))}")
            continue
        if _is_ros_own(name):
            continue
        if name in schema.FORMER_NODE_PARAMETERS:
            reasons.append(f"{name}: moved into each model's config, since each model preprocesses the frame its own "
                           "way: set " + " and ".join(f"{prefix}.{name}" for prefix in MODELS) + " instead")
            continue
        section, dot, key = name.partition(".")
        if not dot:
            reasons.append(f"{name}: not a parameter of the node{_nearest(name, known)}")
        elif section not in MODELS:
            unknown_sections.setdefault(section, []).append(key)
        elif key not in schema.KEYS:
            reasons.append(f"{name}: not a model config key{_nearest(name, known)}")
        elif schema.KEYS[key].node_parameter:
            reasons.append(f"{name}: the node takes it from its parameter {schema.KEYS[key].node_parameter} "
                           f"(beta = 1 - confidence); set that instead")
        else:
            kind = given.get(f"{section}.kind", default_kind(section))
            if isinstance(kind, str) and kind in schema.KINDS and not schema.KEYS[key].used_by(kind):
                users = ", ".join(k for k in schema.KINDS if schema.KEYS[key].used_by(k))
                reasons.append(f"{name}: not used by a model of kind '{kind}' (used by: {users}); remove it, or "
                               f"set {section}.kind")
    for section, keys in unknown_sections.items():
        close = difflib.get_close_matches(section, list(MODELS), n=1, cutoff=0.6)
        if close:
            reasons.append(f"{section}.* ({', '.join(keys)}): not a section of the node (nearest known: "
                           f"{close[0]}.*)")
        else:
            reasons.extend(f"{section}.{key}: not a parameter of the node{_nearest(f'{section}.{key}', known)}"
                           for key in keys)
    return reasons
