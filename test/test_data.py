"""mixclf_ros.data: the Fashion-MNIST IDX loader, `to_tensor`, the fixed evaluation subset, image folders.

The loader tests read the real data set (Debian package `dataset-fashion-mnist`); the failure tests
point MIXCLF_FASHION_MNIST_DIR at folders written in tmp_path.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mixclf_ros import data
from mixclf_ros.data import (
    FASHION_MNIST_CLASSES,
    DatasetMissingError,
    ImageFolderError,
    evaluation_subset,
    folder_labels,
    load_fashion_mnist,
    load_image_folder,
    read_class_map,
    to_tensor,
)
from mixclf_ros.vision.decode import decode_compressed
from mixclf_ros.vision.preprocess import PreprocessConfig, Preprocessor

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
TEST_IMAGES_FILE, TEST_LABELS_FILE = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def idx_bytes(array: np.ndarray) -> bytes:
    """Uncompressed IDX encoding of an unsigned-byte array: magic 0x0000 08 <dims>, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_test_split(folder: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    """Writes a well-formed gzip IDX 'test' split (images (N, 28, 28), labels (N,)) into `folder`."""
    images_path, labels_path = folder / TEST_IMAGES_FILE, folder / TEST_LABELS_FILE
    images_path.write_bytes(gzip.compress(idx_bytes(images)))
    labels_path.write_bytes(gzip.compress(idx_bytes(labels)))
    return images_path, labels_path


def run_python(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter on this checkout (one thread, a different hash seed)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    environment.pop("MIXCLF_FASHION_MNIST_DIR", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


@pytest.fixture(scope="module", params=sorted(SPLIT_SIZES))
def split(request: pytest.FixtureRequest) -> tuple[str, np.ndarray, np.ndarray]:
    if "MIXCLF_FASHION_MNIST_DIR" in os.environ:
        pytest.fail("MIXCLF_FASHION_MNIST_DIR is set in the environment; these tests read the installed data set")
    images, labels = load_fashion_mnist(request.param)
    return request.param, images, labels


@pytest.fixture(scope="module")
def split_labels() -> np.ndarray:
    return load_fashion_mnist("test")[1]


# ------------------------------------------------------------------------------ real data set
def test_split_shapes_dtypes_and_ranges(split: tuple[str, np.ndarray, np.ndarray]):
    name, images, labels = split
    count = SPLIT_SIZES[name]
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == len(FASHION_MNIST_CLASSES) - 1
    # Fashion-MNIST is exactly balanced: 6 000 / 1 000 images per class.
    assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    # real images: full uint8 range used, black background (border pixels mostly 0), not constant
    assert images.min() == 0 and images.max() == 255
    assert np.mean(images[:, 0, :] == 0) > 0.5
    assert 50 < images.mean() < 100  # the known mean pixel value is 0.286 * 255 ~ 72.9


def test_splits_differ_and_images_are_distinct(split: tuple[str, np.ndarray, np.ndarray]):
    _, images, _ = split
    first = images[:200].reshape(200, -1)
    assert len({row.tobytes() for row in first}) == 200


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("validation")


# ------------------------------------------------------------------------------ missing / broken files
def test_missing_dataset_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MIXCLF_FASHION_MNIST_DIR", str(tmp_path))
    assert data.fashion_mnist_dir() == tmp_path
    with pytest.raises(DatasetMissingError) as caught:
        load_fashion_mnist("test")
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path) in message and "MIXCLF_FASHION_MNIST_DIR" in message
    assert isinstance(caught.value, FileNotFoundError)  # callers catching FileNotFoundError still work


def test_environment_variable_selects_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 10_000).astype(np.uint8)
    write_test_split(tmp_path, images, labels)
    monkeypatch.setenv("MIXCLF_FASHION_MNIST_DIR", str(tmp_path))
    loaded_images, loaded_labels = load_fashion_mnist("test")
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels.astype(np.int64))
    assert loaded_labels.dtype == np.int64


def _truncated_gzip(valid: bytes) -> bytes:
    return gzip.compress(valid)[: len(gzip.compress(valid)) // 2]


def _corrupted_gzip(valid: bytes) -> bytes:
    compressed = bytearray(gzip.compress(valid))
    compressed[2] = 0x63  # compression method byte: only 8 (deflate) exists
    return bytes(compressed)


def _truncated_payload(valid: bytes) -> bytes:
    return gzip.compress(valid[: len(valid) - 100])  # gzip fine, IDX data shorter than its header says


def _wrong_magic(valid: bytes) -> bytes:
    return gzip.compress(b"\x00\x00\x0d" + valid[3:])  # 0x0D: float data


def _wrong_shape(valid: bytes) -> bytes:
    return gzip.compress(valid[:4] + (9_999).to_bytes(4, "big") + valid[8:])


def _not_gzip(valid: bytes) -> bytes:
    return valid  # an uncompressed IDX file under a .gz name


BROKEN_LABEL_FILES = {
    "truncated gzip stream": _truncated_gzip,
    "corrupted gzip header": _corrupted_gzip,
    "uncompressed file": _not_gzip,
    "truncated IDX payload": _truncated_payload,
    "wrong IDX magic": _wrong_magic,
    "wrong IDX shape": _wrong_shape,
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(BROKEN_LABEL_FILES))
def test_broken_idx_file_raises_a_clear_value_error(damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every broken file raises ValueError naming the file, never EOFError/OSError/zlib.error."""
    rng = np.random.default_rng(0)
    _, labels_path = write_test_split(tmp_path, rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8),
                                      rng.integers(0, 10, 10_000).astype(np.uint8))
    labels_path.write_bytes(BROKEN_LABEL_FILES[damage](idx_bytes(rng.integers(0, 10, 10_000).astype(np.uint8))))
    monkeypatch.setenv("MIXCLF_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError) as caught:
        load_fashion_mnist("test")
    assert str(labels_path) in str(caught.value), f"message does not name the file: {caught.value}"


def test_label_out_of_range_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    labels = np.zeros(10_000, np.uint8)
    labels[1234] = 10
    _, labels_path = write_test_split(tmp_path, np.zeros((10_000, 28, 28), np.uint8), labels)
    monkeypatch.setenv("MIXCLF_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="label 10 out of range") as caught:
        load_fashion_mnist("test")
    assert str(labels_path) in str(caught.value)


# ------------------------------------------------------------------------------ to_tensor
def test_to_tensor_grey_batch():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    tensor = to_tensor(images)
    assert tensor.shape == (2, 1, 3, 4) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    assert float(to_tensor(np.array([[[0, 255]]], np.uint8)).min()) == 0.0
    assert float(to_tensor(np.array([[[0, 255]]], np.uint8)).max()) == 1.0


def test_to_tensor_colour_batch_is_channels_first():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    tensor = to_tensor(images)
    assert tensor.shape == (3, 3, 5, 7) and tensor.is_contiguous()
    for channel in range(3):
        np.testing.assert_allclose(tensor[:, channel].numpy(), images[..., channel] / 255.0, atol=1e-7)


def test_to_tensor_does_not_touch_its_input_and_takes_views():
    images = np.full((4, 6, 6), 200, np.uint8)
    view = images[:, ::2, 1:]  # non-contiguous
    tensor = to_tensor(view)
    assert tensor.shape == (4, 1, 3, 5)
    tensor.zero_()
    assert (images == 200).all()


@pytest.mark.slow
def test_to_tensor_accepts_the_loader_output_without_warnings():
    """load_fashion_mnist returns read-only arrays (views of the decompressed bytes); converting
    them must not trigger torch's 'non-writable array' UserWarning. torch emits that warning once
    per process, so this runs in a fresh interpreter where it cannot have fired already."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from mixclf_ros.data import load_fashion_mnist, to_tensor\n"
            "images, _ = load_fashion_mnist('test')\n"
            "tensor = to_tensor(images[:8])\n"
            "assert tuple(tensor.shape) == (8, 1, 28, 28)\n"
            "assert abs(float(tensor.sum()) * 255 - float(images[:8].sum())) < 1\n")
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------ evaluation subset
def test_evaluation_subset_is_a_fixed_sorted_sample():
    subset = evaluation_subset()
    assert subset.shape == (1000,) and np.issubdtype(subset.dtype, np.integer)
    assert (np.diff(subset) > 0).all()  # sorted, no repeats
    assert subset.min() >= 0 and subset.max() < 10_000
    np.testing.assert_array_equal(subset, evaluation_subset())
    np.testing.assert_array_equal(evaluation_subset(50, seed=7), evaluation_subset(50, seed=7))
    assert not np.array_equal(evaluation_subset(seed=0), evaluation_subset(seed=1))
    # spread over the whole test set, not a prefix
    assert subset.max() > 9_000 and subset.min() < 1_000


@pytest.mark.slow
def test_evaluation_subset_is_the_same_in_a_fresh_interpreter():
    code = "import json; from mixclf_ros.data import evaluation_subset; print(json.dumps(evaluation_subset().tolist()))"
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == evaluation_subset().tolist()


def test_evaluation_subset_is_class_balanced_enough(split_labels: np.ndarray):
    counts = np.bincount(split_labels[evaluation_subset()], minlength=10)
    assert counts.sum() == 1000 and counts.min() >= 70  # a random 10 % sample of a balanced set


# ------------------------------------------------------------------------------ image folders
def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels), path


def block_means(pixels: np.ndarray, factor: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    return pixels.reshape(height // factor, factor, width // factor, factor, -1).mean(axis=(1, 3)).squeeze(-1)


def preprocess(height: int, width: int, channels: int, **crop) -> PreprocessConfig:
    return PreprocessConfig(output_channels=channels, output_height=height, output_width=width, **crop)


def test_image_folder_grey(tmp_path: Path):
    rng = np.random.default_rng(2)
    shirt = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    bag_a = np.full((8, 8), 255, np.uint8)
    bag_b = rng.integers(0, 256, (12, 4), dtype=np.uint8)  # another size, resized too
    write_png(tmp_path / "Shirt" / "one.png", shirt)
    write_png(tmp_path / "Bag" / "a.png", bag_a)
    write_png(tmp_path / "Bag" / "b.png", bag_b)
    (tmp_path / "Bag" / "notes.txt").write_text("not an image")
    (tmp_path / "README").write_text("a file at the top level is not a class")

    loaded = load_image_folder(tmp_path, preprocess(4, 4, 1), FASHION_MNIST_CLASSES, 10)
    assert loaded.folders == {"Bag": 8, "Shirt": 6}  # the model's class indices, not the folder order
    assert loaded.skipped == ["Bag/notes.txt"]
    assert loaded.images.shape == (3, 1, 4, 4) and loaded.images.dtype == torch.float32
    assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == [8, 8, 6]  # Bag/a, Bag/b, Shirt/one
    np.testing.assert_allclose(loaded.images[0, 0].numpy(), 1.0)
    # area resize by an integer factor is the block mean, in float (no rounding to uint8 on the way)
    np.testing.assert_allclose(loaded.images[2, 0].numpy(), block_means(shirt, 2) / 255.0, rtol=1e-6)


def test_image_folder_goes_through_the_nodes_preprocessing(tmp_path: Path):
    """Decoded as a CompressedImage and preprocessed by the node's Preprocessor: centre crop, then
    area resize in float. A uint8 resize of the whole frame (no crop) gives other inputs."""
    rng = np.random.default_rng(5)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    write_png(tmp_path / "3" / "frame.png", frame)
    config = preprocess(12, 12, 1, crop_height=36, crop_width=36)
    loaded = load_image_folder(tmp_path, config, [], 10)
    expected = Preprocessor(config)([decode_compressed("png", (tmp_path / "3" / "frame.png").read_bytes())])
    assert loaded.labels.tolist() == [3]
    assert torch.equal(loaded.images, expected)
    uncropped = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (12, 12), interpolation=cv2.INTER_AREA)
    assert not np.allclose(loaded.images[0, 0].numpy(), uncropped / 255.0, atol=0.05)


def test_image_folder_colour_is_rgb(tmp_path: Path):
    red_in_bgr = np.zeros((6, 6, 3), np.uint8)
    red_in_bgr[..., 2] = 255  # OpenCV writes BGR: this is pure red
    write_png(tmp_path / "1" / "r.png", red_in_bgr)
    write_png(tmp_path / "0" / "g.png", np.full((6, 6), 100, np.uint8))

    loaded = load_image_folder(tmp_path, preprocess(3, 3, 3), [], 2)
    assert loaded.labels.tolist() == [0, 1]
    assert loaded.images.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(loaded.images[1, 0].numpy(), 1.0)  # red channel first
    np.testing.assert_allclose(loaded.images[1, 1:].numpy(), 0.0)
    np.testing.assert_allclose(loaded.images[0].numpy(), 100 / 255.0, atol=1e-6)  # grey file -> 3 equal channels


def test_image_folder_colour_file_read_as_grey(tmp_path: Path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 1] = 200  # pure green
    write_png(tmp_path / "0" / "green.png", colour)
    loaded = load_image_folder(tmp_path, preprocess(4, 4, 1), [], 1)
    assert loaded.images.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(loaded.images.numpy(), 0.587 * 200 / 255.0, atol=1e-6)  # BT.601 luma


def test_image_folder_without_classes_or_images(tmp_path: Path):
    with pytest.raises(DatasetMissingError, match="no class sub-folders"):
        load_image_folder(tmp_path, preprocess(28, 28, 1), [], 10)
    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "a.txt").write_text("hello")
    with pytest.raises(DatasetMissingError, match="no readable images"):
        load_image_folder(tmp_path, preprocess(28, 28, 1), [], 10)


def test_image_folder_that_does_not_exist(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(missing, preprocess(28, 28, 1), [], 10)


# ------------------------------------------------------------------------------ folder names -> classes
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_folders_named_like_the_classes_get_those_labels_not_the_alphabetical_order():
    folders = ["Ankle boot", "bag", "coat", "DRESS", "pullover", "sandal", "shirt", "sneaker", "t-shirt_top",
               "Trouser"]
    labels = folder_labels(folders, FASHION_MNIST_CLASSES, 10)
    assert labels == {"Ankle boot": 9, "bag": 8, "coat": 4, "DRESS": 3, "pullover": 2, "sandal": 5, "shirt": 6,
                      "sneaker": 7, "t-shirt_top": 0, "Trouser": 1}
    assert folder_labels([str(i) for i in range(10)], FASHION_MNIST_CLASSES, 10) == {str(i): i for i in range(10)}


def test_folders_that_name_no_class_are_refused_with_the_class_list():
    with pytest.raises(ImageFolderError, match=r"10 class folder\(s\) name no class.*'Trouser'"):
        folder_labels(DIGIT_WORDS, FASHION_MNIST_CLASSES, 10)
    with pytest.raises(ImageFolderError, match=r"index 0\.\.9"):
        folder_labels(DIGIT_WORDS, [], 10)


def test_an_eleventh_folder_is_a_clear_error_not_an_index_error():
    with pytest.raises(ImageFolderError, match="11 class folders for a model with 10 classes"):
        folder_labels([str(i) for i in range(11)], [], 10)
    with pytest.raises(ImageFolderError, match="11 class folders for a model with 10 classes"):
        folder_labels([*FASHION_MNIST_CLASSES[:9], "Ankle_boot", "Umbrella"], FASHION_MNIST_CLASSES, 10)


def test_two_folders_for_one_class_need_a_class_map():
    with pytest.raises(ImageFolderError, match="name the same class"):
        folder_labels(["Bag", "bag"], FASHION_MNIST_CLASSES, 10)
    assert folder_labels(["Bag", "bags"], FASHION_MNIST_CLASSES, 10, {"Bag": "Bag", "bags": "8"}) == {"Bag": 8,
                                                                                                      "bags": 8}


def test_class_map_file(tmp_path: Path):
    (tmp_path / "map.yaml").write_text("".join(f"{word}: {index}\n" for index, word in enumerate(DIGIT_WORDS)))
    mapping = read_class_map(tmp_path / "map.yaml")
    assert folder_labels(DIGIT_WORDS, [], 10, mapping) == {word: i for i, word in enumerate(DIGIT_WORDS)}
    with pytest.raises(ImageFolderError, match="extra"):
        folder_labels([*DIGIT_WORDS, "extra"], [], 10, mapping)
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ImageFolderError, match="expected a mapping"):
        read_class_map(tmp_path / "bad.yaml")


def test_a_class_map_adds_to_the_folder_names():
    """Folders the map does not list keep their match by name (the map used to replace it, refusing them)."""
    assert folder_labels(["Trouser", "zero", "t-shirt_top"], FASHION_MNIST_CLASSES, 10, {"zero": "Bag"}) == {
        "Trouser": 1, "zero": 8, "t-shirt_top": 0}
    with pytest.raises(ImageFolderError, match="name the same class"):  # by name, two folders for one class
        folder_labels(["Bag", "bag", "zero"], FASHION_MNIST_CLASSES, 10, {"zero": "Dress"})


def test_a_folder_naming_no_class_is_told_how_slashes_are_written():
    """'T-shirt/top' cannot be a folder name: the error says a '/' is written '_' (or left out)."""
    with pytest.raises(ImageFolderError, match=r"'/' in a class name is written '_'.*'T-shirt_top'"):
        folder_labels(["T-shirt top!", "Tshirt"], ["T-shirt/top", "Other"], 2)
    assert folder_labels(["T-shirt_top", "Other"], ["T-shirt/top", "Other"], 2) == {"T-shirt_top": 0, "Other": 1}


def test_an_empty_class_folder_is_reported(tmp_path: Path):
    write_png(tmp_path / "Bag" / "a.png", np.full((4, 4), 7, np.uint8))
    (tmp_path / "Shirt").mkdir()
    (tmp_path / "Coat").mkdir()
    (tmp_path / "Coat" / "notes.txt").write_text("no image here")
    loaded = load_image_folder(tmp_path, preprocess(4, 4, 1), FASHION_MNIST_CLASSES, 10)
    assert loaded.empty == ["Coat", "Shirt"]
    assert loaded.labels.tolist() == [8]
