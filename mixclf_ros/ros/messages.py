"""Between ROS messages and the library: image messages to decoded frames, the stamp check, and
`FrameResult` to `CertifiedClassification`."""

from __future__ import annotations

from sensor_msgs.msg import CompressedImage, Image

from mixclf_ros.msg import CertifiedClassification
from mixclf_ros.runtime.classifier import NORM_CODES, FrameResult
from mixclf_ros.vision.decode import BadImageError, DecodedImage, decode_compressed, decode_image

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
    if isinstance(message, CompressedImage):
        if input_kind == "depth":
            raise BadImageError("compressed images are not supported for a depth model (input_kind 'depth'): "
                                "use the raw transport")
        return decode_compressed(message.format, message.data)
    return decode_image(message.encoding, message.height, message.width, message.step,
                        message.data, bool(message.is_bigendian), input_kind=input_kind)


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
    """The published message: the frame's header (never restamped) and every result field."""
    message = CertifiedClassification()
    message.header = header
    message.status = int(result.status)
    message.status_message = result.status_message
    message.class_id = result.class_id
    message.class_name = class_names[result.class_id] if 0 <= result.class_id < len(class_names) else ""
    message.probability = result.probability
    message.alpha = result.alpha
    message.certificate_method = int(result.certificate_method)
    message.norm = NORM_CODES[result.norm]
    message.certified_radius = result.certified_radius
    message.image_radius = result.image_radius
    message.confidence = result.confidence
    message.safe_radius = result.safe_radius
    message.safe_image_radius = result.safe_image_radius
    message.safe = result.safe
    message.robust_class_id = result.robust_class_id
    message.robust_margin = result.robust_margin
    message.standard_class_id = result.standard_class_id
    message.inference_ms = result.inference_ms
    return message
