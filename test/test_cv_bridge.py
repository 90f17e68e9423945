"""The fast decoder against cv_bridge, the decoder of most ROS 2 image stacks, for every encoding both
read as 8-bit RGB. Skips where cv_bridge is not importable (it needs a ROS install built with it)."""

from __future__ import annotations

import numpy as np
import pytest

cv_bridge = pytest.importorskip("cv_bridge")

from mixclf_ros.vision.annotate import to_rgb8  # noqa: E402
from mixclf_ros.vision.decode import decode_image  # noqa: E402

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

# encoding -> bytes per pixel; those cv_bridge converts to "rgb8" without a change of bit depth (it
# refuses 8UC3/8UC4 -> rgb8: not a colour format)
SHARED_ENCODINGS = {
    "rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1,
    "yuv422": 2, "yuv422_yuy2": 2,
    "bayer_rggb8": 1, "bayer_bggr8": 1, "bayer_gbrg8": 1, "bayer_grbg8": 1,
}


@pytest.mark.parametrize("encoding", sorted(SHARED_ENCODINGS))
@pytest.mark.parametrize("padding", [0, 4])
def test_decoder_agrees_with_cv_bridge(encoding, padding):
    from sensor_msgs.msg import Image

    rng = np.random.default_rng(0)
    height, width = 6, 8
    row = width * SHARED_ENCODINGS[encoding]
    rows = rng.integers(0, 256, (height, row + padding)).astype(np.uint8)
    message = Image(height=height, width=width, encoding=encoding, step=row + padding, data=rows.tobytes())
    expected = cv_bridge.CvBridge().imgmsg_to_cv2(message, "rgb8")
    decoded = decode_image(encoding, height, width, row + padding, rows.tobytes())
    np.testing.assert_array_equal(to_rgb8(decoded), expected)
