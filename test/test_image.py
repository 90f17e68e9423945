"""mixclf_ros.image: decoding of sensor_msgs-like buffers, preprocessing, and the preprocessing's norm.

No ROS needed: the decoders take plain fields. Dense-matrix checks build the whole preprocessing map
two ways (by running `Preprocessor` on basis images, and from first principles in numpy) and compare
both with `preprocessing_operator_norm`.
"""

from __future__ import annotations

import array
import ast
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixclf_ros.demo.render import ARTICLE_SCALE, embed_article
from mixclf_ros.vision import decode as decode_module
from mixclf_ros.vision import preprocess as preprocess_module
from mixclf_ros.vision.decode import ENCODINGS, BadImageError, DecodedImage, decode_compressed, decode_image
from mixclf_ros.vision.preprocess import (
    GREY_WEIGHTS,
    PreprocessConfig,
    Preprocessor,
    colour_matrix,
    image_radius,
    preprocessing_operator_norm,
)

PAD_BYTE = 0xAB


def serialise(reference: np.ndarray, padding: int, big_endian: bool = False) -> tuple[bytes, int]:
    """(H, W, C) samples -> sensor_msgs/Image bytes with `padding` filler bytes after every row."""
    height = reference.shape[0]
    dtype = reference.dtype.newbyteorder(">" if big_endian else "<") if reference.dtype.itemsize > 1 \
        else reference.dtype
    rows = reference.astype(dtype).reshape(height, -1).view(np.uint8)
    padded = np.full((height, rows.shape[1] + padding), PAD_BYTE, np.uint8)
    padded[:, : rows.shape[1]] = rows
    return padded.tobytes(), padded.shape[1]


def reference_pixels(encoding: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    dtype, channels, _ = ENCODINGS[encoding]
    if dtype.kind == "f":
        return rng.uniform(-0.5, 1.5, (height, width, channels)).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max + 1, (height, width, channels)).astype(dtype)


# ------------------------------------------------------------------------------ decode_image
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("padding", [0, 5])
def test_round_trip_every_encoding(encoding, big_endian, padding):
    rng = np.random.default_rng(0)
    reference = reference_pixels(encoding, 5, 7, rng)
    data, step = serialise(reference, padding, big_endian)
    decoded = decode_image(encoding, 5, 7, step, data, is_bigendian=big_endian)
    dtype, channels, order = ENCODINGS[encoding]
    assert decoded.pixels.shape == (5, 7, channels)
    np.testing.assert_array_equal(decoded.pixels, reference)
    assert decoded.channel_order == order
    assert decoded.scale == {1: 1 / 255, 2: 1 / 65535, 4: 1.0}[dtype.itemsize]
    assert np.shares_memory(decoded.pixels, np.frombuffer(data, np.uint8))


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_channel_semantics_through_preprocessing(encoding):
    """rgb/bgr/alpha/mono meaning end to end: 3-channel output is (red, green, blue) in [0, 1]."""
    rng = np.random.default_rng(1)
    reference = reference_pixels(encoding, 4, 6, rng)
    data, step = serialise(reference, 3)
    decoded = decode_image(encoding, 4, 6, step, data)
    out = Preprocessor(PreprocessConfig(output_channels=3, output_height=4, output_width=6))([decoded])
    values = np.clip(reference.astype(np.float64) * decoded.scale, 0, 1)
    order = decoded.channel_order
    expected = {"mono": [0, 0, 0], "rgb": [0, 1, 2], "rgba": [0, 1, 2], "bgr": [2, 1, 0], "bgra": [2, 1, 0]}[order]
    np.testing.assert_allclose(out[0].numpy(), values[:, :, expected].transpose(2, 0, 1), atol=1e-6)
    grey = Preprocessor(PreprocessConfig(output_channels=1, output_height=4, output_width=6))([decoded])
    rgb = values[:, :, expected]
    expected_grey = rgb[:, :, 0] if order == "mono" else rgb @ np.array(GREY_WEIGHTS)
    np.testing.assert_allclose(grey[0, 0].numpy(), expected_grey, atol=1e-6)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "array", "memoryview", "ndarray", "ndarray_u16"])
def test_zero_copy_view_honours_step(kind):
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 200, (6, 5, 3)).astype(np.uint8)
    raw, step = serialise(reference, 9)  # 9 filler bytes after each 15-byte row
    source = {
        "bytes": lambda: raw,
        "bytearray": lambda: bytearray(raw),
        "array": lambda: array.array("B", raw),
        "memoryview": lambda: memoryview(bytearray(raw)),
        "ndarray": lambda: np.frombuffer(raw, np.uint8).copy(),
        "ndarray_u16": lambda: np.frombuffer(raw, np.uint16).copy(),
    }[kind]()
    decoded = decode_image("rgb8", 6, 5, step, source)
    np.testing.assert_array_equal(decoded.pixels, reference)
    assert decoded.pixels.strides == (step, 3, 1)
    assert np.shares_memory(decoded.pixels, np.frombuffer(source, np.uint8))
    if kind in ("bytearray", "array", "ndarray"):  # writable sources: the view sees writes
        np.frombuffer(source, np.uint8)[0] = 255 - reference[0, 0, 0]
        assert decoded.pixels[0, 0, 0] == 255 - reference[0, 0, 0]


def test_odd_step_not_multiple_of_sample_size():
    reference = np.arange(2 * 3, dtype=np.uint16).reshape(2, 3, 1) * 1000
    data, step = serialise(reference, 1)  # 7-byte rows of 2-byte samples
    decoded = decode_image("mono16", 2, 3, step, data)
    np.testing.assert_array_equal(decoded.pixels, reference)


@pytest.mark.parametrize(("args", "kwargs", "reason"), [
    (("64FC1", 4, 4, 32, bytes(128)), {}, "unsupported encoding '64FC1'"),
    (("RGB8", 4, 4, 12, bytes(48)), {}, "unsupported encoding"),
    ((None, 4, 4, 12, bytes(48)), {}, "unsupported encoding"),
    (("rgb8", 4, 4, 11, bytes(44)), {}, "step 11 bytes is shorter than a row"),
    (("mono16", 4, 4, 7, bytes(28)), {}, "shorter than a row"),
    (("rgb8", 4, 4, 12, bytes(47)), {}, r"data has 47 bytes, but step \* height = 12 \* 4 = 48"),
    (("rgb8", 4, 4, 12, bytes(49)), {}, "data has 49 bytes"),
    (("rgb8", 0, 0, 0, b""), {}, "zero-sized image"),
    (("mono8", 3, 0, 0, b""), {}, "zero-sized image"),
    (("mono8", -1, 3, 3, b""), {}, "zero-sized image"),
    (("mono8", 9000, 1, 1, bytes(9000)), {}, "larger than the 8192 pixels"),
    (("mono8", 2, 2, 2, "abcd"), {}, "bytes-like"),
    (("mono8", 2, 2, 2, [1, 2, 3, 4]), {}, "bytes-like"),
    (("mono8", 2, 2, 2, np.zeros((2, 4), np.uint8)[:, ::2]), {}, "bytes-like"),
    (("mono8", 2, 2, 2, np.array([object()] * 4)), {}, "objects"),
    (("mono8", 2.0, 2, 2, bytes(4)), {}, "height must be an integer"),
    (("32FC1", 1, 2, 8, np.array([0.5, np.nan], np.float32).tobytes()), {"input_kind": "depth"}, "NaN or infinite"),
    (("32FC1", 1, 2, 8, np.array([np.inf, 0.5], ">f4").tobytes()), {"is_bigendian": True, "input_kind": "depth"},
     "NaN or infinite"),
])
def test_bad_raw_images_raise_with_reason(args, kwargs, reason):
    with pytest.raises(BadImageError, match=reason):
        decode_image(*args, **kwargs)


def test_big_endian_scale_and_float_clamp():
    data = np.array([[0, 65535, 32768]], ">u2").tobytes()
    decoded = decode_image("mono16", 1, 3, 6, data, is_bigendian=True)
    out = Preprocessor(PreprocessConfig(output_height=1, output_width=3))([decoded])
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0.0, 1.0, 32768 / 65535], atol=1e-7)
    floats = np.array([[-1.0, 0.25, 7.0]], np.float32)
    decoded = decode_image("32FC1", 1, 3, 12, floats.tobytes(), input_kind="depth")
    out = Preprocessor(PreprocessConfig(output_height=1, output_width=3))([decoded])
    np.testing.assert_allclose(out[0, 0, 0].numpy(), [0.0, 0.25, 1.0])


# ------------------------------------------------------------------------------ decode_compressed
def test_compressed_round_trips_in_rgb_order():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (9, 11, 3)).astype(np.uint8)
    png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()  # OpenCV writes BGR
    decoded = decode_compressed("png", array.array("B", png))
    assert decoded.channel_order == "rgb" and decoded.scale == 1 / 255
    np.testing.assert_array_equal(decoded.pixels, rgb)

    rgba = rng.integers(0, 256, (4, 5, 4)).astype(np.uint8)
    bgra = np.ascontiguousarray(rgba[:, :, [2, 1, 0, 3]])
    decoded = decode_compressed("rgba8; png compressed bgra8", cv2.imencode(".png", bgra)[1].tobytes())
    assert decoded.channel_order == "rgba"
    np.testing.assert_array_equal(decoded.pixels, rgba)

    grey16 = rng.integers(0, 65536, (6, 3)).astype(np.uint16)
    decoded = decode_compressed("16UC1; png compressed", cv2.imencode(".png", grey16)[1].tobytes())
    assert decoded.channel_order == "mono" and decoded.scale == 1 / 65535
    np.testing.assert_array_equal(decoded.pixels[:, :, 0], grey16)

    red = np.zeros((16, 16, 3), np.uint8)
    red[:, :, 2] = 255  # BGR red
    decoded = decode_compressed("jpeg", cv2.imencode(".jpg", red)[1].tobytes())
    out = Preprocessor(PreprocessConfig(output_channels=3, output_height=2, output_width=2))([decoded])
    assert out[0, 0].min() > 0.95 and out[0, 1:].max() < 0.05


def _huge_png() -> bytes:
    data = bytearray(cv2.imencode(".png", np.zeros((2, 2), np.uint8))[1].tobytes())
    data[16:20] = (100_000).to_bytes(4, "big")  # IHDR width
    return bytes(data)


def _huge_jpeg() -> bytes:
    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 7] = (60_000).to_bytes(2, "big")  # frame height
    return bytes(data)


@pytest.mark.parametrize(("fmt", "data", "reason"), [
    ("png", b"", "has no data"),
    ("png", b"this is not an image at all", "could not decode"),
    ("jpeg", bytes(range(256)) * 4, "could not decode"),
    ("png", cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()[:30], "could not decode"),
    ("16UC1; compressedDepth png", b"\x00" * 12 + b"\x89PNG", "compressedDepth"),
    ("png", _huge_png(), "larger than the 8192 pixels"),
    ("jpeg", _huge_jpeg(), "larger than the 8192 pixels"),
    ("png", "not bytes", "bytes-like"),
])
def test_bad_compressed_images_raise_with_reason(fmt, data, reason):
    with pytest.raises(BadImageError, match=reason):
        decode_compressed(fmt, data)


# ------------------------------------------------------------------------------ Preprocessor
def test_crop_larger_than_image_and_bad_configs():
    decoded = decode_image("mono8", 10, 12, 12, bytes(120))
    with pytest.raises(BadImageError, match="crop 11x5 is larger than the image 10x12"):
        Preprocessor(PreprocessConfig(crop_height=11, crop_width=5))([decoded])
    with pytest.raises(BadImageError, match="crop"):
        preprocessing_operator_norm(10, 12, "mono", PreprocessConfig(crop_height=4, crop_width=13), "l2")
    for bad in ({"resize": "nearest"}, {"output_channels": 2}, {"output_height": 0}, {"crop_width": -1},
                {"output_width": 2.5}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)
    with pytest.raises(ValueError, match="norm"):
        preprocessing_operator_norm(10, 12, "mono", PreprocessConfig(), "l1")
    with pytest.raises(BadImageError, match="channel order"):
        DecodedImage(np.zeros((2, 2, 3), np.uint8), "mono", 1 / 255)
    with pytest.raises(BadImageError, match="channel order"):
        DecodedImage(np.zeros((2, 2, 3), np.uint8), "yuv", 1 / 255)
    with pytest.raises(BadImageError, match="scale"):
        DecodedImage(np.zeros((2, 2, 1), np.uint8), "mono", float("nan"))
    with pytest.raises(BadImageError, match="sample type"):
        Preprocessor(PreprocessConfig())([DecodedImage(np.zeros((2, 2, 1), np.int64), "mono", 1.0)])


def test_batches_of_mixed_and_equal_sizes():
    rng = np.random.default_rng(4)
    config = PreprocessConfig(output_channels=3, output_height=5, output_width=4, crop_height=8, resize="bilinear")
    frames = [rng.integers(0, 256, shape).astype(np.uint8) for shape in [(9, 9, 3), (12, 7, 3), (9, 9, 3)]]
    images = [DecodedImage(frame, "bgr", 1 / 255) for frame in frames]
    preprocess = Preprocessor(config)
    mixed = preprocess(images)
    assert mixed.shape == (3, 3, 5, 4) and mixed.dtype == torch.float32 and mixed.is_contiguous()
    singles = torch.cat([preprocess([image]) for image in images])
    torch.testing.assert_close(mixed, singles)
    same = preprocess([images[0], images[2]])
    torch.testing.assert_close(same, singles[[0, 2]])
    assert preprocess([]).shape == (0, 3, 5, 4)


# ------------------------------------------------------------------------------ operator norm
def adaptive_average_matrix(source: int, target: int) -> np.ndarray:
    """From first principles: output i averages source [floor(i s / t), ceil((i + 1) s / t))."""
    matrix = np.zeros((target, source))
    for i in range(target):
        start, stop = (i * source) // target, -((-(i + 1) * source) // target)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def bilinear_matrix(source: int, target: int) -> np.ndarray:
    """From first principles: align_corners=False, no antialias, border clamped."""
    matrix = np.zeros((target, source))
    for i in range(target):
        position = max((i + 0.5) * source / target - 0.5, 0.0)
        low = min(int(position), source - 1)
        high = min(low + 1, source - 1)
        fraction = position - low
        matrix[i, low] += 1.0 - fraction
        matrix[i, high] += fraction
    return matrix


def dense_by_hand(height, width, order, config) -> np.ndarray:
    """(C_out*H*W) x (height*width*C_in) matrix of crop -> colour -> resize, numpy only."""
    crop_h, crop_w = config.crop_height or height, config.crop_width or width
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    build = adaptive_average_matrix if config.resize == "area" else bilinear_matrix
    rows = np.zeros((config.output_height, height))
    rows[:, top: top + crop_h] = build(crop_h, config.output_height)
    cols = np.zeros((config.output_width, width))
    cols[:, left: left + crop_w] = build(crop_w, config.output_width)
    colour = colour_matrix(order, config.output_channels)
    dense = np.einsum("oc,yi,xj->oyxijc", colour, rows, cols)
    return dense.reshape(config.output_channels * config.output_height * config.output_width, -1)


def dense_by_preprocessor(height, width, order, config) -> np.ndarray:
    """The same matrix, column by column, from `Preprocessor` applied to float basis images."""
    channels = {"mono": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}[order]
    size = height * width * channels
    basis = np.eye(size, dtype=np.float32).reshape(size, height, width, channels)
    out = Preprocessor(config)([DecodedImage(b, order, 1.0) for b in basis])
    return out.reshape(size, -1).double().numpy().T


@pytest.mark.parametrize(("order", "config"), [
    ("rgb", PreprocessConfig(1, 4, 4, crop_height=10, crop_width=14)),
    ("rgb", PreprocessConfig(1, 4, 4, crop_height=10, crop_width=14, resize="bilinear")),
    ("bgra", PreprocessConfig(3, 4, 5, crop_height=9, resize="bilinear")),
    ("bgr", PreprocessConfig(3, 5, 3, crop_width=11)),
    ("mono", PreprocessConfig(3, 4, 4, crop_height=7, crop_width=9)),
    ("rgba", PreprocessConfig(1, 6, 7, crop_height=3, crop_width=5)),  # area up-sampling
    ("mono", PreprocessConfig(1, 16, 20, resize="bilinear")),  # bilinear up-sampling, no crop
])
@pytest.mark.slow
def test_operator_norm_equals_dense_matrix_norm(order, config):
    height, width = 12, 16
    by_hand = dense_by_hand(height, width, order, config)
    by_preprocessor = dense_by_preprocessor(height, width, order, config)
    np.testing.assert_allclose(by_preprocessor, by_hand, atol=1e-6)
    for norm, ord_ in (("l2", 2), ("linf", np.inf)):
        value = preprocessing_operator_norm(height, width, order, config, norm)
        assert value == pytest.approx(np.linalg.norm(by_hand, ord=ord_), rel=1e-5)
        assert value >= np.linalg.norm(by_hand, ord=ord_)  # rounded up, never down
        assert value >= np.linalg.norm(by_preprocessor, ord=ord_)  # covers the float32 weights too


def test_article_in_camera_frame_is_recovered_exactly():
    """A 28x28 article upscaled x17 (nearest) into the centre of a 480x640 rgb8 frame; crop 476x476
    and area resize to 28x28 give the article back, and ||P||_2 = ||BT.601 weights||_2 / 17."""
    rng = np.random.default_rng(5)
    article = rng.integers(0, 256, (28, 28)).astype(np.uint8)
    frame = np.zeros((480, 640, 3), np.uint8)
    block = cv2.resize(article, (476, 476), interpolation=cv2.INTER_NEAREST)
    frame[2:478, 82:558] = block[:, :, None]
    np.testing.assert_array_equal(frame, embed_article(article))
    decoded = decode_image("rgb8", 480, 640, 640 * 3, frame.tobytes())
    config = PreprocessConfig(output_channels=1, crop_height=476, crop_width=476, resize="area")
    out = Preprocessor(config)([decoded])
    assert out.shape == (1, 1, 28, 28)
    np.testing.assert_allclose(out[0, 0].numpy(), article / 255.0, atol=1e-6)
    colour = Preprocessor(PreprocessConfig(3, 28, 28, 476, 476))([decoded])
    np.testing.assert_allclose(colour[0].numpy(), np.broadcast_to(article / 255.0, (3, 28, 28)), atol=1e-6)

    l2 = preprocessing_operator_norm(480, 640, "rgb", config, "l2")
    assert l2 == pytest.approx(math.hypot(*GREY_WEIGHTS) / ARTICLE_SCALE, rel=1e-6)
    assert ARTICLE_SCALE * l2 == pytest.approx(0.6686, abs=5e-5)
    assert preprocessing_operator_norm(480, 640, "rgb", config, "linf") == pytest.approx(1.0, rel=1e-6)
    assert preprocessing_operator_norm(480, 640, "mono", PreprocessConfig(3, 28, 28, 476, 476), "l2") == \
        pytest.approx(math.sqrt(3) / ARTICLE_SCALE, rel=1e-6)
    assert image_radius(0.5, l2) == pytest.approx(0.5 * ARTICLE_SCALE / math.hypot(*GREY_WEIGHTS), rel=1e-6)


def test_operator_norm_is_cached():
    config = PreprocessConfig(1, 28, 28, 476, 476)
    first = preprocessing_operator_norm(480, 640, "bgr", config, "l2")
    hits = preprocess_module._cached_operator_norm.cache_info().hits
    again = preprocessing_operator_norm(480, 640, "bgr", PreprocessConfig(1, 28, 28, 476, 476), "l2")
    assert again == first and preprocess_module._cached_operator_norm.cache_info().hits == hits + 1


def test_image_radius_edge_cases():
    assert image_radius(0.5, 0.25) == 2.0
    for norm in (0.0, -1.0, float("nan"), float("inf"), None):
        assert image_radius(0.5, norm) == 0.0
    for radius in (float("nan"), float("inf"), -0.1, 0.0):
        assert image_radius(radius, 0.5) == 0.0


@pytest.mark.parametrize("module", [decode_module, preprocess_module])
def test_module_imports_no_ros(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"rclpy", "sensor_msgs", "rosidl_runtime_py", "cv_bridge"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_output_on_cuda_matches_cpu():
    rng = np.random.default_rng(6)
    images = [DecodedImage(rng.integers(0, 65536, (40, 30, 4)).astype(">u2"), "bgra", 1 / 65535)]
    for resize in ("area", "bilinear"):
        cpu = Preprocessor(PreprocessConfig(1, 28, 28, 36, 28, resize=resize))(images)
        gpu = Preprocessor(PreprocessConfig(1, 28, 28, 36, 28, resize=resize, device="cuda"))(images)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------ fuzzing
FUZZ_ENCODINGS = sorted(ENCODINGS) * 3 + ["yuv422", "yuv422_yuy2", "nv21", "nv24", "bayer_rggb8", "bayer_gbrg16",
                                          "16UC1", "32FC1", "64FC1", "", "RGB8"]  # mostly valid


@st.composite
def raw_frames(draw):
    encoding = draw(st.sampled_from(FUZZ_ENCODINGS))
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if draw(st.integers(0, 7)) == 0:  # sometimes an empty or negative side
        height, width = draw(st.sampled_from([(0, width), (height, 0), (0, 0), (-1, width)]))
    dtype, channels, _ = ENCODINGS.get(encoding, (np.dtype(np.uint8), 3, "rgb"))
    row = max(width, 0) * channels * dtype.itemsize
    step = draw(st.one_of(st.just(row), st.integers(row, row + 7), st.integers(0, 120)))
    exact = step * max(height, 0)
    length = draw(st.one_of(st.just(exact), st.just(exact), st.just(exact + 1), st.integers(0, 1200)))
    data = draw(st.binary(min_size=min(length, 4000), max_size=min(length, 4000)))
    return encoding, height, width, step, data, draw(st.booleans())


configs = st.builds(
    PreprocessConfig, output_channels=st.sampled_from([1, 3]), output_height=st.integers(1, 6),
    output_width=st.integers(1, 6), crop_height=st.one_of(st.just(0), st.integers(1, 10)),
    crop_width=st.one_of(st.just(0), st.integers(1, 10)),
    resize=st.sampled_from(["area", "bilinear"]))


def check_preprocessed(decode, config: PreprocessConfig) -> None:
    """decode + preprocess: a finite [0, 1] tensor of the right shape, or BadImageError with a reason."""
    try:
        decoded = decode()
        out = Preprocessor(config)([decoded])
        norm = preprocessing_operator_norm(*decoded.pixels.shape[:2], decoded.channel_order, config, "l2")
    except BadImageError as error:
        assert str(error)
        return
    assert out.shape == (1, config.output_channels, config.output_height, config.output_width)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert math.isfinite(norm) and norm > 0


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=raw_frames(), config=configs)
def test_fuzzed_raw_frames(frame, config):
    check_preprocessed(lambda: decode_image(*frame[:5], is_bigendian=frame[5]), config)


@st.composite
def compressed_frames(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    channels = draw(st.sampled_from([1, 3, 4]))
    depth = draw(st.sampled_from([np.uint8, np.uint16]))
    raw = draw(st.binary(min_size=height * width * channels * 2, max_size=height * width * channels * 2))
    pixels = np.frombuffer(raw, np.uint16).astype(depth).reshape(height, width, channels)
    extension = ".png" if depth == np.uint16 or channels == 4 else draw(st.sampled_from([".png", ".jpg"]))
    data = cv2.imencode(extension, pixels)[1].tobytes()
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.booleans()) else data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=compressed_frames(), config=configs, fmt=st.sampled_from(["png", "jpeg", "bgr8; jpeg compressed bgr8"]))
def test_fuzzed_compressed_frames(data, config, fmt):
    check_preprocessed(lambda: decode_compressed(fmt, data), config)
