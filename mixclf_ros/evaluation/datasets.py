"""The evaluated images: the Fashion-MNIST test set or an image folder, at the model input, and the
seeded subsets of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mixclf_ros.evaluation.settings import EvaluationError


def subset_indices(num_items: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of the evaluated images: all of them (in order) when `limit` is None, 0 or >=
    `num_items`; otherwise `data.evaluation_subset` (a seeded random subset, ascending)."""
    from mixclf_ros import data

    if limit is None or limit <= 0 or limit >= num_items:
        return torch.arange(num_items)
    return torch.as_tensor(data.evaluation_subset(limit, seed, num_items)).long()


def fit_to_model_input(images: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """Converts [0,1] images (N, C, H, W) to the model's (C, H, W): grey <-> RGB (ITU-R BT.601
    luma for RGB -> grey) and area (down) / bilinear (up) resizing. Unchanged if already equal."""
    channels, height, width = (int(v) for v in input_shape)
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif images.shape[1] == 3 and channels == 1:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
            images = (images * luma).sum(dim=1, keepdim=True)
        else:
            raise EvaluationError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if tuple(images.shape[2:]) != (height, width):
        shrinking = height <= images.shape[2] and width <= images.shape[3]
        images = F.interpolate(images, size=(height, width), mode="area" if shrinking else "bilinear",
                               **({} if shrinking else {"align_corners": False}))
    return images.clamp(0.0, 1.0).contiguous()


@dataclass
class EvaluationData:
    """Images (N, C, H, W) float32 in [0, 1] at the model input, labels (N,) int64, and where they
    came from."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    total_available: int
    class_names: list[str] = field(default_factory=list)


def load_evaluation_data(input_shape: Sequence[int], image_folder: str | None = None,
                         limit: int | None = None, seed: int = 0) -> EvaluationData:
    """The Fashion-MNIST test set (default) or an image folder (`data.load_image_folder`: one
    sub-folder per class, classes in sorted order), a seeded subset of `limit` images, at the
    model's `input_shape` (C, H, W)."""
    from mixclf_ros import data

    channels, height, width = (int(v) for v in input_shape)
    if image_folder is None:
        raw_images, raw_labels = data.load_fashion_mnist("test")
        chosen = subset_indices(len(raw_labels), limit, seed)
        images = fit_to_model_input(data.to_tensor(raw_images[chosen.numpy()]), input_shape)
        labels = torch.as_tensor(raw_labels).long()[chosen]
        return EvaluationData(images, labels, "Fashion-MNIST test set", len(raw_labels),
                              list(data.FASHION_MNIST_CLASSES))
    if not Path(image_folder).is_dir():
        raise EvaluationError(f"--image-folder {image_folder}: not a directory")
    all_images, all_labels, class_names = data.load_image_folder(image_folder, height, width, channels)
    chosen = subset_indices(len(all_labels), limit, seed)
    return EvaluationData(all_images[chosen], torch.as_tensor(all_labels).long()[chosen],
                          f"image folder {image_folder}", len(all_labels), list(class_names))
