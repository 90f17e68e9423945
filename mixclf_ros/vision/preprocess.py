"""Decoded frames in, model inputs out: centre crop, colour conversion, resize, and the exact operator
norm of that map, which carries a certified radius at the model input back to the source image.

Units: source [0, 1] units are raw samples times `DecodedImage.scale`; model inputs are [0, 1] pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import cv2
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

    @classmethod
    def for_model(cls, config: Mapping[str, Any], device: str = "cpu") -> PreprocessConfig:
        """The preprocessing a model config (`models.schema` keys) asks for: its input size and
        channels, and its `crop_height`, `crop_width`, `resize`."""
        return cls(output_channels=int(config["input_channels"]), output_height=int(config["input_height"]),
                   output_width=int(config["input_width"]), crop_height=int(config.get("crop_height", 0)),
                   crop_width=int(config.get("crop_width", 0)), resize=str(config.get("resize", "area")),
                   device=str(device))


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


def _integer_area_factors(crop_height: int, crop_width: int, config: PreprocessConfig) -> tuple[int, int] | None:
    """(rows, columns) per output pixel when the area resize of a uint8 crop can run as exact integer
    block sums (whole-number down-scaling), else None."""
    if config.resize != "area":
        return None
    height, width = config.output_height, config.output_width
    if crop_height % height or crop_width % width:
        return None
    return crop_height // height, crop_width // width


_MAX_EXACT_BLOCK = 2 ** 24 // 255
"""Largest block (rows x columns) whose uint8 sum is below 2^24, so exact in float32."""


def _integer_area_resize(crops: Sequence[np.ndarray], factors: tuple[int, int]) -> np.ndarray:
    """Area resize of uint8 crops (h, w, C) by whole-number factors (rows, columns per output pixel,
    at most `_MAX_EXACT_BLOCK` samples a block): (N, h/rows, w/columns, C) float32 block means.

    Block sums are exact integers (OpenCV's integral image, int32 where the whole crop's sum fits,
    else float64, exact below 2^53), below 2^24 so exact in float32; the float32 mean then carries a
    single rounding (2^-24 relative), within the gamma_{k+2}(2^-53) + 2^-24 that
    `preprocessing_float_error` allows for the float64 area path."""
    rows, columns = factors
    means = []
    for crop in crops:
        height, width, channels = crop.shape
        depth = cv2.CV_32S if height * width * 255 < 2 ** 31 else cv2.CV_64F
        integral = cv2.integral(crop if channels > 1 else crop[:, :, 0], sdepth=depth)
        corners = integral.reshape(height + 1, width + 1, channels)[::rows, ::columns]
        sums = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
        means.append(sums.astype(np.float32) / np.float32(rows * columns))
    return np.stack(means)


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
    uint8 frames whose crop is a whole multiple of the output size in area mode (the demo camera:
    476 -> 28) take an exact shortcut with the same result: block sums on the host from OpenCV's
    integral image of the uint8 crop (no float copy of the full crop), one float32 division per
    output sample, then one upload of the small result (`_integer_area_resize`).
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
        factors = _integer_area_factors(crop_height, crop_width, config) if host_dtype == np.uint8 else None
        if factors is not None and factors[0] * factors[1] <= _MAX_EXACT_BLOCK:
            # whole-number area down-scaling of uint8 samples: exact block sums on the host, then one
            # upload of the small (N, H, W, C) result
            resized = torch.from_numpy(_integer_area_resize(crops, factors)).to(self.device).permute(0, 3, 1, 2)
            return _map_samples(resized, first.channel_order, first.scale, False, config, self._grey)
        # One host copy: contiguous, native byte order, writable (torch refuses read-only memory).
        host = np.empty((len(crops), crop_height, crop_width, first.pixels.shape[2]), dtype=host_dtype)
        for index, crop in enumerate(crops):
            host[index] = crop
        # contiguous NCHW: pooling a channels-last view is several times slower on the CPU
        samples = torch.from_numpy(host).to(self.device).permute(0, 3, 1, 2).contiguous()  # N, C_in, h, w
        return _map_samples(samples, first.channel_order, first.scale, kind == "f", config, self._grey)

    def differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """The same preprocessing for a batch of source images already in [0, 1] as a float tensor
        (N, C, h, w), C = 1 (mono) or 3 (RGB), on `config.device`, differentiable in `x` (attacks on
        the source image run through it). Raises BadImageError for a crop larger than the image."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise BadImageError(f"expected source images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")
        top, left, crop_height, crop_width = _crop_box(int(x.shape[2]), int(x.shape[3]), self.config)
        crop = x[:, :, top: top + crop_height, left: left + crop_width]
        return _map_samples(crop, "mono" if x.shape[1] == 1 else "rgb", 1.0, True, self.config, self._grey)


def _map_samples(samples: torch.Tensor, order: str, scale: float, is_float: bool, config: PreprocessConfig,
                 grey: torch.Tensor) -> torch.Tensor:
    """The device part of `Preprocessor`: cropped samples (N, C_in, h, w) in `order` -> model input."""
    if order in ("mono", "rgb"):
        selected = samples  # already in order (mono is replicated after the resize for colour models)
    else:
        selected = samples[:, list(RGB_INDEX[order])]  # RGB order, alpha dropped
    size = (config.output_height, config.output_width)
    # An area average sums up to hundreds of samples: summed in float64 (error ~1e-13), then
    # rounded once to float32, which keeps `preprocessing_float_error` near one float32 rounding.
    wide = config.resize == "area" and tuple(selected.shape[-2:]) != size
    x = selected.to(torch.float64 if wide else torch.float32)
    if is_float:
        x = (x * scale).clamp(0.0, 1.0)  # float frames are [0, 1] intensities by contract
        scale = 1.0
    # Resize first, colour and scale last: the same linear map (the colour matrix acts on channels,
    # the resize on pixels), and the colour conversion on the small output only.
    # The grey conversion is an explicit weighted sum, not a matmul, so TF32 settings cannot touch it.
    x = _resize(x, size, config.resize).to(torch.float32)
    if config.output_channels == 1 and order != "mono":
        x = (x * grey).sum(dim=1, keepdim=True)
    if scale != 1.0:
        x = x * scale
    if config.output_channels == 3 and order == "mono":
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0.0, 1.0).contiguous()


# ------------------------------------------------------------------------------ operator norm
FLOAT32_WEIGHT_SLACK = 1.0 + 8 * 2.0 ** -24
"""Relative enlargement of the operator norm for the float32 rounding of products of the
interpolation and colour weights (at most 4 roundings per entry of the non-negative map, so its
entries, and hence its l2 and linf norms, grow by at most that factor)."""
@functools.lru_cache(maxsize=512)
def _resize_matrix(source: int, target: int, mode: str, axis: str, dtype: torch.dtype = torch.float64,
                   device: str = "cpu") -> np.ndarray:
    """(target x source) float64 matrix of the 1-D resize along `axis` ("height" or "width"),
    obtained by applying `_resize` itself to the identity basis in `dtype` on `device`, in chunks to
    bound memory. In float32 this gives the interpolation weights exactly as `Preprocessor`
    computes them there (a unit sample times a weight is the weight)."""
    columns = []
    for start in range(0, source, 512):
        stop = min(source, start + 512)
        basis = torch.zeros(stop - start, source, dtype=dtype, device=device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        if axis == "height":
            out = _resize(basis.view(-1, 1, source, 1), (target, 1), mode)
        else:
            out = _resize(basis.view(-1, 1, 1, source), (1, target), mode)
        columns.append(out.reshape(stop - start, target).to(device="cpu", dtype=torch.float64).numpy())
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
    colour = colour_matrix(channel_order, config.output_channels)
    # The exact map (float64 weights) and the map with the float32 weights the preprocessing computes
    # on its device: the largest norm of each factor bounds every combination. `FLOAT32_WEIGHT_SLACK`
    # covers the rounding of the weights' products (entries of the float32 map's Jacobian);
    # `preprocessing_float_error` covers the rest of the arithmetic.
    colour_norm = max(_matrix_norm(colour, norm), _matrix_norm(colour.astype(np.float32), norm))
    factors = [colour_norm]
    for source, target, axis in ((crop_height, config.output_height, "height"),
                                 (crop_width, config.output_width, "width")):
        factors.append(max(_matrix_norm(_resize_matrix(source, target, config.resize, axis, dtype, config.device), norm)
                           for dtype in (torch.float64, torch.float32)))
    # round up: float64 SVD/summation error must not shrink the norm
    return math.prod(factors) * FLOAT32_WEIGHT_SLACK * (1.0 + 1e-12)


def preprocessing_operator_norm(source_height: int, source_width: int, channel_order: str,
                                config: PreprocessConfig, norm: str) -> float:
    """Exact operator norm ||P||, in `norm` ("l2" or "linf"), of the preprocessing's linear part P:
    source frame in [0, 1] units (raw * scale) -> model input in [0, 1] units, for a frame of
    `source_height` x `source_width` pixels in `channel_order` preprocessed with `config`.

    P = (C (x) R_h (x) R_w) S, with S the centre crop (a coordinate selection), C the
    (C_out x C_in) colour matrix (`colour_matrix`) and R_h, R_w the 1-D row and column resize
    matrices, built by applying the very resize `Preprocessor` uses to identity bases, in float64
    (the exact map) and in float32 on the configured device (the interpolation weights as the
    preprocessing computes them); the larger of the two norms is returned.
    S has orthonormal rows and zero-pads rows of the matrix it is composed with, so it changes
    neither norm. For the Kronecker product, ||A (x) B|| = ||A|| ||B|| both in l2 (singular values
    multiply) and in linf (absolute row sums multiply), so ||P|| = ||C|| ||R_h|| ||R_w||; e.g.
    grey from RGB: ||C||_2 = ||(0.299, 0.587, 0.114)||_2 = 0.6686, ||C||_inf = 1; mono replicated
    to 3 channels: sqrt(3) and 1. The non-linear steps do not increase it: clamping to [0, 1] is
    1-Lipschitz coordinate-wise (hence in every l_p norm), and quantisation happens before P (the
    source frame is already integer), so ||P(x) - P(y)|| <= ||P|| ||x - y|| for the whole map, up to
    the float32 rounding of the arithmetic, which `preprocessing_float_error` bounds. The result is
    rounded up by 1e-12 relative and cached per (height, width, channel order, config, norm).

    Raises:
        BadImageError: zero/implausible size, unknown channel order, crop larger than the frame.
        ValueError: unknown norm.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    config = dataclasses.replace(config, device=str(torch.device(config.device)))
    return _cached_operator_norm(int(source_height), int(source_width), channel_order, config, norm)


def preprocessing_float_error(source_height: int, source_width: int, channel_order: str,
                              config: PreprocessConfig, norm: str) -> float:
    """A bound e, in model-input [0, 1] units and `norm`, such that for any two frames x, x' of this
    geometry the model inputs `Preprocessor` computes satisfy ||P^(x) - P^(x')|| <= ||P|| ||x - x'|| + e.

    Per output pixel, the arithmetic differs from the linear map P by at most, in [0, 1] units (u =
    2^-24 for float32, v = 2^-53 for float64, gamma_k(u) = k u / (1 - k u)): the resize, a
    non-negative combination of k samples with weights summing to 1, evaluated in any order —
    bilinear in float32, k = 4: gamma_6(u); area in float64, k <= (ceil(h / H) + 1)(ceil(w / W) + 1):
    gamma_{k+2}(v) plus u for the rounding to float32 (uint8 whole-number area: exact integer block
    sums, then u for the float32 division, which is less); then the grey weighting, a 3-term weighted
    sum (gamma_4(u)), the float32 grey weights, the scaling by `DecodedImage.scale` and the float32
    cast of float64 frames (u each, plus one spare u), all times 1.01 for second-order terms.
    Integer samples are exact; clamps only shrink differences. Over the output: l2 `sqrt(C H W)`
    times that, linf that; twice (once for x, once for x').
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    check_frame_size(int(source_height), int(source_width))
    _, _, crop_height, crop_width = _crop_box(int(source_height), int(source_width), config)
    out_height, out_width = config.output_height, config.output_width

    def gamma(count: int, unit: float) -> float:
        return count * unit / (1.0 - count * unit)

    single, double = 2.0 ** -24, 2.0 ** -53
    if (crop_height, crop_width) == (out_height, out_width):
        resize = 0.0
    elif config.resize == "bilinear":
        resize = gamma(6, single)
    else:
        taps = (math.ceil(crop_height / out_height) + 1) * (math.ceil(crop_width / out_width) + 1)
        resize = gamma(taps + 2, double) + single
    per_pixel = (resize + gamma(4, single) + 4.0 * single) * 1.01
    pixels = config.output_channels * out_height * out_width
    return 2.0 * per_pixel * (math.sqrt(pixels) * (1.0 + 1e-12) if norm == "l2" else 1.0)


def image_radius(certified_radius: float, operator_norm: float, float_error: float = 0.0) -> float:
    """Certified radius carried back to the source image, in source [0, 1] units and the same norm.

    A source perturbation d with ||d|| <= (r - e) / ||P|| reaches the model input as
    ||P^(x + d) - P^(x)|| <= ||P|| ||d|| + e <= r (e = `float_error`, from
    `preprocessing_float_error`), so the prediction certified within `certified_radius` r at the
    model input is certified within (r - e) / ||P|| in the source image. Computed with outward
    rounding (the result is never above the exact value). Returns 0 (no claim) when the norm is
    unknown, zero, negative or non-finite, when the radius is negative or non-finite, or when
    r <= e.
    """
    try:
        radius, norm, error = float(certified_radius), float(operator_norm), float(float_error)
    except (TypeError, ValueError):
        return 0.0
    if not (math.isfinite(norm) and norm > 0.0 and math.isfinite(radius) and radius > 0.0
            and math.isfinite(error) and error >= 0.0):
        return 0.0
    reduced = radius - error
    if Fraction(reduced) > Fraction(radius) - Fraction(error):  # rounded up: take the float below
        reduced = math.nextafter(reduced, -math.inf)
    if not reduced > 0.0:
        return 0.0
    quotient = reduced / norm
    if Fraction(quotient) > Fraction(reduced) / Fraction(norm):
        quotient = math.nextafter(quotient, 0.0)
    return quotient
