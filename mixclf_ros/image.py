"""Camera frames in, model inputs out: decoding, preprocessing, and the preprocessing's norm.

No ROS here: the decoders take the plain fields of `sensor_msgs/Image` and `CompressedImage`.

- `decode_image` returns a zero-copy numpy view of `Image.data` honouring `step`, for rgb8, bgr8,
  rgba8, bgra8, mono8, mono16, 32FC1 (and the 8UC1/8UC3/8UC4/16UC1 aliases).
- `decode_compressed` decodes PNG/JPEG/... bytes with OpenCV.
- `Preprocessor` turns decoded frames into (N, C, H, W) float32 tensors with pixels in [0, 1] on
  the model's device: centre crop, colour conversion, scaling, resize.
- `preprocessing_operator_norm` is the exact operator norm of that (linear) map, in l2 or linf,
  which carries a certified radius at the model input back into the source image.

Every frame that cannot be handled raises `BadImageError` with a reason a person can act on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MAX_SIDE = 16384
"""Frames with a side longer than this (pixels) are refused as implausible."""

# encoding -> (numpy dtype, channels, channel order)
ENCODINGS: dict[str, tuple[np.dtype, int, str]] = {
    "rgb8": (np.dtype(np.uint8), 3, "rgb"),
    "bgr8": (np.dtype(np.uint8), 3, "bgr"),
    "rgba8": (np.dtype(np.uint8), 4, "rgba"),
    "bgra8": (np.dtype(np.uint8), 4, "bgra"),
    "mono8": (np.dtype(np.uint8), 1, "mono"),
    "8UC1": (np.dtype(np.uint8), 1, "mono"),
    "8UC3": (np.dtype(np.uint8), 3, "bgr"),  # OpenCV's convention for untyped 3-channel images
    "8UC4": (np.dtype(np.uint8), 4, "bgra"),
    "mono16": (np.dtype(np.uint16), 1, "mono"),
    "16UC1": (np.dtype(np.uint16), 1, "mono"),
    "32FC1": (np.dtype(np.float32), 1, "mono"),
}

_SCALES = {np.dtype(np.uint8): 1 / 255, np.dtype(np.uint16): 1 / 65535, np.dtype(np.float32): 1.0}

# ITU-R BT.601 luma weights, as used by OpenCV's RGB2GRAY.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


class BadImageError(ValueError):
    """A frame that cannot be decoded or preprocessed; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as decoded (H, W, C) with C in {1, 3, 4}, possibly a view of the message buffer.

    `channel_order` is one of rgb, bgr, rgba, bgra, mono; `scale` maps raw values to [0, 1]
    (1/255 for 8-bit, 1/65535 for 16-bit, 1.0 for float images, which are taken as [0, 1])."""

    pixels: np.ndarray
    channel_order: str
    scale: float


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise BadImageError(f"zero-sized image ({height}x{width})")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise BadImageError(f"image {height}x{width} larger than {MAX_SIDE} pixels per side")


def decode_image(encoding: str, height: int, width: int, step: int, data, is_bigendian: bool = False) -> DecodedImage:
    """Zero-copy view of a `sensor_msgs/Image` buffer as (H, W, C).

    Args:
        encoding, height, width, step, data, is_bigendian: the message's fields; `step` is the
            row length in bytes (>= width * bytes per pixel; padding is skipped without a copy),
            and `data` must hold exactly `step * height` bytes.
    Raises:
        BadImageError: unknown encoding, zero or implausible size, a `step` shorter than a row, a
            data length other than `step * height`, or non-finite values in a float image.
    """
    if encoding not in ENCODINGS:
        raise BadImageError(f"unsupported encoding '{encoding}' (supported: {', '.join(ENCODINGS)})")
    dtype, channels, order = ENCODINGS[encoding]
    _check_size(height, width)
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise BadImageError(f"step {step} is shorter than a row of {width} {encoding} pixels ({row_bytes} bytes)")
    if step % dtype.itemsize:
        raise BadImageError(f"step {step} is not a multiple of the {dtype.itemsize}-byte sample size")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size != step * height:
        raise BadImageError(f"data has {buffer.size} bytes, expected step * height = {step * height}")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if is_bigendian else "<")
    rows = buffer.view(dtype).reshape(height, step // dtype.itemsize)
    pixels = rows[:, : width * channels].reshape(height, width, channels)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise BadImageError(f"{encoding} image contains NaN or infinite values")
    return DecodedImage(pixels, order, _SCALES[np.dtype(dtype.name)])


def decode_compressed(format: str, data) -> DecodedImage:
    """Decodes `sensor_msgs/CompressedImage` bytes (PNG, JPEG, ... as OpenCV reads them).

    Returns mono, bgr or bgra pixels (OpenCV's channel order) of dtype uint8 or uint16.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise BadImageError("compressed image has no data")
    pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise BadImageError(f"could not decode compressed image (format '{format}', {buffer.size} bytes)")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    _check_size(height, width)
    if pixels.dtype not in (np.uint8, np.uint16) or channels not in (1, 3, 4):
        raise BadImageError(f"unsupported decoded image: {channels} channels of {pixels.dtype}")
    order = {1: "mono", 3: "bgr", 4: "bgra"}[channels]
    return DecodedImage(pixels, order, _SCALES[pixels.dtype])


def colour_matrix(channel_order: str, output_channels: int) -> np.ndarray:
    """(output_channels x input_channels) linear map from decoded channels to model channels.

    Grey output uses BT.601 weights; colour output reorders to RGB; alpha is dropped; mono input
    is replicated into three channels."""
    if output_channels not in (1, 3):
        raise ValueError("output_channels must be 1 or 3")
    red, green, blue = GREY_WEIGHTS
    rgb_of = {
        "mono": np.array([[1.0], [1.0], [1.0]]),
        "rgb": np.eye(3),
        "bgr": np.eye(3)[::-1],
        "rgba": np.hstack([np.eye(3), np.zeros((3, 1))]),
        "bgra": np.hstack([np.eye(3)[::-1], np.zeros((3, 1))]),
    }
    if channel_order not in rgb_of:
        raise BadImageError(f"unknown channel order '{channel_order}'")
    if output_channels == 1:
        if channel_order == "mono":
            return np.ones((1, 1))
        return np.array([[red, green, blue]]) @ rgb_of[channel_order]
    return rgb_of[channel_order]


@dataclass(frozen=True)
class PreprocessConfig:
    """How frames become model inputs. Sizes in pixels.

    crop_height/crop_width: centre crop of the source frame (0 = no crop); a crop larger than the
    frame is BAD_INPUT. resize: 'area' (average over source pixels) or 'bilinear'."""

    output_channels: int = 1
    output_height: int = 28
    output_width: int = 28
    crop_height: int = 0
    crop_width: int = 0
    resize: str = "area"
    device: str = "cpu"

    def __post_init__(self):
        if self.resize not in ("area", "bilinear"):
            raise ValueError(f"resize must be 'area' or 'bilinear', got '{self.resize}'")
        if self.output_channels not in (1, 3):
            raise ValueError("output_channels must be 1 or 3")
        if min(self.output_height, self.output_width) <= 0 or min(self.crop_height, self.crop_width) < 0:
            raise ValueError("output size must be positive and crop sizes non-negative")


def _crop_box(height: int, width: int, config: PreprocessConfig) -> tuple[int, int, int, int]:
    crop_height = config.crop_height or height
    crop_width = config.crop_width or width
    if crop_height > height or crop_width > width:
        raise BadImageError(f"crop {crop_height}x{crop_width} larger than the image {height}x{width}")
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return top, left, crop_height, crop_width


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "area":
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)


class Preprocessor:
    """Decoded frames -> (N, C, H, W) float32 in [0, 1] on `config.device`.

    Only the cropped region is uploaded (uint8 or uint16, one copy); colour conversion, scaling and
    resizing run on the device."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.device = torch.device(config.device)
        self._matrices: dict[str, torch.Tensor] = {}

    def _colour(self, order: str) -> torch.Tensor:
        if order not in self._matrices:
            matrix = colour_matrix(order, self.config.output_channels)
            self._matrices[order] = torch.as_tensor(matrix, dtype=torch.float32, device=self.device)
        return self._matrices[order]

    def __call__(self, images: list[DecodedImage]) -> torch.Tensor:
        return torch.cat([self._one(image) for image in images])

    def _one(self, image: DecodedImage) -> torch.Tensor:
        height, width = image.pixels.shape[:2]
        top, left, crop_height, crop_width = _crop_box(height, width, self.config)
        crop = np.ascontiguousarray(image.pixels[top: top + crop_height, left: left + crop_width])
        if crop.dtype == np.uint16:
            crop = crop.astype(np.int32)  # torch has no uint16 arithmetic on every device
        elif crop.dtype.byteorder not in ("=", "|"):
            crop = crop.astype(crop.dtype.newbyteorder("="))
        pixels = torch.from_numpy(crop).to(self.device, non_blocking=True).float()
        pixels = pixels * image.scale
        if image.scale == 1.0:
            pixels = pixels.clamp(0.0, 1.0)  # float frames: [0,1] by contract; clamping is 1-Lipschitz
        # (h, w, c_in) @ (c_in, c_out) -> (1, c_out, h, w)
        converted = (pixels @ self._colour(image.channel_order).T).permute(2, 0, 1).unsqueeze(0)
        return _resize(converted, (self.config.output_height, self.config.output_width), self.config.resize)


@functools.lru_cache(maxsize=256)
def _resize_matrix(source: int, target: int, mode: str) -> np.ndarray:
    """(target x source) matrix of the 1D resize, obtained by applying the resize actually used
    to the identity basis in float64."""
    basis = torch.eye(source, dtype=torch.float64).reshape(source, 1, 1, source)
    resized = _resize(basis, (1, target), mode)  # (source, 1, 1, target)
    return resized.reshape(source, target).T.numpy()


def _operator_norm(matrix: np.ndarray, norm: str) -> float:
    if norm == "l2":
        return float(np.linalg.norm(matrix, ord=2))
    if norm == "linf":
        return float(np.abs(matrix).sum(axis=1).max())
    raise ValueError(f"norm must be 'l2' or 'linf', got '{norm}'")


@functools.lru_cache(maxsize=1024)
def _cached_operator_norm(source_height: int, source_width: int, channel_order: str,
                          config: PreprocessConfig, norm: str) -> float:
    _, _, crop_height, crop_width = _crop_box(source_height, source_width, config)
    rows = _resize_matrix(crop_height, config.output_height, config.resize)
    columns = _resize_matrix(crop_width, config.output_width, config.resize)
    colour = colour_matrix(channel_order, config.output_channels)
    product = _operator_norm(rows, norm) * _operator_norm(columns, norm) * _operator_norm(colour, norm)
    return product * (1.0 + 1e-9)  # round up: float64 SVD error must not shrink the norm


def preprocessing_operator_norm(source_height: int, source_width: int, channel_order: str,
                                config: PreprocessConfig, norm: str) -> float:
    """Exact operator norm, in `norm` (l2 or linf), of the preprocessing's linear part: source
    frame pixels scaled to [0, 1] -> model input pixels in [0, 1].

    The map is crop (a coordinate restriction), then colour conversion C, then the separable resize
    R_h (x) R_w; as a matrix it is the Kronecker product C (x) R_h (x) R_w of the three. For the
    l2 norm (largest singular value) and for the linf norm (largest absolute row sum) the norm of
    a Kronecker product is the product of the norms, and the crop neither adds nor removes any of
    it. Clamping of float frames and uint8 quantisation are 1-Lipschitz and cannot increase it.
    Cached per frame geometry.
    """
    return _cached_operator_norm(source_height, source_width, channel_order,
                                 PreprocessConfig(**{**config.__dict__, "device": "cpu"}), norm)


def image_radius(certified_radius: float, operator_norm: float) -> float:
    """Radius in the source image carried back from the model input: any source perturbation of
    size r / ||P|| reaches the model input with size at most r. 0 when the norm is unusable."""
    if not (math.isfinite(operator_norm) and operator_norm > 0 and math.isfinite(certified_radius)):
        return 0.0
    return max(0.0, certified_radius) / operator_norm


# ------------------------------------------------------------------------ rendering (demo camera)
def embed_article(article: np.ndarray, frame_height: int = 480, frame_width: int = 640, scale: int = 17) -> np.ndarray:
    """Renders a (h, w) uint8 grey article as an rgb8 frame: each article pixel becomes a
    `scale` x `scale` block in all three channels, centred in a black frame. A centre crop of
    (h*scale, w*scale), grey conversion and area resize to (h, w) recover the article exactly."""
    height, width = article.shape[0] * scale, article.shape[1] * scale
    if height > frame_height or width > frame_width:
        raise ValueError(f"article of {article.shape} at scale {scale} does not fit {frame_height}x{frame_width}")
    frame = np.zeros((frame_height, frame_width, 3), np.uint8)
    top, left = (frame_height - height) // 2, (frame_width - width) // 2
    frame[top: top + height, left: left + width] = np.kron(article, np.ones((scale, scale), np.uint8))[:, :, None]
    return frame


def article_budget(frame_eps: float, norm: str, scale: int, channels: int = 3) -> float:
    """Perturbation size on the article ([0,1] units) that `embed_article` renders to exactly
    `frame_eps` in the frame: in l2 every article pixel is repeated scale^2 * channels times, so
    norms grow by scale * sqrt(channels); in linf they are equal."""
    return frame_eps / (scale * math.sqrt(channels)) if norm == "l2" else frame_eps


def quantize_towards(clean: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """uint8 pixels of `perturbed` ([0,1] floats) rounded towards `clean` (uint8), so the
    perturbation's magnitude never grows, in any norm."""
    delta = perturbed * 255.0 - clean.astype(np.float64)
    return np.clip(clean + np.trunc(delta), 0, 255).astype(np.uint8)
