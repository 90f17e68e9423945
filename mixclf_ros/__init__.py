"""mixclf_ros: certified mixed classification for ROS 2.

The public API is importable from here, e.g. `from mixclf_ros import MixedClassifier, lipschitz_radius`.
Names resolve lazily (PEP 562), so `import mixclf_ros` imports neither torch nor rclpy.

Layout (imports only run downwards; `ros`, `evaluation` and `demo` are leaves):
    core/        the paper's math: mixing, certify, lipschitz, smoothing, numerics, forward_error (torch only)
    models/      builders, the model config, loading, the zoo
    vision/      decoding and preprocessing, with the preprocessing's operator norm
    runtime/     CertifiedClassifier: frames in, certified results out
    attacks, data, train   shared by evaluation, training and the demo
    evaluation/  the `mixclf-eval` CLI
    ros/         the lifecycle node (rclpy)
    demo/        camera simulator, monitor, the one-command demo
    interrupts   Ctrl-C for the executables (imports nothing of the package)
"""

from __future__ import annotations

import importlib
from pkgutil import extend_path
from typing import Any

# The generated message module `mixclf_ros.msg` lives in the colcon install space. When this
# package is imported from a source checkout, let it find `msg` there too.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "Alpha": "core.mixing",
    "MixedClassifier": "core.mixing",
    "mix_log_probs": "core.mixing",
    "lipschitz_radius": "core.certify",
    "logit_margin_radius": "core.certify",
    "best_lipschitz_radius": "core.certify",
    "smoothing_radius": "core.certify",
    "softmax_lipschitz_factor": "core.certify",
    "float32_toward_zero": "core.certify",
    "ErrorBoundedForward": "core.forward_error",
    "BoundPlan": "core.engine",
    "supported_operations_markdown": "core.engine",
    "freeze_parametrizations": "core.tracing",
    "LipschitzPass": "runtime.lipschitz_pass",
    "full_precision": "core.numerics",
    "UnsupportedLayerError": "core.lipschitz",
    "logit_lipschitz_bound": "core.lipschitz",
    "probability_lipschitz_bound": "core.lipschitz",
    "probability_gradient_norm_search": "core.lipschitz",
    "check_declared_lipschitz": "models.loading",
    "Smooth": "core.smoothing",
    "SmoothingCertificate": "core.smoothing",
    "LoadedModel": "models.loading",
    "ModelConfigError": "models.loading",
    "load_model": "models.loading",
    "zoo_config": "models.loading",
    "BadImageError": "vision.decode",
    "DecodedImage": "vision.decode",
    "decode_compressed": "vision.decode",
    "decode_frame": "vision.decode",
    "decode_image": "vision.decode",
    "PreprocessConfig": "vision.preprocess",
    "Preprocessor": "vision.preprocess",
    "image_radius": "vision.preprocess",
    "preprocessing_operator_norm": "vision.preprocess",
    "preprocessing_float_error": "vision.preprocess",
    "CertifiedClassifier": "runtime.classifier",
    "FrameResult": "runtime.classifier",
    "LiveSettings": "runtime.classifier",
    "Status": "runtime.classifier",
    "is_safe": "runtime.classifier",
    "result_fields": "runtime.result_fields",
    "threshold_reachable": "runtime.reachability",
    "unreachable_warning": "runtime.reachability",
    "ThreadPlan": "runtime.threads",
    "measure_thread_plan": "runtime.threads",
    "pgd": "attacks",
    "load_fashion_mnist": "data",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
