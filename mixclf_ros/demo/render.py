"""Rendering for the demo camera: a 28x28 article embedded in a camera frame, and the perturbation
budgets and quantisation that go with it."""

from __future__ import annotations

import math

import numpy as np

# ------------------------------------------------------------------------------ rendering (demo camera)
ARTICLE_SCALE = 17
"""The demo camera renders each 28x28 article at this many frame pixels per article pixel (476x476,
centred in a 640x480 frame; the shipped `crop_height`/`crop_width` of 476 undo it)."""


def embed_article(article: np.ndarray, frame_height: int = 480, frame_width: int = 640,
                  scale: int = ARTICLE_SCALE) -> np.ndarray:
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
