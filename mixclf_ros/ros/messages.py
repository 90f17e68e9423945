"""Between ROS messages and the library: image messages to decoded frames, the stamp check, and
`FrameResult` to `CertifiedClassification`."""

from __future__ import annotations

from sensor_msgs.msg import CompressedImage, Image

from mixclf_ros.msg import CertifiedClassification
from mixclf_ros.runtime.frame_result import FrameResult
from mixclf_ros.runtime.result_fields import result_fields
from mixclf_ros.vision.decode import DecodedImage, decode_frame

TRANSPORTS = {"raw": ("", Image), "compressed": ("/compressed", CompressedImage)}
"""image_transport name -> (topic suffix, message type), image_transport's topic convention."""


def camera_topics(topics: list[str], transport: str) -> list[tuple[str, type]]:
    """(topic, message type) of each camera's one subscription; ValueError for an unknown transport."""
    if transport not in TRANSPORTS:
        raise ValueError(f"image_transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    suffix, message_type = TRANSPORTS[transport]
    return [(f"{topic}{suffix}", message_type) for topic in topics if topic]


def decode_message(message: Image | CompressedImage, input_kind: str = "intensity") -> DecodedImage:
    """Raises `BadImageError` for a message that is not a usable image for a model taking `input_kind`."""
    return decode_frame(message, isinstance(message, CompressedImage), input_kind)


def stamp_ns(header) -> int:
    return header.stamp.sec * 10**9 + header.stamp.nanosec


def stale_reason(header, now_ns: int, max_image_age: float) -> str:
    """Why a frame is too old to classify ('' if it is not); `max_image_age` in seconds, 0 = no check."""
    if max_image_age <= 0:
        return ""
    if header.stamp.sec == 0 and header.stamp.nanosec == 0:
        return "image has no stamp (0), its age is unknown"
    age = (now_ns - stamp_ns(header)) * 1e-9
    if abs(age) > max_image_age:
        return f"image age {age:.3f} s exceeds max_image_age {max_image_age:.3f} s"
    return ""


def result_message(header, result: FrameResult, class_names: list[str]) -> CertifiedClassification:
    """The published message: the frame's header (never restamped) and every result field
    (`runtime.result_fields`, also what `mixclf-eval bag --write-results` records)."""
    return CertifiedClassification(header=header, **result_fields(result, class_names))
