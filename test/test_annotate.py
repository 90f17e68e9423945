"""The debug image: the frame with class, probability, radius and a green/red safe badge drawn on it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mixclf_ros.vision.annotate import SAFE_GREEN, UNSAFE_RED, annotate, to_rgb8
from mixclf_ros.vision.decode import decode_image


def badge_colour(picture: np.ndarray) -> tuple[int, int, int]:
    """The most common saturated colour in the top-right corner (the badge)."""
    corner = picture[: picture.shape[0] // 8, -picture.shape[1] // 6:].reshape(-1, 3)
    saturated = corner[(corner.max(axis=1).astype(int) - corner.min(axis=1)) > 100]
    values, counts = np.unique(saturated, axis=0, return_counts=True)
    return tuple(int(v) for v in values[counts.argmax()])


@pytest.mark.parametrize("safe, colour", [(True, SAFE_GREEN), (False, UNSAFE_RED)])
def test_badge_is_green_when_safe_and_red_when_not(safe, colour):
    frame = np.full((480, 640, 3), 90, np.uint8)
    out = annotate(frame, "Trouser", 0.93, 0.42, safe)
    assert badge_colour(out) == colour
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert (frame == 90).all()  # drawn on a copy


def test_text_is_drawn_in_a_band_and_the_scene_below_is_untouched():
    frame = np.full((480, 640, 3), 90, np.uint8)
    plain = annotate(frame, "Trouser", 0.93, 0.42, True)
    other = annotate(frame, "Sandal", 0.51, 0.07, True)
    band = slice(0, 60)
    assert (plain[band] != other[band]).any()  # the text says what the result is
    assert (plain[200:] == 90).all() and (other[200:] == 90).all()
    white = (plain[band] == 255).all(axis=2).sum()
    assert white > 200  # white text on the darkened band


def test_a_detail_line_adds_text():
    frame = np.zeros((480, 640, 3), np.uint8)
    without = annotate(frame, "-", 0.0, 0.0, False)
    with_detail = annotate(frame, "-", 0.0, 0.0, False, detail="BAD_INPUT: unsupported encoding")
    assert ((with_detail == 255).all(axis=2).sum()) > ((without == 255).all(axis=2).sum())


def test_small_frames_are_enlarged_to_stay_readable():
    frame = np.zeros((28, 28, 3), np.uint8)
    frame[10:20, 10:20] = 200
    out = annotate(frame, "Bag", 0.7, 0.1, True)
    assert out.shape == (28 * 12, 28 * 12, 3)
    assert (out[-12 * 8 - 1, 12 * 10] == 200).all()  # nearest-neighbour enlargement of the scene


def test_refuses_anything_but_rgb8():
    with pytest.raises(ValueError, match="uint8 RGB"):
        annotate(np.zeros((4, 4), np.uint8), "x", 0.5, 0.1, True)


@pytest.mark.parametrize("encoding, pixel, expected", [
    ("bgr8", [0, 0, 255], [255, 0, 0]),
    ("rgba8", [255, 0, 0, 7], [255, 0, 0]),
    ("mono8", [128], [128, 128, 128]),
    ("mono16", [65535], [255, 255, 255]),
    ("bgra16", [0, 32768, 0, 1], [0, 128, 0]),
])
def test_to_rgb8_reads_every_channel_order_and_depth(encoding, pixel, expected):
    from mixclf_ros.vision.decode import ENCODINGS

    dtype = ENCODINGS[encoding][0]
    data = np.array([pixel * 4], dtype).tobytes()
    decoded = decode_image(encoding, 2, 2, len(data) // 2, data)
    np.testing.assert_array_equal(to_rgb8(decoded), np.broadcast_to(expected, (2, 2, 3)))


def test_to_rgb8_of_a_converted_camera_frame():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:] = (200, 30, 30)
    packed = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YUY2)
    decoded = decode_image("yuv422_yuy2", 4, 4, 8, packed.tobytes())
    assert np.abs(to_rgb8(decoded).astype(int) - rgb).max() <= 3
