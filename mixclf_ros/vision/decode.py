"""Camera frames in, pixel arrays out: decoding `sensor_msgs/Image` and `CompressedImage` payloads.

No ROS here (no rclpy, no sensor_msgs): the decoders take the plain fields of `sensor_msgs/Image`
and `sensor_msgs/CompressedImage`, so the node passes `message.encoding, message.height, ...`.

- `decode_image` returns a zero-copy numpy view of `Image.data` honouring `step` (row padding is
  skipped by strides, never copied) for rgb8, bgr8, rgba8, bgra8, mono8, mono16, the 16-bit colour
  encodings rgb16/bgr16/rgba16/bgra16 and the aliases 8UC1, 8UC3, 8UC4 (`ENCODINGS`); the REP-118
  depth encodings 16UC1 and 32FC1 (`DEPTH_ENCODINGS`) only for a model that takes depth
  (`input_kind="depth"`); and converts camera encodings to RGB with OpenCV (`CONVERTED_ENCODINGS`):
  yuv422 (UYVY), yuv422_yuy2 (YUYV), nv21, nv24 and bayer_{rggb,bggr,gbrg,grbg}{8,16}.
  Converted frames carry `linear_in_message = False`: see `DecodedImage`.
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
    "CONVERTED_ENCODINGS",
    "DEPTH_ENCODINGS",
    "ENCODINGS",
    "INPUT_KINDS",
    "MAX_SIDE",
    "BadImageError",
    "DecodedImage",
    "decode_compressed",
    "decode_frame",
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
}
"""Intensity `sensor_msgs/Image.encoding` decoded as a zero-copy view -> (sample dtype, channels,
channel order). Case-sensitive, as in ROS."""

DEPTH_ENCODINGS: dict[str, tuple[np.dtype, int, str]] = {
    "16UC1": (np.dtype(np.uint16), 1, "mono"),  # REP-118: millimetres
    "32FC1": (np.dtype(np.float32), 1, "mono"),  # REP-118: metres
}
"""REP-118 depth encodings (zero-copy views, like `ENCODINGS`), accepted only with `input_kind="depth"`.
The samples reach the model as for intensity images: 16UC1 times 1/65535, 32FC1 as is (clamped to
[0, 1] by `Preprocessor`), so a depth model must have been trained on those units."""

INPUT_KINDS = ("intensity", "depth")
"""What the model takes: intensity images (`ENCODINGS`, `CONVERTED_ENCODINGS`) or depth (`DEPTH_ENCODINGS`)."""

# OpenCV names a Bayer pattern by the second and third pixels of the second row, so ROS's rggb
# (red top left) is OpenCV's BG; these are cv_bridge's codes. Bilinear demosaicing (8 or 16 bit).
_BAYER_CODES = {"rggb": cv2.COLOR_BayerBG2RGB, "bggr": cv2.COLOR_BayerRG2RGB,
                "gbrg": cv2.COLOR_BayerGR2RGB, "grbg": cv2.COLOR_BayerGB2RGB}

CONVERTED_ENCODINGS: dict[str, tuple[np.dtype, str]] = {
    "yuv422": (np.dtype(np.uint8), "packed 4:2:2 U Y0 V Y1 (UYVY)"),
    "yuv422_yuy2": (np.dtype(np.uint8), "packed 4:2:2 Y0 U Y1 V (YUYV, YUY2)"),
    "nv21": (np.dtype(np.uint8), "semi-planar 4:2:0: Y plane, then interleaved V U at half resolution"),
    "nv24": (np.dtype(np.uint8), "semi-planar 4:4:4: Y plane, then interleaved U V at full resolution"),
    **{f"bayer_{pattern}{bits}": (np.dtype(np.uint8 if bits == 8 else np.uint16), f"Bayer {pattern}, {bits} bit")
       for pattern in _BAYER_CODES for bits in (8, 16)},
}
"""Camera encodings converted to RGB by OpenCV (`cv2.cvtColor`; YUV as BT.601 limited range, as
OpenCV and cv_bridge read it) -> (sample dtype, layout). The result is a new uint8 (uint16 for
16-bit Bayer) RGB array with `linear_in_message = False`."""

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
        linear_in_message: True when `pixels` are the message's stored samples themselves (a view,
            read through `channel_order`), so `preprocessing_operator_norm` carries a certified
            radius back to the image as transmitted. False when OpenCV computed them from the stored
            samples: YUV (chroma shared by neighbouring pixels, the 16/128 offsets make the map
            affine, the result is rounded to integers) and Bayer (demosaicing mixes neighbours,
            rounded). Rounding after the conversion admits no operator-norm bound in the message's
            units, so no image-space radius is claimed for these frames (`image_radius` = 0); the
            certificate at the model input holds unchanged.
    Raises:
        BadImageError: inconsistent shape, channel order or scale.
    """

    pixels: np.ndarray
    channel_order: str
    scale: float
    linear_in_message: bool = True

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


def _strided_view(buffer: np.ndarray, dtype: np.dtype, rows: int, columns: int, channels: int,
                  row_stride: int, offset: int = 0) -> np.ndarray:
    """(rows, columns, channels) view of `buffer` starting at byte `offset`, rows `row_stride` bytes apart."""
    return np.ndarray(shape=(rows, columns, channels), dtype=dtype, buffer=buffer, offset=offset,
                      strides=(row_stride, channels * dtype.itemsize, dtype.itemsize))


def decode_image(encoding: str, height: int, width: int, step: int, data: Any,
                 is_bigendian: bool = False, input_kind: str = "intensity") -> DecodedImage:
    """Decodes a `sensor_msgs/Image` buffer: a zero-copy (H, W, C) view, or an RGB conversion.

    Args:
        encoding: one of `ENCODINGS`, `CONVERTED_ENCODINGS` or `DEPTH_ENCODINGS` (case-sensitive).
        height, width: pixels, each in 1..`MAX_SIDE`; even width for yuv422/yuv422_yuy2, even
            width and height for nv21.
        step: bytes per row, >= width * bytes per pixel; trailing row padding is skipped by the view's
            strides (no copy), any step is accepted, also one not a multiple of the sample size.
            For nv21 and nv24, the row stride of the Y plane (>= width); the chroma plane follows the
            Y plane with rows of `step` bytes (nv21, height / 2 rows) or `2 * step` bytes (nv24,
            height rows).
        data: exactly `step * height` bytes (the sensor_msgs/Image contract; trailing extra bytes are
            refused too, since they mean the producer disagrees with its own header); for nv21
            `step * height * 3 / 2` and for nv24 `step * height * 3` (Y plane and chroma plane).
        is_bigendian: byte order of 16-bit and float samples (ignored for 8-bit).
        input_kind: what the model takes, "intensity" (refuses the depth encodings 16UC1 and 32FC1,
            REP-118) or "depth" (accepts only those).
    Returns:
        `DecodedImage` whose `pixels` share memory with `data` (read-only when `data` is bytes), or,
        for `CONVERTED_ENCODINGS`, a new RGB array with `linear_in_message = False`.
    Raises:
        BadImageError: unknown encoding, an encoding of the other input kind, zero or implausible
            size, odd size where the layout needs it, step shorter than a row, data length other than
            the layout's, a buffer that is not bytes-like, or NaN/inf in a float image.
        ValueError: an unknown `input_kind` (a configuration mistake).
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
    encoding_name = encoding if isinstance(encoding, str) else None
    if encoding_name in DEPTH_ENCODINGS and input_kind != "depth":
        raise BadImageError(f"encoding {encoding!r} is a depth image (REP-118), but the model takes intensity "
                            "images (input_kind 'intensity'); set input_kind 'depth' only for a model trained on depth")
    if input_kind == "depth" and encoding_name not in DEPTH_ENCODINGS:
        raise BadImageError(f"encoding {encoding!r} is not a depth encoding ({', '.join(DEPTH_ENCODINGS)}), "
                            "but the model takes depth images (input_kind 'depth')")
    spec = (DEPTH_ENCODINGS.get(encoding_name) or ENCODINGS.get(encoding_name)) if encoding_name else None
    if spec is None and encoding_name not in CONVERTED_ENCODINGS:
        known = [*ENCODINGS, *CONVERTED_ENCODINGS] if input_kind == "intensity" else list(DEPTH_ENCODINGS)
        raise BadImageError(f"unsupported encoding {encoding!r} (supported: {', '.join(known)})")
    height, width, step = _as_int("height", height), _as_int("width", width), _as_int("step", step)
    check_frame_size(height, width)
    if spec is None:
        return _convert(encoding_name, height, width, step, _byte_view(data), bool(is_bigendian))
    dtype, channels, order = spec
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
    pixels = _strided_view(buffer, dtype, height, width, channels, step)
    if dtype.kind == "f" and not np.isfinite(pixels).all():
        raise BadImageError(f"{encoding} image contains NaN or infinite values")
    return DecodedImage(pixels, order, _SCALES[dtype.str[1:]])


def _convert(encoding: str, height: int, width: int, step: int, buffer: np.ndarray,
             is_bigendian: bool) -> DecodedImage:
    """RGB of a `CONVERTED_ENCODINGS` frame by `cv2.cvtColor` (sizes already checked to be plausible)."""
    dtype, layout = CONVERTED_ENCODINGS[encoding]
    if encoding.startswith("yuv422") or encoding == "nv21":
        if width % 2 or (encoding == "nv21" and height % 2):
            need = "width and height" if encoding == "nv21" else "width"
            raise BadImageError(f"{encoding} ({layout}) needs an even {need}, got {height}x{width}")
    row_bytes = width * (2 if encoding.startswith("yuv422") else dtype.itemsize)
    if step < row_bytes:
        raise BadImageError(f"step {step} bytes is shorter than a row of {width} {encoding} pixels "
                            f"({row_bytes} bytes)")
    rows = {"nv21": height * 3 // 2, "nv24": height * 3}.get(encoding, height)
    if buffer.size != step * rows:
        formula = {"nv21": " * 3 / 2", "nv24": " * 3"}.get(encoding, "")
        raise BadImageError(f"data has {buffer.size} bytes, but {encoding} needs step * height{formula} = "
                            f"{step} * {height}{formula} = {step * rows}")
    if encoding.startswith("yuv422"):
        packed = _strided_view(buffer, dtype, height, width, 2, step)
        code = cv2.COLOR_YUV2RGB_UYVY if encoding == "yuv422" else cv2.COLOR_YUV2RGB_YUY2
        rgb = cv2.cvtColor(packed, code)
    elif encoding == "nv21":
        rgb = cv2.cvtColor(_strided_view(buffer, dtype, rows, width, 1, step)[:, :, 0], cv2.COLOR_YUV2RGB_NV21)
    elif encoding == "nv24":
        # OpenCV has no 4:4:4 semi-planar code. Each pixel becomes a YUYV pair (Y U Y V, both halves
        # identical), converted with the same BT.601 limited-range code as yuv422_yuy2; every second
        # output pixel is the frame.
        luma = _strided_view(buffer, dtype, height, width, 1, step)
        chroma = _strided_view(buffer, dtype, height, width, 2, 2 * step, offset=step * height)
        pairs = np.concatenate([luma, chroma[:, :, :1], luma, chroma[:, :, 1:]], axis=2)
        rgb = np.ascontiguousarray(cv2.cvtColor(pairs.reshape(height, 2 * width, 2), cv2.COLOR_YUV2RGB_YUY2)[:, ::2])
    else:  # bayer_<pattern><bits>
        sample = dtype.newbyteorder(">" if is_bigendian else "<") if dtype.itemsize > 1 else dtype
        mosaic = _strided_view(buffer, sample, height, width, 1, step)[:, :, 0]
        if sample != dtype:  # OpenCV takes native byte order
            mosaic = mosaic.astype(dtype)
        try:
            rgb = cv2.cvtColor(mosaic, _BAYER_CODES[encoding[len("bayer_"):-len(str(8 * dtype.itemsize))]])
        except cv2.error as error:
            raise BadImageError(f"could not demosaic {encoding} image {height}x{width}: "
                                f"{str(error).strip().splitlines()[-1]}") from None
    return DecodedImage(rgb, "rgb", _SCALES[dtype.str[1:]], linear_in_message=False)


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


def decode_frame(message: Any, compressed: bool, input_kind: str = "intensity") -> DecodedImage:
    """Decodes an image message of any binding: rclpy's, or a rosbags dataclass read from a recording.

    `message` has the fields of `sensor_msgs/CompressedImage` (`compressed`: format, data) or of
    `sensor_msgs/Image` (encoding, height, width, step, is_bigendian, data); the node and
    `mixclf-eval bag` both decode through here.
    Raises:
        BadImageError: the frame is not a usable image for a model taking `input_kind` (compressed
            frames for a depth model included: use the raw transport).
    """
    if compressed:
        if input_kind == "depth":
            raise BadImageError("compressed images are not supported for a depth model (input_kind 'depth'): "
                                "use the raw transport")
        return decode_compressed(message.format, message.data)
    return decode_image(message.encoding, message.height, message.width, message.step,
                        message.data, bool(message.is_bigendian), input_kind=input_kind)
