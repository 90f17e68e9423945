"""Fashion-MNIST (the real data set available offline here) and image folders.

Fashion-MNIST: 60 000 train / 10 000 test grey 28x28 images, 10 classes, MIT licence; on Debian
it is the package `dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist/).
Set MIXCLF_FASHION_MNIST_DIR to read the four gzip IDX files from elsewhere.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mixclf_ros.vision.preprocess import PreprocessConfig

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}


class DatasetMissingError(FileNotFoundError):
    """The data files are not where they should be."""


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("MIXCLF_FASHION_MNIST_DIR", DEFAULT_DIR))


def _read_idx(path: Path, expected_dims: tuple[int, ...]) -> np.ndarray:
    """Reads a gzip IDX file of unsigned bytes and checks its header against `expected_dims`."""
    if not path.exists():
        raise DatasetMissingError(
            f"{path} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
            f"(or `make setup`), or set MIXCLF_FASHION_MNIST_DIR to a folder with the four .gz files")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a readable gzip file ({error}); reinstall dataset-fashion-mnist") from error
    magic = int.from_bytes(raw[:4], "big")
    dims = magic & 0xFF
    if magic >> 8 != 0x08 or dims != len(expected_dims):  # 0x08: unsigned byte data
        raise ValueError(f"{path}: not an IDX file of {len(expected_dims)}-D unsigned bytes (magic {magic:#x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    if shape != expected_dims:
        raise ValueError(f"{path}: shape {shape}, expected {expected_dims} (truncated or wrong file?)")
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} values, header says {int(np.prod(shape))}")
    return data.reshape(shape)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 (N, 28, 28), labels int64 (N,)) of the 'train' or 'test' split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got '{split}'")
    images_file, labels_file, count = _FILES[split]
    directory = fashion_mnist_dir()
    images = _read_idx(directory / images_file, (count, 28, 28))
    labels = _read_idx(directory / labels_file, (count,)).astype(np.int64)
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{directory / labels_file}: label {labels.max()} out of range")
    return images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0)
    return tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def evaluation_subset(n: int = 1000, seed: int = 0, total: int = 10_000) -> np.ndarray:
    """A fixed random subset of test indices (sorted), the same on every machine."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


class ImageFolderError(ValueError):
    """An image folder whose class sub-folders do not match the model's classes."""


def _name_key(name: str) -> str:
    """Case and punctuation folded: "T-shirt/top", "t-shirt_top" and "TShirtTop" compare equal."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _class_index(name: str, class_names: Sequence[str], num_classes: int) -> int | None:
    """The class a folder (or mapping entry) called `name` stands for: a class name (exact, else
    case and punctuation folded when that is unambiguous) or a class index 0..num_classes-1."""
    if name in class_names:
        return list(class_names).index(name)
    folded = [index for index, known in enumerate(class_names) if _name_key(known) == _name_key(name)]
    if len(folded) == 1 and _name_key(name):
        return folded[0]
    if re.fullmatch(r"\d+", name.strip()) and int(name) < num_classes:
        return int(name)
    return None


def read_class_map(path: str | Path) -> dict[str, str]:
    """A class mapping file: YAML or JSON `{folder name: class name or class index}`."""
    import yaml

    try:
        content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ImageFolderError(f"class map {path}: {error}") from error
    if not isinstance(content, dict) or not content:
        raise ImageFolderError(f"class map {path}: expected a mapping 'folder name: class name or index'")
    return {str(folder): str(value) for folder, value in content.items()}


def folder_labels(folders: Sequence[str], class_names: Sequence[str], num_classes: int,
                  class_map: dict[str, str] | None = None) -> dict[str, int]:
    """`{folder: label}` for the class sub-folders of an image folder.

    A folder names its class by a class name of the model (exact, or case and punctuation folded:
    a '/' in a class name, which a folder name cannot hold, is written '_' or left out, so
    'T-shirt_top' and 'tshirttop' name 'T-shirt/top') or by a class index 0..num_classes-1.
    `class_map` ({folder: class name or index}) adds to that: a folder listed there takes the
    class it maps to, the others are matched by name. Never by alphabetical order.
    Raises:
        ImageFolderError: a folder that names no class (listing the classes), or two folders for the
            same class by name (the map may give one class several folders on purpose).
    """
    if class_names and len(class_names) != num_classes:
        raise ImageFolderError(f"{len(class_names)} class names for {num_classes} classes")
    if class_map is None and len(folders) > num_classes:
        raise ImageFolderError(f"{len(folders)} class folders for a model with {num_classes} classes: "
                               f"{', '.join(folders)}; remove the extra ones or give a class map "
                               "(--class-map FILE: 'folder: class name or index')")
    labels: dict[str, int] = {}
    unknown = []
    for folder in folders:
        target = (class_map or {}).get(folder, folder)
        index = _class_index(target, class_names, num_classes)
        if index is None:
            unknown.append(folder if target == folder else f"{folder} -> {target}")
        else:
            labels[folder] = index
    if unknown:
        known = (", ".join(repr(name) for name in class_names) + " or " if class_names else "") + \
            f"an index 0..{num_classes - 1}"
        raise ImageFolderError(f"{len(unknown)} class folder(s) name no class of the model: "
                               f"{', '.join(sorted(unknown))}; use {known} as folder names (case and "
                               "punctuation are ignored; a '/' in a class name is written '_' or left out, "
                               "e.g. 'T-shirt/top' -> 'T-shirt_top'), or map them with a class map "
                               "(--class-map FILE: 'folder: class name or index', for the folders it lists)")
    by_label: dict[int, list[str]] = {}
    for folder, label in labels.items():
        if folder not in (class_map or {}):
            by_label.setdefault(label, []).append(folder)
    shared = [folders_of for folders_of in by_label.values() if len(folders_of) > 1]
    if shared:
        raise ImageFolderError(f"folders {', '.join(sorted(shared[0]))} name the same class; merge them or "
                               "give a class map that maps them on purpose")
    return labels


@dataclass
class ImageFolder:
    """Images of `path/<class>/*` at the model input and their labels.

    images: float32 (N, C, H, W) in [0, 1]. labels: int64 (N,). folders: {folder: label}.
    skipped: files that are not decodable images (relative paths). empty: class folders with no
    image (their class is not evaluated).
    """

    images: torch.Tensor
    labels: np.ndarray
    folders: dict[str, int]
    skipped: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def load_image_folder(path: str | Path, preprocess: PreprocessConfig | None, class_names: Sequence[str],
                      num_classes: int, class_map: dict[str, str] | None = None) -> ImageFolder:
    """Images from `path/<class>/*`, labelled by `folder_labels`, through the node's own path: each
    file is decoded as a `sensor_msgs/CompressedImage` payload (`vision.decode.decode_compressed`)
    and preprocessed by `vision.preprocess.Preprocessor` with `preprocess` (centre crop, colour,
    resize mode, model input size), so the images are exactly what the node classifies.
    `preprocess` None: the source images themselves, [0, 1] (N, 1 or 3, H, W) as each model's
    preprocessing takes them (grey or RGB, alpha dropped); they must all have one size and colour.

    Raises:
        DatasetMissingError: no class sub-folders or no readable image.
        ImageFolderError: folders that do not name the model's classes (see `folder_labels`).
        BadImageError: an image the node would refuse too (e.g. smaller than the crop).
    """
    from mixclf_ros.vision.decode import BadImageError, decode_compressed
    from mixclf_ros.vision.preprocess import PreprocessConfig, Preprocessor

    root = Path(path)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DatasetMissingError(f"{root}: no class sub-folders")
    labels_of = folder_labels(folders, class_names, num_classes, class_map)
    preprocessor = Preprocessor(replace(preprocess, device="cpu")) if preprocess is not None else None
    source = None
    images, labels, skipped, empty = [], [], [], []
    for folder in folders:
        found = len(images)
        for file in sorted(p for p in (root / folder).iterdir() if p.is_file()):
            try:
                decoded = decode_compressed(file.suffix.lstrip(".") or "unknown", file.read_bytes())
            except BadImageError:
                skipped.append(f"{folder}/{file.name}")
                continue
            try:
                if preprocessor is None:  # the source: identity size, no crop
                    height, width = decoded.pixels.shape[:2]
                    shape = (1 if decoded.channel_order == "mono" else 3, height, width)
                    if source is None:
                        source = (shape, Preprocessor(PreprocessConfig(*shape)))
                    elif shape != source[0]:
                        raise ImageFolderError(f"{file}: {shape[0]}x{shape[1]}x{shape[2]} (channels x height x width), "
                                               f"the first image {'x'.join(map(str, source[0]))}: a pair of models "
                                               "that preprocess differently is evaluated on the source images, "
                                               "which must all have one size and colour")
                    images.append(source[1]([decoded]))
                else:
                    images.append(preprocessor([decoded]))
            except BadImageError as error:
                raise BadImageError(f"{file}: {error}") from None
            labels.append(labels_of[folder])
        if len(images) == found:
            empty.append(folder)
    if not images:
        raise DatasetMissingError(f"{root}: no readable images")
    return ImageFolder(torch.cat(images), np.array(labels, dtype=np.int64), labels_of, skipped, empty)
