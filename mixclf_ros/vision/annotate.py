"""The debug image: a camera frame with its certified classification drawn on it (OpenCV), for
rqt_image_view and rviz.

`to_rgb8` turns any `DecodedImage` into an 8-bit RGB picture; `annotate` draws, on a copy, a dark
band with the class, the mixed probability and the certified radius, and a badge that is green
when the result is safe and red when it is not.
"""

from __future__ import annotations

import cv2
import numpy as np

from mixclf_ros.vision.decode import RGB_INDEX, DecodedImage

__all__ = ["SAFE_GREEN", "UNSAFE_RED", "annotate", "to_rgb8"]

SAFE_GREEN = (0, 200, 0)
UNSAFE_RED = (220, 0, 0)
MIN_WIDTH = 320
"""Narrower frames are enlarged (nearest neighbour) to this width so that the text stays readable."""


def to_rgb8(image: DecodedImage) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame: samples times `scale`, clipped to [0, 1], times 255;
    mono replicated into three channels, alpha dropped."""
    pixels = image.pixels
    if image.channel_order == "mono":
        pixels = pixels[:, :, [0, 0, 0]]
    else:
        pixels = pixels[:, :, list(RGB_INDEX[image.channel_order])]
    if pixels.dtype == np.uint8:
        return np.ascontiguousarray(pixels)
    values = np.clip(pixels.astype(np.float32) * np.float32(image.scale), 0.0, 1.0)
    return np.rint(values * 255.0).astype(np.uint8)


def annotate(rgb: np.ndarray, label: str, probability: float, radius: float, safe: bool, norm: str = "l2",
             detail: str = "") -> np.ndarray:
    """A copy of `rgb` ((H, W, 3) uint8) with the result drawn on it.

    Args:
        label: the class (name or id) to show, e.g. "Trouser".
        probability: the mixed probability of that class, in [0, 1].
        radius: the certified radius at the model input, in `norm` ("l2" or "linf").
        safe: the result's `safe` flag: a green SAFE badge when true, a red UNSAFE one otherwise.
        detail: an optional second line (e.g. a status such as "BAD_INPUT: ...").
    Returns:
        (H', W', 3) uint8 RGB, H' x W' = H x W, or enlarged to `MIN_WIDTH` pixels wide.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"annotate takes (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    factor = max(1, -(-MIN_WIDTH // width))
    canvas = np.ascontiguousarray(np.kron(rgb, np.ones((factor, factor, 1), np.uint8)) if factor > 1 else rgb.copy())
    height, width = canvas.shape[:2]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, width / 900.0
    thickness = max(1, round(2 * scale))
    line_height = int(30 * scale) + 6
    lines = [f"{label}  p={probability:.2f}", f"radius {radius:.3f} ({norm})"] + ([detail] if detail else [])
    band = min(height, line_height * len(lines) + 6)
    canvas[:band] = (canvas[:band].astype(np.uint16) * 3 // 10).astype(np.uint8)  # darken, keep the scene visible
    for index, text in enumerate(lines):
        cv2.putText(canvas, text, (6, line_height * (index + 1)), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    badge_text = "SAFE" if safe else "UNSAFE"
    (text_width, text_height), _ = cv2.getTextSize(badge_text, font, scale, thickness)
    right, bottom = width - 6, min(height - 1, 6 + text_height + 12)
    left = max(0, right - text_width - 12)
    cv2.rectangle(canvas, (left, 6), (right, bottom), SAFE_GREEN if safe else UNSAFE_RED, thickness=cv2.FILLED)
    cv2.putText(canvas, badge_text, (left + 6, bottom - 6), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return canvas
