"""Fashion-MNIST (the real data set available offline here) and image folders.

Fashion-MNIST: 60 000 train / 10 000 test grey 28x28 images, 10 classes, MIT licence; on Debian
it is the package `dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist/).
Set MIXCLF_FASHION_MNIST_DIR to read the four gzip IDX files from elsewhere.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

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


def load_image_folder(path: str | Path, height: int, width: int, channels: int) -> tuple[torch.Tensor, np.ndarray,
                                                                                      list[str]]:
    """Images from `path/<class name>/*` (classes in sorted order), resized with area averaging.

    Returns (float32 (N, channels, height, width) in [0, 1], int64 labels (N,), class names)."""
    import cv2

    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetMissingError(f"{root}: no class sub-folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            pixels = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
            if pixels is None:
                continue  # not an image
            pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
            if channels == 3:
                pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
            images.append(pixels)
            labels.append(label)
    if not images:
        raise DatasetMissingError(f"{root}: no readable images")
    return to_tensor(np.stack(images)), np.array(labels, dtype=np.int64), classes
