"""Camera frames in, pixel arrays out: decoding `sensor_msgs/Image` and `CompressedImage` payloads.

No ROS here (no rclpy, no sensor_msgs): the decoders take the plain fields of `sensor_msgs/Image`
and `sensor_msgs/CompressedImage`, so the node passes `message.encoding, message.height, ...`.

- `decode_image` returns a zero-copy numpy view of `Image.data` honouring `step` (row padding is
  skipped by strides, never copied) for rgb8, bgr8, rgba8, bgra8, mono8, mono16, 32FC1, the 16-bit
  colour encodings rgb16/bgr16/rgba16/bgra16 and the aliases 8UC1, 8UC3, 8UC4, 16UC1.
- `decode_compressed` decodes PNG/JPEG/... bytes with OpenCV and returns RGB(A) or mono pixels.
- `Preprocessor` turns decoded frames into (N, C, H, W) float32 tensors with pixels in [0, 1] on the
  model's device: centre crop, colour conversion, scaling to [0, 1], resize.
- `preprocessing_operator_norm` is the exact operator norm of that map's linear part, in l2 or linf,
  which carries a certified radius at the model input back into the source image (`image_radius`).

Units: "source [0, 1] units" are the raw sample values times `DecodedImage.scale` (raw / 255 for
8-bit, raw / 65535 for 16-bit, raw for float images); model inputs are in [0, 1] as everywhere in
the library. Every frame that cannot be handled raises `BadImageError` with a reason a person can
act on; configuration mistakes raise `ValueError`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

__all__ = [
    "CHANNEL_ORDERS",
    "ENCODINGS",
    "MAX_SIDE",
    "BadImageError",
    "DecodedImage",
    "decode_compressed",
    "decode_image",
]

MAX_SIDE = 8192
"""Frames (raw or compressed) with a side longer than this many pixels are refused as implausible."""

CHANNEL_ORDERS: dict[str, int] = {"mono": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}
"""Channel order of a decoded image -> its number of channels."""

# Index of the red, green and blue samples within a pixel, per channel order (alpha is never read).
RGB_INDEX: dict[str, tuple[int, int, int]] = {
    "rgb": (0, 1, 2), "bgr": (2, 1, 0), "rgba": (0, 1, 2), "bgra": (2, 1, 0),
}

ENCODINGS: dict[str, tuple[np.dtype, int, str]] = {
    "rgb8": (np.dtype(np.uint8), 3, "rgb"),
    "bgr8": (np.dtype(np.uint8), 3, "bgr"),
    "rgba8": (np.dtype(np.uint8), 4, "rgba"),
    "bgra8": (np.dtype(np.uint8), 4, "bgra"),
    "mono8": (np.dtype(np.uint8), 1, "mono"),
    "rgb16": (np.dtype(np.uint16), 3, "rgb"),
    "bgr16": (np.dtype(np.uint16), 3, "bgr"),
    "rgba16": (np.dtype(np.uint16), 4, "rgba"),
    "bgra16": (np.dtype(np.uint16), 4, "bgra"),
    "mono16": (np.dtype(np.uint16), 1, "mono"),
    "8UC1": (np.dtype(np.uint8), 1, "mono"),
    "8UC3": (np.dtype(np.uint8), 3, "bgr"),  # cv_bridge/OpenCV convention for untyped 3-channel images
    "8UC4": (np.dtype(np.uint8), 4, "bgra"),
    "16UC1": (np.dtype(np.uint16), 1, "mono"),
    "32FC1": (np.dtype(np.float32), 1, "mono"),
}
"""`sensor_msgs/Image.encoding` -> (sample dtype, channels, channel order). Case-sensitive, as in ROS."""

_SCALES: dict[str, float] = {"u1": 1.0 / 255.0, "u2": 1.0 / 65535.0, "f4": 1.0, "f8": 1.0}


class BadImageError(ValueError):
    """A frame that cannot be decoded or preprocessed; `str(error)` says why, for a person."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded frame: `pixels` (H, W, C), C in {1, 3, 4}, possibly a read-only view of the message.

    Attributes:
        pixels: raw samples, uint8, uint16 (any byte order), float32 or float64.
        channel_order: one of "mono", "rgb", "bgr", "rgba", "bgra" (must match C).
        scale: multiplies raw samples into [0, 1] units: 1/255 (8-bit), 1/65535 (16-bit), 1.0 for
            float images, whose values are taken as [0, 1] intensities (clamped by `Preprocessor`).
    Raises:
        BadImageError: inconsistent shape, channel order or scale.
    """

    pixels: np.ndarray
    channel_order: str
    scale: float

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise BadImageError(f"unknown channel order {self.channel_order!r} "
                                f"(known: {', '.join(CHANNEL_ORDERS)})")
        shape = getattr(self.pixels, "shape", None)
        if shape is None or len(shape) != 3 or shape[2] != CHANNEL_ORDERS[self.channel_order]:
            raise BadImageError(f"pixels of shape {shape} do not match channel order "
                                f"{self.channel_order!r} ((H, W, {CHANNEL_ORDERS[self.channel_order]}) expected)")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise BadImageError(f"scale must be a positive finite number, got {self.scale!r}")


# ------------------------------------------------------------------------------ decoding
def _as_int(name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise BadImageError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def check_frame_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise BadImageError(f"zero-sized image ({height}x{width} pixels)")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise BadImageError(f"image {height}x{width} is larger than the {MAX_SIDE} pixels per side accepted")


def _byte_view(data: Any) -> np.ndarray:
    """1-D uint8 view (no copy) of a bytes-like buffer: bytes, bytearray, memoryview,
    array.array (what rclpy gives for uint8[]) or a C-contiguous numpy array."""
    if isinstance(data, np.ndarray) and data.dtype.hasobject:
        raise BadImageError("data is an array of Python objects, not a byte buffer")
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as error:
        raise BadImageError(f"data is not a contiguous bytes-like buffer ({type(data).__name__}: {error})") from None


def decode_image(encoding: str, height: int, width: int, step: int, data: Any,
                 is_bigendian: bool = False) -> DecodedImage:
    """Zero-copy (H, W, C) view of a `sensor_msgs/Image` buffer.

    Args:
        encoding: one of `ENCODINGS` (case-sensitive).
        height, width: pixels, each in 1..`MAX_SIDE`.
        step: bytes per row, >= width * bytes per pixel; trailing row padding is skipped by the view's
            strides (no copy), any step is accepted, also one not a multiple of the sample size.
        data: exactly `step * height` bytes (the sensor_msgs/Image contract; trailing extra bytes are
            refused too, since they mean the producer disagrees with its own header).
        is_bigendian: byte order of 16-bit and float samples (ignored for 8-bit).
    Returns:
        `DecodedImage` whose `pixels` share memory with `data` (read-only when `data` is bytes).
    Raises:
        BadImageError: unknown encoding, zero or implausible size, step shorter than a row, data
            length other than `step * height`, a buffer that is not bytes-like, or NaN/inf in a float image.
    """
    spec = ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    if spec is None:
        raise BadImageError(f"unsupported encoding {encoding!r} (supported: {', '.join(ENCODINGS)})")
    dtype, channels, order = spec
    height, width, step = _as_int("height", height), _as_int("width", width), _as_int("step", step)
    check_frame_size(height, width)
    pixel_bytes = channels * dtype.itemsize
    row_bytes = width * pixel_bytes
    if step < row_bytes:
        raise BadImageError(f"step {step} bytes is shorter than a row of {width} {encoding} pixels "
                            f"({row_bytes} bytes)")
    buffer = _byte_view(data)
    expected = step * height
    if buffer.size != expected:
        raise BadImageError(f"data has {buffer.size} bytes, but step * height = {step} * {height} = {expected}")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if is_bigendian else "<")
    pixels = np.ndarray(shape=(height, width, channels), dtype=dtype, buffer=buffer,
                        strides=(step, pixel_bytes, dtype.itemsize))
    if dtype.kind == "f" and not np.isfinite(pixels).all():
        raise BadImageError(f"{encoding} image contains NaN or infinite values")
    return DecodedImage(pixels, order, _SCALES[dtype.str[1:]])


def _compressed_header_size(buffer: np.ndarray) -> tuple[int, int] | None:
    """(height, width) announced by a PNG or baseline/progressive JPEG header, None if unknown.
    Lets a tiny message claiming a huge image be refused before OpenCV allocates it."""
    head = buffer[:24].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
    if not head.startswith(b"\xff\xd8"):
        return None
    raw = buffer[: 1 << 20].tobytes()  # the frame header comes early; do not scan further
    index = 2
    while index + 4 <= len(raw):
        if raw[index] != 0xFF:
            return None
        marker = raw[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            index += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(raw[index + 2: index + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and index + 9 <= len(raw):
            height = int.from_bytes(raw[index + 5: index + 7], "big")
            width = int.from_bytes(raw[index + 7: index + 9], "big")
            return (height, width) if height else None  # height 0: given later by a DNL marker
        index += 2 + length
    return None


def decode_compressed(format: str, data: Any) -> DecodedImage:
    """Decodes `sensor_msgs/CompressedImage` bytes with OpenCV (`cv2.imdecode`, IMREAD_UNCHANGED).

    The image type is read from the bytes (PNG, JPEG, and what else OpenCV reads); `format` is only
    used for messages and to refuse `compressedDepth` (a depth-specific header OpenCV cannot read).
    Returns:
        `DecodedImage` with channel order "mono", "rgb" or "rgba" (OpenCV's BGR(A) is converted, one
        pass over the decoded array) and dtype uint8 or uint16 (scale 1/255 or 1/65535). EXIF
        orientation is not applied.
    Raises:
        BadImageError: empty or undecodable data, a header announcing more than `MAX_SIDE` pixels per
            side, or a decoded type other than 1, 3 or 4 channels of uint8/uint16.
    """
    if not isinstance(format, str):
        raise BadImageError(f"format must be a string, got {type(format).__name__}")
    if "compresseddepth" in format.lower():
        raise BadImageError(f"format {format!r}: compressedDepth images are not supported")
    buffer = _byte_view(data)
    if buffer.size == 0:
        raise BadImageError(f"compressed image (format {format!r}) has no data")
    announced = _compressed_header_size(buffer)
    if announced is not None:
        check_frame_size(*announced)
    try:
        pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise BadImageError(f"could not decode compressed image (format {format!r}, {buffer.size} bytes): "
                            f"{str(error).strip().splitlines()[-1]}") from None
    if pixels is None:
        raise BadImageError(f"could not decode compressed image (format {format!r}, {buffer.size} bytes)")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4) or pixels.dtype not in (np.uint8, np.uint16):
        raise BadImageError(f"unsupported decoded image: shape {pixels.shape} of {pixels.dtype} "
                            "(1, 3 or 4 channels of uint8 or uint16 expected)")
    check_frame_size(pixels.shape[0], pixels.shape[1])
    channels = pixels.shape[2]
    if channels == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif channels == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
    order = {1: "mono", 3: "rgb", 4: "rgba"}[channels]
    return DecodedImage(pixels, order, _SCALES[pixels.dtype.str[1:]])


