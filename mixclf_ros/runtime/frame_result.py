"""What one frame's classification is: its status, its certificate's method, the live settings it
was made under, and the message contract's `safe` rule (`is_safe`, the only place `safe` is
decided). Radii are in the certificate's norm, pixel intensities scaled to [0, 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class Status(IntEnum):
    """Mirrors the STATUS_* constants of `CertifiedClassification.msg` (checked by a test)."""

    OK = 0
    NOT_READY = 1
    BAD_INPUT = 2
    STALE = 3
    MODEL_ERROR = 4


class CertificateMethod(IntEnum):
    """Mirrors the CERTIFICATE_* constants of `CertifiedClassification.msg`."""

    NONE = 0
    LIPSCHITZ = 1
    RANDOMIZED_SMOOTHING = 2


NORM_CODES = {"l2": 2, "linf": 255}
"""Values of the message's NORM_* constants."""


ONE_GREY_LEVEL = 1.0 / 255.0
"""One step of an 8-bit camera, in [0, 1] pixel units: the smallest perturbation a camera can show."""


def _meets(radius: float, threshold: float) -> bool:
    """`radius >= threshold` for a threshold in force (> 0); a threshold of 0 is not set."""
    return threshold <= 0.0 or (math.isfinite(radius) and radius >= threshold)


def is_safe(
    status: Status,
    certificate_method: CertificateMethod,
    certified_radius: float,
    safe_radius: float,
    class_id: int,
    certified_class_id: int,
    image_radius: float = 0.0,
    safe_image_radius: float = 0.0,
) -> bool:
    """The message contract's `safe` rule, in one place.

    True only if the frame was classified (OK), a certificate exists, its radius is positive, every
    threshold that is set (> 0) is met: `certified_radius >= safe_radius` (model input) and
    `image_radius >= safe_image_radius` (source image; an image radius of 0, i.e. no image-space
    guarantee, never meets a set threshold), and the published class is the certified one (Lemma 1:
    a positive radius implies the mixture predicts the robust model's class; any numerical
    disagreement is doubt). A NaN threshold is never met.
    """
    if math.isnan(safe_radius) or math.isnan(safe_image_radius):
        return False
    return bool(
        status == Status.OK
        and certificate_method != CertificateMethod.NONE
        and math.isfinite(certified_radius)
        and certified_radius > 0.0
        and _meets(certified_radius, safe_radius)
        and _meets(image_radius, safe_image_radius)
        and class_id >= 0
        and class_id == certified_class_id
    )


@dataclass(frozen=True)
class LiveSettings:
    """Settings that may change between frames (ROS parameters changed live). Swapped atomically.
    The defaults are the node's parameter defaults (`ros.parameters`, `mixclf-eval bag`)."""

    alpha: float = 0.6
    safe_radius: float = ONE_GREY_LEVEL
    """`safe` needs certified_radius >= this, at the model input ([0,1] pixels, certificate norm)."""
    confidence: float = 0.999
    """Only for randomized smoothing: the certificate holds with this probability (1 - beta)."""
    safe_image_radius: float = ONE_GREY_LEVEL
    """`safe` needs image_radius >= this, in the source image ([0,1] pixels, certificate norm);
    0 = no image-space threshold."""


@dataclass
class FrameResult:
    """Everything the node publishes for one frame, except the header and class name."""

    status: Status
    status_message: str = ""
    class_id: int = -1
    probability: float = 0.0
    alpha: float = 0.0
    certificate_method: CertificateMethod = CertificateMethod.NONE
    norm: str = "l2"
    certified_radius: float = 0.0
    image_radius: float = 0.0
    confidence: float = 0.0
    safe_radius: float = 0.0
    safe_image_radius: float = 0.0
    safe: bool = False
    robust_class_id: int = -1
    robust_margin: float = 0.0
    standard_class_id: int = -1
    inference_ms: float = 0.0

    @classmethod
    def failure(cls, status: Status, message: str, settings: LiveSettings, norm: str = "l2") -> FrameResult:
        """A result for a frame that could not be certified: `safe` is false by construction."""
        return cls(status=status, status_message=message, alpha=settings.alpha,
                   safe_radius=settings.safe_radius, safe_image_radius=settings.safe_image_radius, norm=norm)
