"""The evaluated images: the Fashion-MNIST test set or an image folder, turned into model inputs by the
node's own preprocessing (`vision.preprocess.Preprocessor`), and the seeded subsets of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixclf_ros.evaluation.settings import EvaluationError


@dataclass(frozen=True)
class DataSettings:
    """Which images, and how they become model inputs.

    image_folder: one sub-folder per class, named by a class name or index of the model (None: the
        Fashion-MNIST test set). class_map: YAML/JSON file {folder: class name or index}.
    crop_height, crop_width, resize: the model config keys of the same names (centre crop in source
        pixels, 0 = none; "area" or "bilinear"); None: each model's own (`evaluation.input_space`).
        The crop applies to image-folder images only.
    limit: evaluate a seeded random subset of this many images (None: all). seed: of that subset.
    """

    image_folder: str | None = None
    class_map: str | None = None
    crop_height: int | None = 0
    crop_width: int | None = 0
    resize: str | None = "area"
    limit: int | None = None
    seed: int = 0


def subset_indices(num_items: int, limit: int | None, seed: int) -> torch.Tensor:
    """Indices of the evaluated images: all of them (in order) when `limit` is None, 0 or >=
    `num_items`; otherwise `data.evaluation_subset` (a seeded random subset, ascending)."""
    from mixclf_ros import data

    if limit is None or limit <= 0 or limit >= num_items:
        return torch.arange(num_items)
    return torch.as_tensor(data.evaluation_subset(limit, seed, num_items)).long()


@dataclass
class EvaluationData:
    """Images (N, C, H, W) float32 in [0, 1] at the model input, labels (N,) int64, and where they
    came from (`preprocessing`: the `PreprocessConfig` fields that made them). `skipped`: files that
    are not images; `warnings`: what the console must say about the data (empty class folders, a crop
    not applied), also written to the JSON report."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str
    total_available: int
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def load_evaluation_data(model: Any, settings: DataSettings, folder_as_source: bool = False) -> EvaluationData:
    """The evaluated data at the input of `model` (a loaded model: `input_shape` (C, H, W),
    `num_classes`, `class_names`), through `vision.preprocess.Preprocessor` as in the node.

    Fashion-MNIST (default): the 28x28 grey test images are decoded frames of their own (no crop),
    resized and colour-converted to the model input. Image folder: `data.load_image_folder`, each
    file decoded like a `CompressedImage` and preprocessed with the crop and resize mode of
    `settings`; folders are matched to the model's classes by name or index, never by order.
    `folder_as_source`: the image-folder images as they are, [0, 1] grey or RGB at their own size
    (all one size), for a pair of models that preprocess differently (`evaluation.input_space`).
    """
    from mixclf_ros import data
    from mixclf_ros.vision.decode import BadImageError, DecodedImage
    from mixclf_ros.vision.preprocess import PreprocessConfig, Preprocessor

    channels, height, width = (int(v) for v in model.input_shape)
    class_names = [str(name) for name in getattr(model, "class_names", None) or []]
    num_classes = int(model.num_classes)
    folder = settings.image_folder is not None
    try:
        config = PreprocessConfig(output_channels=channels, output_height=height, output_width=width,
                                  crop_height=settings.crop_height if folder else 0,
                                  crop_width=settings.crop_width if folder else 0, resize=settings.resize)
    except ValueError as error:
        raise EvaluationError(f"preprocessing: {error}") from error
    described = {"crop_height": config.crop_height, "crop_width": config.crop_width, "resize": config.resize,
                 "output": [channels, height, width], "path": "vision.preprocess.Preprocessor"}
    if not folder:
        raw_images, raw_labels = data.load_fashion_mnist("test")
        chosen = subset_indices(len(raw_labels), settings.limit, settings.seed)
        frames = [DecodedImage(image[:, :, None], "mono", 1 / 255) for image in raw_images[chosen.numpy()]]
        images = Preprocessor(config)(frames)
        labels = torch.as_tensor(raw_labels).long()[chosen]
        return EvaluationData(images, labels, "Fashion-MNIST test set", len(raw_labels),
                              list(data.FASHION_MNIST_CLASSES), described)
    root = settings.image_folder
    if not Path(root).is_dir():
        raise EvaluationError(f"--image-folder {root}: not a directory")
    try:
        class_map = data.read_class_map(settings.class_map) if settings.class_map else None
        loaded = data.load_image_folder(root, None if folder_as_source else config, class_names, num_classes,
                                        class_map)
    except FileNotFoundError as error:
        raise EvaluationError(f"--image-folder {root}: {error}") from error
    except (data.ImageFolderError, BadImageError) as error:
        raise EvaluationError(f"--image-folder {root}: {error}") from error
    chosen = subset_indices(len(loaded.labels), settings.limit, settings.seed)
    names = class_names or [str(index) for index in range(num_classes)]
    described["folders"] = {name: names[label] for name, label in loaded.folders.items()}
    warnings = [f"--image-folder {root}: class folder {name} has no image; class {names[loaded.folders[name]]} is "
                "not evaluated" for name in loaded.empty]
    return EvaluationData(loaded.images[chosen], torch.as_tensor(loaded.labels).long()[chosen],
                          f"image folder {root}", len(loaded.labels), names, described, loaded.skipped, warnings)
