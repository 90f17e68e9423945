"""`FrameResult` to the fields of a `CertifiedClassification` message, written once: the node publishes
them (`ros.messages.result_message`, rclpy) and `mixclf-eval bag --write-results` records them (rosbags),
so the two cannot drift. No ROS here."""

from __future__ import annotations

from typing import Any

from mixclf_ros.runtime.frame_result import NORM_CODES, FrameResult


def class_name(class_id: int, class_names: list[str]) -> str:
    """The name of `class_id` ('' when unknown or -1)."""
    return class_names[class_id] if 0 <= class_id < len(class_names) else ""


def result_fields(result: FrameResult, class_names: list[str]) -> dict[str, Any]:
    """Every field of `CertifiedClassification` but `header`, by name: ints for the uint8 / int32 fields
    (status, certificate_method and norm as the message's constants), Python floats for the float32
    ones (radii already float32 values rounded toward zero, [0,1] pixels), a bool for `safe` (decided
    by `runtime.frame_result.is_safe`, copied, never recomputed)."""
    return {
        "status": int(result.status),
        "status_message": result.status_message,
        "class_id": int(result.class_id),
        "class_name": class_name(result.class_id, class_names),
        "probability": float(result.probability),
        "alpha": float(result.alpha),
        "certificate_method": int(result.certificate_method),
        "norm": NORM_CODES[result.norm],
        "certified_radius": float(result.certified_radius),
        "image_radius": float(result.image_radius),
        "confidence": float(result.confidence),
        "safe_radius": float(result.safe_radius),
        "safe_image_radius": float(result.safe_image_radius),
        "safe": bool(result.safe),
        "robust_class_id": int(result.robust_class_id),
        "robust_margin": float(result.robust_margin),
        "standard_class_id": int(result.standard_class_id),
        "inference_ms": float(result.inference_ms),
    }
