"""Decoded frames in, model inputs out: centre crop, colour conversion, resize, and the exact operator
norm of that map, which carries a certified radius at the model input back to the source image.

Units: source [0, 1] units are raw samples times `DecodedImage.scale`; model inputs are [0, 1] pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixclf_ros.vision.decode import CHANNEL_ORDERS, MAX_SIDE, RGB_INDEX, BadImageError, DecodedImage, check_frame_size

GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (red, green, blue), as OpenCV's RGB2GRAY uses them."""


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
    to_rgb[[0, 1, 2], list(RGB_INDEX[channel_order])] = 1.0
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
        check_frame_size(height, width)
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
            selected = samples[:, list(RGB_INDEX[order])]  # RGB order, alpha dropped
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
    check_frame_size(source_height, source_width)
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


