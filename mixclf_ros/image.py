"""Camera frames in, model inputs out: decoding, preprocessing, and the preprocessing's operator norm.

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

import dataclasses
import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CHANNEL_ORDERS",
    "ENCODINGS",
    "GREY_WEIGHTS",
    "MAX_SIDE",
    "BadImageError",
    "DecodedImage",
    "PreprocessConfig",
    "Preprocessor",
    "article_budget",
    "colour_matrix",
    "decode_compressed",
    "decode_image",
    "embed_article",
    "image_radius",
    "preprocessing_operator_norm",
    "quantize_towards",
]

MAX_SIDE = 8192
"""Frames (raw or compressed) with a side longer than this many pixels are refused as implausible."""

CHANNEL_ORDERS: dict[str, int] = {"mono": 1, "rgb": 3, "bgr": 3, "rgba": 4, "bgra": 4}
"""Channel order of a decoded image -> its number of channels."""

# Index of the red, green and blue samples within a pixel, per channel order (alpha is never read).
_RGB_INDEX: dict[str, tuple[int, int, int]] = {
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

GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (red, green, blue), as OpenCV's RGB2GRAY uses them."""


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


def _check_size(height: int, width: int) -> None:
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
    _check_size(height, width)
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
        _check_size(*announced)
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
    _check_size(pixels.shape[0], pixels.shape[1])
    channels = pixels.shape[2]
    if channels == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    elif channels == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
    order = {1: "mono", 3: "rgb", 4: "rgba"}[channels]
    return DecodedImage(pixels, order, _SCALES[pixels.dtype.str[1:]])


# ------------------------------------------------------------------------------ colour
def colour_matrix(channel_order: str, output_channels: int) -> np.ndarray:
    """(output_channels x input_channels) float64 matrix of the colour conversion, [0,1] -> [0,1].

    Grey output: BT.601 weights `GREY_WEIGHTS` on red, green, blue (mono passes through); colour
    output: the red, green, blue samples in that order (bgr is a permutation; mono is replicated
    into three channels). Alpha is dropped (its column is zero). `Preprocessor` applies exactly this
    map (by indexing and a weighted sum), `preprocessing_operator_norm` takes its norm.
    """
    if output_channels not in (1, 3):
        raise ValueError(f"output_channels must be 1 or 3, got {output_channels!r}")
    if channel_order not in CHANNEL_ORDERS:
        raise BadImageError(f"unknown channel order {channel_order!r} (known: {', '.join(CHANNEL_ORDERS)})")
    if channel_order == "mono":
        return np.ones((output_channels, 1))
    to_rgb = np.zeros((3, CHANNEL_ORDERS[channel_order]))
    to_rgb[[0, 1, 2], list(_RGB_INDEX[channel_order])] = 1.0
    if output_channels == 1:
        return np.array([GREY_WEIGHTS]) @ to_rgb
    return to_rgb


# ------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class PreprocessConfig:
    """How frames become model inputs. All sizes in pixels.

    Attributes:
        output_channels: 1 (grey, BT.601) or 3 (RGB).
        output_height, output_width: the model's input size, 1..`MAX_SIDE`.
        crop_height, crop_width: centre crop of the source frame, in source pixels, taken before
            the resize (0 = the full height/width). A crop larger than a frame is `BadImageError`.
        resize: "area" (average over the source pixels covering each output pixel, i.e. adaptive
            average pooling; exact for integer down-scaling) or "bilinear" (align_corners=False,
            no antialiasing).
        device: torch device string of the output tensor ("cpu", "cuda", "cuda:1", ...).
    Raises:
        ValueError: an invalid field.
    """

    output_channels: int = 1
    output_height: int = 28
    output_width: int = 28
    crop_height: int = 0
    crop_width: int = 0
    resize: str = "area"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.resize not in ("area", "bilinear"):
            raise ValueError(f"resize must be 'area' or 'bilinear', got {self.resize!r}")
        if self.output_channels not in (1, 3):
            raise ValueError(f"output_channels must be 1 or 3, got {self.output_channels!r}")
        for name in ("output_height", "output_width", "crop_height", "crop_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not (0 < self.output_height <= MAX_SIDE and 0 < self.output_width <= MAX_SIDE):
            raise ValueError(f"output size {self.output_height}x{self.output_width} must be within 1..{MAX_SIDE}")
        if not (0 <= self.crop_height <= MAX_SIDE and 0 <= self.crop_width <= MAX_SIDE):
            raise ValueError(f"crop {self.crop_height}x{self.crop_width} must be within 0..{MAX_SIDE} (0 = none)")


def _crop_box(height: int, width: int, config: PreprocessConfig) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of the centre crop; BadImageError if it does not fit."""
    crop_height = config.crop_height or height
    crop_width = config.crop_width or width
    if crop_height > height or crop_width > width:
        raise BadImageError(f"crop {crop_height}x{crop_width} is larger than the image {height}x{width}")
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The resize of `Preprocessor`, (N, C, h, w) -> (N, C, *size); the identity at equal size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


class Preprocessor:
    """Decoded frames -> (N, C, H, W) float32 tensor with pixels in [0, 1] on `config.device`.

    Per frame: centre crop (numpy view), one host copy of the crop into contiguous memory, one upload
    of the raw samples (uint8; uint16 as int32), then on the device: selection of the red, green,
    blue channels, clamping of float frames to [0, 1], resize to (H, W), colour conversion
    (`colour_matrix`: grey weighting or mono replication, on the resized pixels), scaling of integer
    samples by `DecodedImage.scale`, and a final clamp to [0, 1] that only removes float rounding
    (the grey weights sum to 1 only up to rounding). Clamps are 1-Lipschitz, so
    `preprocessing_operator_norm` bounds the whole map. Frames of identical geometry and type are
    processed as one batch; others one by one, then stacked.
    """

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.device = torch.device(config.device)
        weights = torch.tensor(GREY_WEIGHTS, dtype=torch.float32)
        self._grey = weights.to(self.device).view(1, 3, 1, 1)

    def __call__(self, images: Sequence[DecodedImage]) -> torch.Tensor:
        """Returns (len(images), C, H, W) float32 in [0, 1]; raises BadImageError for a bad frame."""
        config = self.config
        if len(images) == 0:
            return torch.empty((0, config.output_channels, config.output_height, config.output_width),
                               dtype=torch.float32, device=self.device)
        keys = {(image.pixels.shape, image.pixels.dtype.str, image.channel_order, image.scale) for image in images}
        if len(keys) == 1:
            return self._batch(images)
        return torch.cat([self._batch([image]) for image in images])

    def _batch(self, images: Sequence[DecodedImage]) -> torch.Tensor:
        config = self.config
        first = images[0]
        height, width = first.pixels.shape[:2]
        _check_size(height, width)
        top, left, crop_height, crop_width = _crop_box(height, width, config)
        crops = [image.pixels[top: top + crop_height, left: left + crop_width] for image in images]
        kind, itemsize = first.pixels.dtype.kind, first.pixels.dtype.itemsize
        if (kind, itemsize) == ("u", 1):
            host_dtype = np.dtype(np.uint8)
        elif (kind, itemsize) == ("u", 2):
            host_dtype = np.dtype(np.int32)  # torch's uint16 support is partial on some devices
        elif kind == "f" and itemsize in (4, 8):
            host_dtype = np.dtype(np.float32)
        else:
            raise BadImageError(f"unsupported sample type {first.pixels.dtype} (uint8, uint16 or float expected)")
        if kind == "f" and not all(np.isfinite(crop).all() for crop in crops):
            raise BadImageError("float image contains NaN or infinite values")
        # One host copy: contiguous, native byte order, writable (torch refuses read-only memory).
        host = np.empty((len(crops), crop_height, crop_width, first.pixels.shape[2]), dtype=host_dtype)
        for index, crop in enumerate(crops):
            host[index] = crop
        # contiguous NCHW: pooling a channels-last view is several times slower on the CPU
        samples = torch.from_numpy(host).to(self.device).permute(0, 3, 1, 2).contiguous()  # N, C_in, h, w

        order = first.channel_order
        if order in ("mono", "rgb"):
            selected = samples  # already in order (mono is replicated after the resize for colour models)
        else:
            selected = samples[:, list(_RGB_INDEX[order])]  # RGB order, alpha dropped
        x = selected.to(torch.float32)
        scale = first.scale
        if kind == "f":
            x = (x * scale).clamp(0.0, 1.0)  # float frames are [0, 1] intensities by contract
            scale = 1.0
        # Resize first, colour and scale last: the same linear map (the colour matrix acts on channels,
        # the resize on pixels), with integer samples exact in float32 through the resize (the area
        # average of equal samples is exact), and the colour conversion on the small output only.
        # The grey conversion is an explicit weighted sum, not a matmul, so TF32 settings cannot touch it.
        x = _resize(x, (config.output_height, config.output_width), config.resize)
        if config.output_channels == 1 and order != "mono":
            x = (x * self._grey).sum(dim=1, keepdim=True)
        if scale != 1.0:
            x = x * scale
        if config.output_channels == 3 and order == "mono":
            x = x.expand(-1, 3, -1, -1)
        return x.clamp(0.0, 1.0).contiguous()


# ------------------------------------------------------------------------------ operator norm
@functools.lru_cache(maxsize=512)
def _resize_matrix(source: int, target: int, mode: str, axis: str) -> np.ndarray:
    """(target x source) float64 matrix of the 1-D resize along `axis` ("height" or "width"),
    obtained by applying `_resize` itself to the identity basis, in chunks to bound memory."""
    columns = []
    for start in range(0, source, 512):
        stop = min(source, start + 512)
        basis = torch.zeros(stop - start, source, dtype=torch.float64)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        if axis == "height":
            out = _resize(basis.view(-1, 1, source, 1), (target, 1), mode)
        else:
            out = _resize(basis.view(-1, 1, 1, source), (1, target), mode)
        columns.append(out.reshape(stop - start, target).numpy())
    matrix = np.concatenate(columns).T.copy()
    matrix.setflags(write=False)
    return matrix


def _matrix_norm(matrix: np.ndarray, norm: str) -> float:
    if norm == "l2":
        return float(np.linalg.norm(matrix, ord=2))  # largest singular value
    return float(np.abs(matrix).sum(axis=1).max())  # largest absolute row sum


@functools.lru_cache(maxsize=1024)
def _cached_operator_norm(source_height: int, source_width: int, channel_order: str,
                          config: PreprocessConfig, norm: str) -> float:
    _check_size(source_height, source_width)
    _, _, crop_height, crop_width = _crop_box(source_height, source_width, config)
    rows = _resize_matrix(crop_height, config.output_height, config.resize, "height")
    columns = _resize_matrix(crop_width, config.output_width, config.resize, "width")
    colour = colour_matrix(channel_order, config.output_channels)
    product = _matrix_norm(colour, norm) * _matrix_norm(rows, norm) * _matrix_norm(columns, norm)
    return product * (1.0 + 1e-12)  # round up: float64 SVD/summation error must not shrink the norm


def preprocessing_operator_norm(source_height: int, source_width: int, channel_order: str,
                                config: PreprocessConfig, norm: str) -> float:
    """Exact operator norm ||P||, in `norm` ("l2" or "linf"), of the preprocessing's linear part P:
    source frame in [0, 1] units (raw * scale) -> model input in [0, 1] units, for a frame of
    `source_height` x `source_width` pixels in `channel_order` preprocessed with `config`.

    P = (C (x) R_h (x) R_w) S, with S the centre crop (a coordinate selection), C the
    (C_out x C_in) colour matrix (`colour_matrix`) and R_h, R_w the 1-D row and column resize
    matrices, built by applying the very resize `Preprocessor` uses to identity bases in float64.
    S has orthonormal rows and zero-pads rows of the matrix it is composed with, so it changes
    neither norm. For the Kronecker product, ||A (x) B|| = ||A|| ||B|| both in l2 (singular values
    multiply) and in linf (absolute row sums multiply), so ||P|| = ||C|| ||R_h|| ||R_w||; e.g.
    grey from RGB: ||C||_2 = ||(0.299, 0.587, 0.114)||_2 = 0.6686, ||C||_inf = 1; mono replicated
    to 3 channels: sqrt(3) and 1. The non-linear steps do not increase it: clamping to [0, 1] is
    1-Lipschitz coordinate-wise (hence in every l_p norm), and quantisation happens before P (the
    source frame is already integer), so ||P(x) - P(y)|| <= ||P|| ||x - y|| for the whole map, up to
    float32 rounding (about 1e-7 per pixel). The result is rounded up by 1e-12 relative and cached
    per (height, width, channel order, config without device, norm).

    Raises:
        BadImageError: zero/implausible size, unknown channel order, crop larger than the frame.
        ValueError: unknown norm.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    config = dataclasses.replace(config, device="cpu")  # the norm does not depend on the device
    return _cached_operator_norm(int(source_height), int(source_width), channel_order, config, norm)


def image_radius(certified_radius: float, operator_norm: float) -> float:
    """Certified radius carried back to the source image, in source [0, 1] units and the same norm.

    A source perturbation d with ||d|| <= r / ||P|| reaches the model input as ||P d|| <= r, so the
    prediction certified within `certified_radius` r at the model input is certified within
    r / ||P|| in the source image. Returns 0 (no claim) when the norm is unknown, zero, negative or
    non-finite, or when the radius is negative or non-finite.
    """
    try:
        radius, norm = float(certified_radius), float(operator_norm)
    except (TypeError, ValueError):
        return 0.0
    if not (math.isfinite(norm) and norm > 0.0 and math.isfinite(radius) and radius > 0.0):
        return 0.0
    return radius / norm


# ------------------------------------------------------------------------------ rendering (demo camera)
def embed_article(article: np.ndarray, frame_height: int = 480, frame_width: int = 640, scale: int = 17) -> np.ndarray:
    """Renders a (h, w) uint8 grey article as an rgb8 (frame_height, frame_width, 3) frame: each
    article pixel becomes a `scale` x `scale` block (nearest-neighbour upscaling) in all three
    channels, centred in a black frame. A centre crop of (h*scale, w*scale), grey conversion and area
    resize to (h, w) recover the article exactly (up to float rounding)."""
    height, width = article.shape[0] * scale, article.shape[1] * scale
    if height > frame_height or width > frame_width:
        raise ValueError(f"article of {article.shape} at scale {scale} does not fit {frame_height}x{frame_width}")
    frame = np.zeros((frame_height, frame_width, 3), np.uint8)
    top, left = (frame_height - height) // 2, (frame_width - width) // 2
    frame[top: top + height, left: left + width] = np.kron(article, np.ones((scale, scale), np.uint8))[:, :, None]
    return frame


def article_budget(frame_eps: float, norm: str, scale: int, channels: int = 3) -> float:
    """Perturbation size on the article ([0, 1] units) that `embed_article` renders to exactly
    `frame_eps` in the frame: in l2 every article pixel is repeated scale^2 * channels times, so
    norms grow by scale * sqrt(channels); in linf they are equal."""
    return frame_eps / (scale * math.sqrt(channels)) if norm == "l2" else frame_eps


def quantize_towards(clean: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """uint8 pixels of `perturbed` ([0, 1] floats) rounded towards `clean` (uint8), so the
    perturbation's magnitude never grows, in any norm."""
    delta = perturbed * 255.0 - clean.astype(np.float64)
    return np.clip(clean + np.trunc(delta), 0, 255).astype(np.uint8)
