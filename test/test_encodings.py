"""Camera encodings converted with OpenCV (YUV 4:2:2, NV21, NV24, Bayer), depth refusal, and what the
conversions mean for the image-space radius."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from mixclf_ros.vision.decode import (
    CONVERTED_ENCODINGS,
    DEPTH_ENCODINGS,
    ENCODINGS,
    BadImageError,
    DecodedImage,
    decode_image,
)

PAD = 0xA5
BAYER_CODES = {"rggb": cv2.COLOR_BayerBG2RGB, "bggr": cv2.COLOR_BayerRG2RGB,
               "gbrg": cv2.COLOR_BayerGR2RGB, "grbg": cv2.COLOR_BayerGB2RGB}


def padded(rows: np.ndarray, padding: int) -> tuple[bytes, int]:
    """Byte rows (R, B) -> bytes with `padding` filler bytes after each row, and the step."""
    rows = rows.reshape(rows.shape[0], -1).view(np.uint8)
    out = np.full((rows.shape[0], rows.shape[1] + padding), PAD, np.uint8)
    out[:, : rows.shape[1]] = rows
    return out.tobytes(), out.shape[1]


def blocky_rgb(height: int, width: int) -> np.ndarray:
    """A colour image constant over 2x2 blocks, so 4:2:0 and 4:2:2 sub-sampling lose only rounding."""
    y, x = np.mgrid[0: height // 2, 0: width // 2]
    half = np.stack([40 + 300 * x / width, 60 + 240 * y / height, 200 - 240 * x / width], axis=2)
    return half.repeat(2, axis=0).repeat(2, axis=1).astype(np.uint8)


# ------------------------------------------------------------------------------ against OpenCV
@pytest.mark.parametrize("encoding, code", [("yuv422", cv2.COLOR_YUV2RGB_UYVY),
                                            ("yuv422_yuy2", cv2.COLOR_YUV2RGB_YUY2)])
@pytest.mark.parametrize("padding", [0, 6])
def test_packed_yuv422_matches_opencv(encoding, code, padding):
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (6, 8, 2)).astype(np.uint8)
    data, step = padded(packed, padding)
    decoded = decode_image(encoding, 6, 8, step, data)
    assert decoded.channel_order == "rgb" and decoded.scale == 1 / 255
    assert decoded.linear_in_message is False
    np.testing.assert_array_equal(decoded.pixels, cv2.cvtColor(packed, code))


@pytest.mark.parametrize("padding", [0, 3])
def test_nv21_matches_opencv(padding):
    rng = np.random.default_rng(1)
    planes = rng.integers(0, 256, (9, 8)).astype(np.uint8)  # 6 Y rows, 3 interleaved V U rows
    data, step = padded(planes, padding)
    decoded = decode_image("nv21", 6, 8, step, data)
    np.testing.assert_array_equal(decoded.pixels, cv2.cvtColor(planes, cv2.COLOR_YUV2RGB_NV21))
    assert decoded.linear_in_message is False


@pytest.mark.parametrize("padding", [0, 5])
def test_nv24_matches_opencv_nv21_on_the_same_samples(padding):
    """A 4:4:4 frame whose chroma is constant over 2x2 blocks is the 4:2:0 frame OpenCV converts."""
    rng = np.random.default_rng(2)
    height, width = 6, 8
    luma = rng.integers(0, 256, (height, width)).astype(np.uint8)
    u, v = (rng.integers(0, 256, (height // 2, width // 2)).astype(np.uint8) for _ in range(2))
    full = lambda plane: plane.repeat(2, axis=0).repeat(2, axis=1)  # noqa: E731
    uv = np.stack([full(u), full(v)], axis=2).reshape(height, 2 * width)
    y_bytes, step = padded(luma, padding)
    uv_rows = np.full((height, 2 * step), PAD, np.uint8)
    uv_rows[:, : 2 * width] = uv
    decoded = decode_image("nv24", height, width, step, y_bytes + uv_rows.tobytes())
    vu = np.stack([v, u], axis=2).reshape(height // 2, width)
    reference = cv2.cvtColor(np.concatenate([luma, vu]), cv2.COLOR_YUV2RGB_NV21)
    np.testing.assert_array_equal(decoded.pixels, reference)
    assert decoded.linear_in_message is False


@pytest.mark.parametrize("pattern", sorted(BAYER_CODES))
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("big_endian", [False, True])
def test_bayer_matches_opencv(pattern, bits, big_endian):
    rng = np.random.default_rng(3)
    dtype = np.dtype(np.uint8 if bits == 8 else np.uint16)
    mosaic = rng.integers(0, np.iinfo(dtype).max + 1, (6, 7)).astype(dtype)
    stored = mosaic.astype(dtype.newbyteorder(">" if big_endian else "<"))
    data, step = padded(stored, 4)
    decoded = decode_image(f"bayer_{pattern}{bits}", 6, 7, step, data, is_bigendian=big_endian)
    np.testing.assert_array_equal(decoded.pixels, cv2.cvtColor(mosaic, BAYER_CODES[pattern]))
    assert decoded.pixels.dtype == dtype and decoded.scale == {8: 1 / 255, 16: 1 / 65535}[bits]
    assert decoded.linear_in_message is False


# ------------------------------------------------------------------------------ colour meaning
@pytest.mark.parametrize("pattern", sorted(BAYER_CODES))
def test_bayer_pattern_names_put_red_where_ros_says(pattern):
    """Mosaic a flat colour by the ROS pattern name (top-left 2x2 block, row by row): it decodes to that colour."""
    colour = {"r": 200, "g": 100, "b": 30}
    cells = np.array([[colour[pattern[0]], colour[pattern[1]]], [colour[pattern[2]], colour[pattern[3]]]], np.uint8)
    mosaic = np.tile(cells, (4, 4))
    decoded = decode_image(f"bayer_{pattern}8", 8, 8, 8, mosaic.tobytes())
    np.testing.assert_array_equal(decoded.pixels[2:6, 2:6], np.broadcast_to([200, 100, 30], (4, 4, 3)))


@pytest.mark.parametrize("encoding, code", [("yuv422", cv2.COLOR_RGB2YUV_UYVY),
                                            ("yuv422_yuy2", cv2.COLOR_RGB2YUV_YUY2)])
def test_yuv422_round_trips_colour(encoding, code):
    rgb = blocky_rgb(8, 16)
    packed = cv2.cvtColor(rgb, code)
    decoded = decode_image(encoding, 8, 16, 32, packed.tobytes())
    assert np.abs(decoded.pixels.astype(int) - rgb).max() <= 3  # no channel swap (a swap is off by > 100)


def test_nv21_and_nv24_round_trip_colour():
    rgb = blocky_rgb(8, 16)
    planes = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YV12)  # Y, then V plane, then U plane (4:2:0)
    luma = planes[:8]
    v, u = planes[8:10].reshape(4, 8), planes[10:12].reshape(4, 8)
    nv21 = np.concatenate([luma, np.stack([v, u], axis=2).reshape(4, 16)])
    decoded = decode_image("nv21", 8, 16, 16, nv21.tobytes())
    assert np.abs(decoded.pixels.astype(int) - rgb).max() <= 3
    full = lambda plane: plane.repeat(2, axis=0).repeat(2, axis=1)  # noqa: E731
    uv = np.stack([full(u), full(v)], axis=2).reshape(8, 32)
    decoded = decode_image("nv24", 8, 16, 16, luma.tobytes() + uv.tobytes())
    assert np.abs(decoded.pixels.astype(int) - rgb).max() <= 3


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("args, reason", [
    (("yuv422", 2, 3, 6, bytes(12)), "even width"),
    (("nv21", 3, 4, 4, bytes(18)), "even width and height"),
    (("yuv422_yuy2", 2, 4, 6, bytes(12)), "shorter than a row"),
    (("yuv422", 2, 4, 8, bytes(15)), "step \\* height = 8 \\* 2 = 16"),
    (("nv21", 2, 4, 4, bytes(8)), "step \\* height \\* 3 / 2 = 4 \\* 2 \\* 3 / 2 = 12"),
    (("nv24", 2, 4, 4, bytes(16)), "step \\* height \\* 3 = 4 \\* 2 \\* 3 = 24"),
    (("bayer_rggb16", 2, 4, 6, bytes(12)), "shorter than a row"),
    (("bayer_rggb32", 2, 2, 2, bytes(4)), "unsupported encoding"),
])
def test_bad_converted_frames_raise_with_reason(args, reason):
    with pytest.raises(BadImageError, match=reason):
        decode_image(*args)


@pytest.mark.parametrize("encoding", sorted(DEPTH_ENCODINGS))
def test_depth_is_refused_for_an_intensity_model_and_taken_by_a_depth_model(encoding):
    dtype = DEPTH_ENCODINGS[encoding][0]
    data = np.ones((2, 3), dtype).tobytes()
    with pytest.raises(BadImageError, match="depth image \\(REP-118\\)"):
        decode_image(encoding, 2, 3, 3 * dtype.itemsize, data)
    decoded = decode_image(encoding, 2, 3, 3 * dtype.itemsize, data, input_kind="depth")
    assert decoded.channel_order == "mono" and decoded.linear_in_message


@pytest.mark.parametrize("encoding", ["rgb8", "mono16", "yuv422"])
def test_a_depth_model_refuses_intensity_images(encoding):
    with pytest.raises(BadImageError, match="not a depth encoding"):
        decode_image(encoding, 2, 2, 8, bytes(16), input_kind="depth")


def test_unknown_input_kind_is_a_configuration_error():
    with pytest.raises(ValueError, match="input_kind"):
        decode_image("mono8", 1, 1, 1, b"\x00", input_kind="thermal")


def test_encoding_tables_are_disjoint():
    assert not set(ENCODINGS) & set(DEPTH_ENCODINGS)
    assert not set(ENCODINGS) & set(CONVERTED_ENCODINGS)
    assert not set(DEPTH_ENCODINGS) & set(CONVERTED_ENCODINGS)


# ------------------------------------------------------------------------------ image radius
@pytest.fixture(scope="module")
def classifier():
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.classifier import CertifiedClassifier
    from mixclf_ros.vision.preprocess import PreprocessConfig

    standard, robust = load_model(zoo_config("standard")), load_model(zoo_config("robust_lipschitz"))
    config = PreprocessConfig(output_channels=1, output_height=28, output_width=28)
    return CertifiedClassifier(standard, robust, config, torch.device("cpu"))


def test_converted_frames_claim_no_image_radius(classifier):
    """The model-input certificate stands; only the radius in the transmitted image is withheld."""
    from mixclf_ros.runtime.classifier import LiveSettings, Status

    rgb = np.zeros((56, 56, 3), np.uint8)
    rgb[14:42, 20:36] = 220  # a bright trouser-like bar: a confident, certified class
    packed = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_YUY2)
    converted = decode_image("yuv422_yuy2", 56, 56, 112, packed.tobytes())
    viewed = decode_image("rgb8", 56, 56, 168, converted.pixels.tobytes())
    assert isinstance(viewed, DecodedImage) and viewed.linear_in_message
    from_view, from_yuv = classifier.classify([viewed, converted], LiveSettings(alpha=0.9, safe_radius=0.0))
    assert from_view.status == from_yuv.status == Status.OK
    assert from_yuv.certified_radius == pytest.approx(from_view.certified_radius) and from_yuv.certified_radius > 0
    assert from_view.image_radius > 0
    assert from_yuv.image_radius == 0.0
