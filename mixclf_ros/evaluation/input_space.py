"""A pair of models with different inputs (size, channels, crop or resize), evaluated in one common
input space: the source image. Each model is put behind its own preprocessing (the node's
`vision.preprocess.Preprocessor`, in its differentiable form), so attacks, budgets and the mixture
all live on the source image, as on the robot, where both models see the same camera frame.

For the Fashion-MNIST test set the source is the 28x28 grey image; for an image folder, its images
(grey or RGB, all of one size, e.g. camera frames), each model applying its own crop. A model that takes the source as
it is (same size and channels, no crop) is used unwrapped. A pair that preprocesses alike keeps the
evaluation at the model input, unchanged.

Certificates in the source space: a Lipschitz robust model behind its preprocessing P has the
constant L ||P|| (operator norm of P for the source geometry, `preprocessing_operator_norm`), so its
radii are in source [0,1] pixels, as the node's `image_radius` (which also subtracts the float32
rounding of P, about 1e-5, ignored here). A smoothing robust model draws its noise at its own input,
as in the node, and its radii are divided by ||P|| (`Certificates.radius_scale`).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.datasets import DataSettings, EvaluationData, load_evaluation_data
from mixclf_ros.evaluation.model_pair import ModelPair
from mixclf_ros.evaluation.settings import EvaluationError
from mixclf_ros.vision.preprocess import PreprocessConfig, Preprocessor, preprocessing_operator_norm

FASHION_MNIST_SOURCE = (1, 28, 28)
"""(channels, height, width) of a Fashion-MNIST test image, the source of the evaluation."""

_FORWARDED = ("kind", "norm", "num_classes", "class_names", "config", "weights_path", "sha256", "sigma", "n0", "n",
              "beta", "lipschitz_source")


def model_preprocessing(model: nn.Module, crop: bool, overrides: dict[str, Any] | None = None) -> PreprocessConfig:
    """The preprocessing of a loaded model (its config's input size, channels, crop and resize), with
    `overrides` of crop_height / crop_width / resize; without `crop`, no crop (Fashion-MNIST)."""
    config = {**getattr(model, "config", {}), **{key: value for key, value in (overrides or {}).items()
                                                  if value is not None}}
    if "input_channels" not in config:
        channels, height, width = model.input_shape
        config.update(input_channels=channels, input_height=height, input_width=width)
    if not crop:
        config.update(crop_height=0, crop_width=0)
    try:
        return PreprocessConfig.for_model(config)
    except ValueError as error:
        raise EvaluationError(f"preprocessing: {error}") from error


class PreprocessedModel(nn.Module):
    """`model` behind its preprocessing: source images (N, C, H, W) in [0, 1] -> its outputs.

    Carries the model's attributes (kind, norm, num_classes, ...); `input_shape` is the source's, and
    for a Lipschitz model `lipschitz_constant` is the model's times ||P|| in its norm."""

    def __init__(self, model: nn.Module, config: PreprocessConfig, source_shape: tuple[int, int, int],
                 device: torch.device):
        super().__init__()
        self.model = model
        self.preprocess_config = replace(config, device=str(device))
        self.preprocessor = Preprocessor(self.preprocess_config)
        self.input_shape = tuple(source_shape)
        for name in _FORWARDED:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        self.operator_norm = preprocessing_operator_norm(
            source_shape[1], source_shape[2], "mono" if source_shape[0] == 1 else "rgb", config,
            getattr(model, "norm", "l2"))
        if getattr(model, "lipschitz_constant", 0.0):
            self.lipschitz_constant = float(model.lipschitz_constant) * self.operator_norm

    def to_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """Source images -> the model's input (differentiable)."""
        return self.preprocessor.differentiable(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.to_model_input(x))


def takes_source_as_is(config: PreprocessConfig, source_shape: tuple[int, int, int]) -> bool:
    """The preprocessing is the identity on a source of this shape (no crop, same size and channels)."""
    return (config.crop_height in (0, source_shape[1]) and config.crop_width in (0, source_shape[2])
            and (config.output_channels, config.output_height, config.output_width) == tuple(source_shape))


def in_source_space(pair: ModelPair, configs: tuple[PreprocessConfig, PreprocessConfig],
                    source_shape: tuple[int, int, int], device: torch.device) -> ModelPair:
    """The pair with each model that does not take the source as it is put behind its preprocessing."""
    wrapped = []
    for model, config in ((pair.standard, configs[0]), (pair.robust, configs[1])):
        if takes_source_as_is(config, source_shape):
            wrapped.append(model)
            continue
        wrapped.append(PreprocessedModel(model, config, source_shape, device).to(device).eval())
    return ModelPair(wrapped[0], wrapped[1], pair.standard_label, pair.robust_label)


def describe(config: PreprocessConfig, source_shape: tuple[int, int, int]) -> dict[str, Any]:
    """JSON summary of one model's preprocessing from the source."""
    return {"crop_height": config.crop_height, "crop_width": config.crop_width, "resize": config.resize,
            "output": [config.output_channels, config.output_height, config.output_width],
            "identity": takes_source_as_is(config, source_shape)}


def evaluation_inputs(pair: ModelPair, settings: DataSettings,
                      device: torch.device) -> tuple[EvaluationData, ModelPair]:
    """The evaluated images and the pair that takes them.

    Each model's preprocessing comes from its config (crop, resize, input size and channels), with
    `settings`' crop_height / crop_width / resize, where set, for both. Models that preprocess alike:
    the images at their input (`load_evaluation_data`), the pair as it is. Otherwise: the source
    images (Fashion-MNIST: 28x28 grey; an image folder: its images, all of one size) and the pair
    `in_source_space`."""
    folder = settings.image_folder is not None
    overrides = {"crop_height": settings.crop_height, "crop_width": settings.crop_width, "resize": settings.resize}
    configs = (model_preprocessing(pair.standard, folder, overrides),
               model_preprocessing(pair.robust, folder, overrides))
    dropped = [] if folder else dropped_crops(pair)
    robust = configs[1]
    if configs[0] == robust:
        resolved = replace(settings, crop_height=robust.crop_height, crop_width=robust.crop_width,
                           resize=robust.resize)
        data = load_evaluation_data(pair.robust, resolved)
        data.warnings += dropped
        return data, pair
    source_model = SimpleNamespace(input_shape=FASHION_MNIST_SOURCE, num_classes=pair.robust.num_classes,
                                   class_names=getattr(pair.robust, "class_names", []))
    data = load_evaluation_data(source_model, replace(settings, crop_height=0, crop_width=0, resize="area"),
                                folder_as_source=True)
    source = tuple(int(size) for size in data.images.shape[1:])
    for config, role in ((configs[0], "standard"), (robust, "robust")):
        if config.crop_height > source[1] or config.crop_width > source[2]:
            raise EvaluationError(f"the {role} model's crop {config.crop_height}x{config.crop_width} is larger than "
                                  f"the images, {source[1]}x{source[2]}")
    folders = {key: value for key, value in data.preprocessing.items() if key == "folders"}
    data.preprocessing = {"input_space": "source image", "source": list(source),
                          "standard": describe(configs[0], source), "robust": describe(robust, source),
                          "path": "vision.preprocess.Preprocessor", **folders}
    data.warnings += dropped
    return data, in_source_space(pair, configs, source, device)


def dropped_crops(pair: ModelPair) -> list[str]:
    """What to say of each model whose config crops camera frames, evaluated on the Fashion-MNIST
    images (28x28), which are never cropped: the crop of a camera frame does not apply to them."""
    said = []
    for model, role in ((pair.standard, "standard"), (pair.robust, "robust")):
        config = getattr(model, "config", {})
        height, width = int(config.get("crop_height", 0) or 0), int(config.get("crop_width", 0) or 0)
        if height or width:
            smaller = (" (the images are smaller than the crop)" if height > FASHION_MNIST_SOURCE[1]
                       or width > FASHION_MNIST_SOURCE[2] else "")
            said.append(f"the {role} model's crop_height/crop_width {height}x{width} (source pixels of a camera "
                        f"frame) is not applied to the {FASHION_MNIST_SOURCE[1]}x{FASHION_MNIST_SOURCE[2]} "
                        f"Fashion-MNIST images{smaller}: they are resized whole; evaluate camera images with "
                        "--image-folder to apply it")
    return said
