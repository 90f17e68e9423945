"""`mixclf-eval`: the paper's experiments on the mixed classifier of eq. 4 (no ROS needed).

    mixclf-eval sweep    clean / STD / ROB / MIX-attacked accuracy over an alpha grid (paper Fig. 2)
    mixclf-eval margins  mean top-1 minus top-2 probability gap of g and h (paper Table I)
    mixclf-eval certify  certified accuracy vs radius of the mixture (paper Fig. 3, Theorems 1 and 2)
    mixclf-eval design   R_i(x) choices, logits vs probabilities (paper Fig. 1, eq. 3)

Also `python -m mixclf_ros.evaluation.cli ...`. Each subcommand writes a CSV and a JSON file with every
number, and a PNG plot, under `--out` (default `eval_out/`), and prints a compact table.

Units and conventions:
- images are [0,1] pixel tensors (N, C, H, W) at the model input; attack budgets `eps` and
  certified radii are in the named norm ("linf" or "l2") in those units;
- accuracies are fractions in [0, 1];
- an attacked sample counts as correct only if the classifier is correct on the clean image AND on
  the adversarial one (the zero perturbation is in every ball), so attacked accuracy never exceeds
  clean accuracy;
- `alpha` is the weight of the robust model h (alpha = 0: standard g, alpha = 1: h);
- STD and ROB attacks are classic PGD aimed at g or h alone, returning the final iterate of
  highest loss (the adversarial data a transfer attack hands to the mixture); MIX attacks are
  end-to-end PGD on the mixture's log-probabilities (`MixedClassifier`, no gradient masking) that
  keep any iterate that fools it, optionally followed by APGD-CE, APGD-T and Square (torchattacks)
  on the samples that survive PGD (worst case over attacks per sample).

The core functions (`run_sweep`, `margins_table`, `certify_mixture`, `certified_accuracy_curve`,
`design_comparison`) take plain modules and tensors, for benchmarks and tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mixclf_ros import attacks
from mixclf_ros.core import certify
from mixclf_ros.core.mixing import MixedClassifier, mix_log_probs

NORMS = ("linf", "l2")
DEFAULT_EPS = {"linf": 0.1, "l2": 1.5}
"""Default attack budgets for Fashion-MNIST, [0,1]-pixel units (linf: per pixel; l2: whole image)."""
DEFAULT_SWEEP_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_CERTIFY_ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_GAMMAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
MODEL_PREFIXES = ("standard_model", "robust_model")
DEFAULT_ROBUST = {"sweep": "robust_at", "margins": "robust_at", "design": "robust_at",
                  "certify": "robust_lipschitz"}


class EvaluationError(ValueError):
    """A user-facing problem with the command line, a parameters file or the data."""


# ============================================================================ settings


@dataclass(frozen=True)
class PGDSettings:
    """Projected gradient descent budget.

    norm: "linf" or "l2". eps: radius in that norm, [0,1]-pixel units. steps: iterations per
    restart. step_size: per-step move in the same units (None: 2.5 eps / steps). restarts: random
    starts in the ball.
    """

    norm: str
    eps: float
    steps: int = 20
    step_size: float | None = None
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise EvaluationError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise EvaluationError(f"eps must be finite and >= 0, got {self.eps}")
        if self.steps < 1 or self.restarts < 1:
            raise EvaluationError("need --steps >= 1 and --restarts >= 1")
        if self.step_size is not None and not self.step_size > 0:
            raise EvaluationError(f"step size must be > 0, got {self.step_size}")

    @property
    def resolved_step_size(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def describe(self) -> str:
        restarts = f", {self.restarts} restarts" if self.restarts > 1 else ""
        return (f"PGD-{self.steps} {self.norm} eps={self.eps:g} step={self.resolved_step_size:.4g}"
                f"{restarts}")


@dataclass
class Runtime:
    """Where and how to run: device, batch size (images per forward/attack batch), seed, progress."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 256
    seed: int = 0
    progress: bool = False

    def batches(self, count: int, description: str) -> Iterator[slice]:
        """Slices of `range(count)` of at most `batch_size`, with a tqdm bar when `progress`."""
        starts = range(0, count, self.batch_size)
        for start in tqdm(starts, desc=description, disable=not self.progress or count == 0,
                          leave=False, unit="batch"):
            yield slice(start, min(start + self.batch_size, count))

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the block with the global torch RNG seeded, restoring the previous state afterwards
    (torchattacks draws its random starts from the global RNG)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ============================================================================ data


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


# ============================================================================ models


def _flatten_parameters(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2} (ROS parameter names, nested or dotted)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_parameters(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_ros_parameters(path: str | Path) -> dict[str, Any]:
    """Flat `{name: value}` of a ROS 2 parameters YAML file (`<node>: ros__parameters: ...`).

    Sections of every node are merged, wildcard sections (`/**`, `*`) first so that a section
    naming a node overrides them, as ROS does for that node."""
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise EvaluationError(f"--params {path}: {error}") from error
    sections: list[tuple[bool, dict[str, Any]]] = []

    def visit(node: Any, names: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        parameters = node.get("ros__parameters")
        if isinstance(parameters, dict):
            sections.append((any("*" in name for name in names), parameters))
        for key, value in node.items():
            if key != "ros__parameters":
                visit(value, (*names, str(key)))

    visit(document, ())
    if not sections:
        raise EvaluationError(f"--params {path}: no 'ros__parameters' section found")
    merged: dict[str, Any] = {}
    for _, parameters in sorted(sections, key=lambda section: not section[0]):
        merged.update(_flatten_parameters(parameters))
    return merged


def model_configs_from_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """`{"standard_model": config, "robust_model": config}` from a ROS parameters file. A smoothing
    robust model without `beta` gets `1 - confidence` like the node does."""
    parameters = read_ros_parameters(path)
    configs: dict[str, dict[str, Any]] = {}
    for prefix in MODEL_PREFIXES:
        config = {name[len(prefix) + 1:]: value for name, value in parameters.items()
                  if name.startswith(prefix + ".")}
        if not config:
            raise EvaluationError(f"--params {path}: no '{prefix}.*' parameters")
        configs[prefix] = config
    robust = configs["robust_model"]
    if robust.get("kind") == "smoothing" and "beta" not in robust and "confidence" in parameters:
        robust["beta"] = 1.0 - float(parameters["confidence"])
    return configs


@dataclass
class ModelPair:
    """The two loaded models (`models.LoadedModel`, eval mode, frozen) and how they were named."""

    standard: nn.Module
    robust: nn.Module
    standard_label: str
    robust_label: str


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode on `device`, parameters frozen (attacks need gradients w.r.t. inputs only)."""
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_config(config: dict[str, Any], device: torch.device) -> nn.Module:
    from mixclf_ros import models

    return prepare_model(models.load_model(dict(config)), device)


def load_zoo_model(name: str, device: torch.device) -> nn.Module:
    from mixclf_ros import models

    return load_config(models.zoo_config(name), device)


def load_model_pair(standard_name: str | None, robust_name: str | None, params_file: str | None,
                    default_robust: str, device: torch.device) -> ModelPair:
    """Zoo names win over the parameters file; without either, `standard` and `default_robust`."""
    from mixclf_ros import models

    configs = model_configs_from_parameters(params_file) if params_file else {}
    loaded = []
    for prefix, name, default in (("standard_model", standard_name, "standard"),
                                  ("robust_model", robust_name, default_robust)):
        if name is None and prefix in configs:
            loaded.append((load_config(configs[prefix], device), f"{Path(params_file).name}:{prefix}"))
        else:
            chosen = name or default
            loaded.append((load_zoo_model(chosen, device), chosen))
    (standard, standard_label), (robust, robust_label) = loaded
    check = getattr(models, "check_compatible", None)
    if check is not None:
        check(standard, robust)
    return ModelPair(standard, robust, standard_label, robust_label)


def describe_model(model: nn.Module, label: str) -> dict[str, Any]:
    """JSON-ready summary of a loaded model (label, kind, architecture, weights, sha256, ...)."""
    config = getattr(model, "config", {}) or {}
    summary: dict[str, Any] = {"label": label, "kind": getattr(model, "kind", None)}
    for key in ("architecture", "weights"):
        if key in config:
            summary[key] = config[key]
    by_kind = {"lipschitz": ("norm", "lipschitz_constant", "lipschitz_source"), "empirical": ("norm",),
               "smoothing": ("sigma", "n0", "n", "beta")}
    for attribute in ("sha256", *by_kind.get(summary["kind"], ())):
        value = getattr(model, attribute, None)
        if value is not None:
            summary[attribute] = value
    return summary


# ============================================================================ batched inference


def predict_logits(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, runtime: Runtime,
                   description: str = "forward") -> torch.Tensor:
    """(N, classes) float32 outputs of `model` on CPU, in batches on `runtime.device`, under
    `torch.inference_mode`."""
    outputs = []
    with torch.inference_mode():
        for part in runtime.batches(images.shape[0], description):
            outputs.append(model(images[part].to(runtime.device)).float().cpu())
    if not outputs:
        return torch.zeros(0, 0)
    return torch.cat(outputs)


def mixture_correct(logits_g: torch.Tensor, logits_h: torch.Tensor, labels: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """(N,) bool: argmax of eq. 4 equals the label."""
    return mix_log_probs(logits_g, logits_h, alpha).argmax(dim=1) == labels


def mean_or_nan(values: torch.Tensor) -> float:
    return float(values.float().mean()) if values.numel() else math.nan


# ============================================================================ attacks


def _attack_in_batches(attack: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                       images: torch.Tensor, labels: torch.Tensor, runtime: Runtime, description: str,
                       names: Sequence[str]) -> tuple[dict[str, torch.Tensor], float]:
    """Runs `attack(x, y) -> {name: x_adv}` batch by batch on `runtime.device`; returns
    ({name: x_adv on CPU}, seconds spent inside `attack`, device synchronised)."""
    adversarial = {name: images.clone() for name in names}
    seconds = 0.0
    for part in runtime.batches(images.shape[0], description):
        x = images[part].to(runtime.device)
        y = labels[part].to(runtime.device)
        runtime.synchronize()
        started = time.perf_counter()
        outputs = attack(x, y)
        runtime.synchronize()
        seconds += time.perf_counter() - started
        for name in names:
            adversarial[name][part] = outputs[name].cpu()
    return adversarial, seconds


def final_iterate_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: PGDSettings,
                      runtime: Runtime, description: str) -> tuple[torch.Tensor, float]:
    """Classic PGD (Madry et al.; torchattacks `PGD` / `PGDL2`, random start, all `steps` steps)
    aimed at `model`; per sample the final iterate of the restart with the highest cross-entropy.

    This is the adversarial data of the paper's STD / ROB attacks and of Table I: unlike an attack
    that stops at the first misclassified iterate, it ends deep in the wrong class, so it is the
    strong choice to transfer to another classifier (the mixture).

    Returns (x_adv on CPU, seconds spent attacking).
    """
    import torchattacks

    if settings.norm == "linf":
        attack = torchattacks.PGD(model, eps=settings.eps, alpha=settings.resolved_step_size,
                                  steps=settings.steps, random_start=True)
    else:
        attack = torchattacks.PGDL2(model, eps=settings.eps, alpha=settings.resolved_step_size,
                                    steps=settings.steps, random_start=True)
    attack.set_device(runtime.device)

    def strongest_restart(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=runtime.device)
        for _ in range(settings.restarts):
            with torch.enable_grad():
                candidate = attack(x, y)
            with torch.inference_mode():
                loss = F.cross_entropy(model(candidate), y, reduction="none")
            better = loss > best_loss
            best[better] = candidate[better]
            best_loss = torch.where(better, loss, best_loss)
        return {"pgd": best}

    with seeded_global_rng(runtime.seed, runtime.device):
        adversarial, seconds = _attack_in_batches(strongest_restart, images, labels, runtime, description, ("pgd",))
    return adversarial["pgd"], seconds


def first_success_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: PGDSettings,
                      runtime: Runtime, description: str, seed_offset: int = 0) -> tuple[torch.Tensor, float]:
    """End-to-end PGD on `model` (`attacks.pgd`): per sample the first iterate that fools it, over
    `restarts` random starts. Returns (x_adv on CPU, seconds spent attacking)."""
    generator = runtime.generator(seed_offset)

    def first_success(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pgd": attacks.pgd(model, x, y, eps=settings.eps, norm=settings.norm, steps=settings.steps,
                                   step_size=settings.resolved_step_size, restarts=settings.restarts,
                                   generator=generator)}

    adversarial, seconds = _attack_in_batches(first_success, images, labels, runtime, description, ("pgd",))
    return adversarial["pgd"], seconds


AUTOATTACK_NAMES = ("apgd-ce", "apgd-t", "square")


def autoattack_in_batches(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: str, eps: float,
                          iterations: int, target_classes: int | None, runtime: Runtime,
                          description: str) -> tuple[dict[str, torch.Tensor], float]:
    """APGD-CE, APGD-T and Square (`attacks.apgd_and_square`, `iterations` each) on every image.
    Returns ({attack name: x_adv on CPU}, seconds for all three together)."""
    return _attack_in_batches(
        lambda x, y: attacks.apgd_and_square(model, x, y, eps=eps, norm=norm, n_iter=iterations, seed=runtime.seed,
                                             n_target_classes=target_classes),
        images, labels, runtime, description, AUTOATTACK_NAMES)


def images_per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


# ============================================================================ sweep (paper Fig. 2)


@dataclass
class SweepResult:
    """Accuracies of the mixture over the alpha grid.

    rows: one dict per alpha with `alpha`, `clean_accuracy_all` (every evaluated clean image),
        `clean_accuracy` (the attacked subset), `std_accuracy`, `rob_accuracy`, `mix_pgd_accuracy`
        and, with AutoAttack, `mix_apgd_ce_accuracy`, `mix_apgd_t_accuracy`, `mix_square_accuracy`
        (each: robust to PGD and to that attack) and `mix_worst_accuracy` (robust to all four);
        `worst_accuracy`: correct under every attack run at that alpha (STD, ROB, MIX and
        AutoAttack), the per-sample worst case.
    reference: accuracies of g and h alone (clean, and under the STD / ROB attack aimed at them).
    throughput: images per second of each attack (AutoAttack: its three attacks together).
    """

    rows: list[dict[str, float]]
    reference: dict[str, float]
    throughput: dict[str, float]
    attack: PGDSettings
    num_clean: int
    num_attacked: int
    autoattack: bool


def run_sweep(standard: nn.Module, robust: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              alphas: Sequence[float], attack: PGDSettings, runtime: Runtime | None = None,
              clean_images: torch.Tensor | None = None, clean_labels: torch.Tensor | None = None,
              autoattack: bool = False, autoattack_iterations: int = 100,
              autoattack_targets: int | None = None,
              autoattack_alphas: Sequence[float] | None = None) -> SweepResult:
    """Clean and attacked accuracy of `MixedClassifier(standard, robust, alpha)` for each alpha.

    Args:
        standard, robust: g and h, [0,1] pixels -> logits, in eval mode on `runtime.device`.
        images, labels: the attacked set, (N, C, H, W) in [0, 1] and (N,), on CPU.
        alphas: weights of h, each in [0, 1].
        attack: the PGD budget of all three attacks (STD, ROB, MIX).
        clean_images, clean_labels: optional larger clean set for `clean_accuracy_all`.
        autoattack: also run APGD-CE, APGD-T and Square (`autoattack_iterations` each,
            `autoattack_targets` target classes for APGD-T, None = all others) on the mixture,
            on the samples still correct after the MIX PGD attack; only at `autoattack_alphas`
            (None = every alpha; the other rows get NaN in the AutoAttack columns).

    The STD and ROB adversarial examples do not depend on alpha and are computed once.
    """
    runtime = runtime or Runtime()
    if clean_images is None or clean_labels is None:
        clean_images, clean_labels = images, labels
    g_clean_all = predict_logits(standard, clean_images, runtime, "clean g")
    h_clean_all = predict_logits(robust, clean_images, runtime, "clean h")
    g_clean = predict_logits(standard, images, runtime, "clean g (attacked set)")
    h_clean = predict_logits(robust, images, runtime, "clean h (attacked set)")

    x_std, seconds_std = final_iterate_pgd(standard, images, labels, attack, runtime, "STD attack")
    x_rob, seconds_rob = final_iterate_pgd(robust, images, labels, attack, runtime, "ROB attack")
    g_on_std = predict_logits(standard, x_std, runtime)
    h_on_std = predict_logits(robust, x_std, runtime)
    g_on_rob = predict_logits(standard, x_rob, runtime)
    h_on_rob = predict_logits(robust, x_rob, runtime)

    g_correct = g_clean.argmax(1) == labels
    h_correct = h_clean.argmax(1) == labels
    reference = {
        "standard_clean_accuracy_all": mean_or_nan(g_clean_all.argmax(1) == clean_labels),
        "robust_clean_accuracy_all": mean_or_nan(h_clean_all.argmax(1) == clean_labels),
        "standard_clean_accuracy": mean_or_nan(g_correct),
        "robust_clean_accuracy": mean_or_nan(h_correct),
        "standard_std_attacked_accuracy": mean_or_nan(g_correct & (g_on_std.argmax(1) == labels)),
        "robust_rob_attacked_accuracy": mean_or_nan(h_correct & (h_on_rob.argmax(1) == labels)),
        "robust_std_attacked_accuracy": mean_or_nan(h_correct & (h_on_std.argmax(1) == labels)),
        "standard_rob_attacked_accuracy": mean_or_nan(g_correct & (g_on_rob.argmax(1) == labels)),
    }
    seconds_mix = 0.0
    attacked_mix = 0
    seconds_auto = 0.0
    attacked_auto = 0
    rows = []
    for alpha in tqdm(alphas, desc="alpha grid", disable=not runtime.progress, unit="alpha"):
        clean_correct = mixture_correct(g_clean, h_clean, labels, alpha)
        std_correct = clean_correct & mixture_correct(g_on_std, h_on_std, labels, alpha)
        rob_correct = clean_correct & mixture_correct(g_on_rob, h_on_rob, labels, alpha)

        mixture = MixedClassifier(standard, robust, alpha)
        mix_correct = clean_correct.clone()
        targets = torch.nonzero(clean_correct).flatten()  # wrong on clean data: already not robust
        if targets.numel():
            x_mix, seconds = first_success_pgd(mixture, images[targets], labels[targets], attack, runtime,
                                               f"MIX attack alpha={alpha:g}")
            seconds_mix += seconds
            attacked_mix += targets.numel()
            mix_correct[targets] = mixture_correct(*_both_logits(standard, robust, x_mix, runtime),
                                                   labels[targets], alpha)
        row = {
            "alpha": float(alpha),
            "clean_accuracy_all": mean_or_nan(mixture_correct(g_clean_all, h_clean_all, clean_labels, alpha)),
            "clean_accuracy": mean_or_nan(clean_correct),
            "std_accuracy": mean_or_nan(std_correct),
            "rob_accuracy": mean_or_nan(rob_correct),
            "mix_pgd_accuracy": mean_or_nan(mix_correct),
        }
        robust_to_all = std_correct & rob_correct & mix_correct
        if autoattack and autoattack_alphas is not None and not any(
                math.isclose(alpha, chosen) for chosen in autoattack_alphas):
            for name in AUTOATTACK_NAMES:
                row[f"mix_{name.replace('-', '_')}_accuracy"] = math.nan
            row["mix_worst_accuracy"] = math.nan
        elif autoattack:
            survivors = torch.nonzero(mix_correct).flatten()
            worst_correct = mix_correct.clone()
            per_attack = {name: mix_correct.clone() for name in AUTOATTACK_NAMES}
            if survivors.numel():
                adversarial, seconds = autoattack_in_batches(
                    mixture, images[survivors], labels[survivors], attack.norm, attack.eps,
                    autoattack_iterations, autoattack_targets, runtime, f"AutoAttack alpha={alpha:g}")
                seconds_auto += seconds
                attacked_auto += survivors.numel()
                for name in AUTOATTACK_NAMES:
                    still = mixture_correct(*_both_logits(standard, robust, adversarial[name], runtime),
                                            labels[survivors], alpha)
                    per_attack[name][survivors] = still
                    worst_correct[survivors] &= still
            for name in AUTOATTACK_NAMES:
                row[f"mix_{name.replace('-', '_')}_accuracy"] = mean_or_nan(per_attack[name])
            row["mix_worst_accuracy"] = mean_or_nan(worst_correct)
            robust_to_all &= worst_correct
        row["worst_accuracy"] = mean_or_nan(robust_to_all)
        rows.append(row)
    throughput = {
        "pgd_std": images_per_second(images.shape[0], seconds_std),
        "pgd_rob": images_per_second(images.shape[0], seconds_rob),
        "pgd_mix": images_per_second(attacked_mix, seconds_mix),
    }
    if autoattack:
        throughput["autoattack_apgd_ce_apgd_t_square"] = images_per_second(attacked_auto, seconds_auto)
    return SweepResult(rows, reference, throughput, attack, int(clean_labels.shape[0]),
                       int(labels.shape[0]), autoattack)


def _both_logits(standard: nn.Module, robust: nn.Module, images: torch.Tensor,
                 runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    return predict_logits(standard, images, runtime), predict_logits(robust, images, runtime)


# ============================================================================ margins (paper Table I)


def probability_gap(logits: torch.Tensor) -> torch.Tensor:
    """(N,) top-1 minus top-2 softmax probability, in [0, 1]."""
    top_two = torch.softmax(logits.double(), dim=1).topk(2, dim=1).values
    return (top_two[:, 0] - top_two[:, 1]).float()


MARGIN_COLUMNS = ("clean_correct", "clean_incorrect", "attacked_correct", "attacked_incorrect")


def margins_table(standard: nn.Module, robust: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  attack: PGDSettings, runtime: Runtime | None = None) -> list[dict[str, Any]]:
    """Table I: for g and for h, the mean top-1 minus top-2 probability gap over correct and over
    incorrect predictions, on clean images and on PGD examples aimed at that same model (final
    iterate, `final_iterate_pgd`).

    Returns one dict per model: `model` ("g" or "h"), `accuracy_clean`, `accuracy_attacked`
    (accuracy on the PGD data, as the split of the attacked columns; not clean-and-attacked), and
    for each of MARGIN_COLUMNS the mean gap (NaN when no sample falls in the cell) and `count_<column>`.
    """
    runtime = runtime or Runtime()
    table = []
    for name, model in (("g", standard), ("h", robust)):
        clean_logits = predict_logits(model, images, runtime, f"clean {name}")
        adversarial, _ = final_iterate_pgd(model, images, labels, attack, runtime, f"PGD on {name}")
        attacked_logits = predict_logits(model, adversarial, runtime, f"attacked {name}")
        row: dict[str, Any] = {"model": name}
        for condition, logits in (("clean", clean_logits), ("attacked", attacked_logits)):
            correct = logits.argmax(1) == labels
            gap = probability_gap(logits)
            row[f"accuracy_{condition}"] = mean_or_nan(correct)
            for outcome, mask in (("correct", correct), ("incorrect", ~correct)):
                row[f"{condition}_{outcome}"] = mean_or_nan(gap[mask])
                row[f"count_{condition}_{outcome}"] = int(mask.sum())
        table.append(row)
    return table


# ============================================================================ certify (paper Fig. 3)


def certified_accuracy_curve(radii: torch.Tensor, certified_class: torch.Tensor, labels: torch.Tensor,
                             grid: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Certified accuracy at each radius of `grid`: the fraction of samples whose certified class is
    the label and whose certified radius is positive and >= r. Non-increasing in r.

    Args:
        radii: (N,) certified radii (0 = no certificate), in the certificate's norm, [0,1] pixels.
        certified_class: (N,) the class the certificate is for (-1 = none).
        labels: (N,) true labels.
        grid: radii r at which to evaluate, same units.

    Returns:
        (len(grid),) float64 fractions in [0, 1].
    """
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if radii.numel() == 0:
        return torch.zeros_like(grid)
    radii = radii.detach().double().cpu()
    good = (certified_class.cpu() == labels.cpu()) & (radii > 0)
    return ((radii[None, :] >= grid[:, None]) & good[None, :]).double().mean(dim=1)


@dataclass
class Certificates:
    """Per-sample certificates of one robust model, reusable for every alpha.

    kind: "lipschitz" or "smoothing". norm: the radius norm. predicted: (N,) class of h (argmax of
    the probabilities, or the class selected by the n0 smoothing samples). probs_h: (N, C) h(x)
    (exact for a Lipschitz model, a Monte Carlo estimate for a smoothed one: for accuracy only).
    For Lipschitz models `lipschitz` is the probability-output constant. For smoothing `p_lower`,
    `p_upper` are the sound bounds of h_y and max_{i != y} h_i (jointly at confidence 1 - beta),
    `sigma` the noise level.
    """

    kind: str
    norm: str
    predicted: torch.Tensor
    probs_h: torch.Tensor
    lipschitz: float
    p_lower: torch.Tensor | None = None
    p_upper: torch.Tensor | None = None
    sigma: float | None = None
    beta: float | None = None

    def theorems(self) -> tuple[str, ...]:
        return ("theorem1",) if self.kind == "lipschitz" else ("theorem1", "theorem2")

    def radius(self, theorem: str, alpha: float) -> torch.Tensor:
        """(N,) certified radius of the mixture at `alpha` (0 = none), float64."""
        if self.kind == "lipschitz":
            if theorem != "theorem1":
                raise EvaluationError("a Lipschitz robust model is certified with Theorem 1 only")
            return certify.lipschitz_radius(self.probs_h.double(), self.lipschitz, alpha).double()
        assert self.p_lower is not None and self.p_upper is not None and self.sigma is not None
        if theorem == "theorem2":
            return certify.smoothing_radius(self.p_lower, self.p_upper, self.sigma, alpha).double()
        # Theorem 1 with the smoothed model's constant, on the sound bounds: the radius formula
        # increases with h_y and decreases with h_i, so p_lower / p_upper give a lower bound. As a
        # two-column "probability" table, column 0 is y whenever the bounds separate.
        bounds = torch.stack([self.p_lower, self.p_upper], dim=1).double()
        radius = certify.lipschitz_radius(bounds, self.lipschitz, alpha).double()
        return torch.where(self.p_lower > self.p_upper, radius, torch.zeros_like(radius))


def lipschitz_certificates(robust: nn.Module, images: torch.Tensor, runtime: Runtime) -> Certificates:
    """Certificates of a Lipschitz robust model (`kind` lipschitz, `lipschitz_constant` of its
    probability outputs in `norm`)."""
    constant = float(getattr(robust, "lipschitz_constant", 0.0) or 0.0)
    if not constant > 0:
        raise EvaluationError("the Lipschitz robust model has no positive lipschitz_constant")
    probs = torch.softmax(predict_logits(robust, images, runtime, "robust model").double(), dim=1)
    return Certificates("lipschitz", str(robust.norm), probs.argmax(1), probs, constant)


def smoothing_certificates(base: nn.Module, num_classes: int, sigma: float, images: torch.Tensor,
                           n0: int, n: int, beta: float, runtime: Runtime,
                           description: str = "smoothing") -> Certificates:
    """Monte Carlo certificates (`smoothing.Smooth.certify`, n0 selection + n estimation samples per
    image, empirical-Bernstein bounds at joint confidence 1 - beta) of the Gaussian smoothing of
    `base` with noise sigma ([0,1] pixels, l2). The bounds do not depend on alpha."""
    from mixclf_ros.core.smoothing import Smooth

    smooth = Smooth(base, num_classes, sigma)
    generator = runtime.generator(17)
    selected, lower, upper, probs = [], [], [], []
    chunk = max(1, runtime.batch_size // 4)
    starts = range(0, images.shape[0], chunk)
    for start in tqdm(starts, desc=description, disable=not runtime.progress, leave=False, unit="chunk"):
        x = images[start:start + chunk].to(runtime.device)
        certificate = smooth.certify(x, n0=n0, n=n, beta=beta, batch_size=max(runtime.batch_size, 1000),
                                     alpha=1.0, generator=generator)
        selected.append(certificate.selected_class.cpu())
        lower.append(certificate.p_lower.double().cpu())
        upper.append(certificate.p_upper.double().cpu())
        probs.append(certificate.probs.double().cpu())
    return Certificates("smoothing", "l2", torch.cat(selected), torch.cat(probs),
                        certify.smoothed_lipschitz_constant(sigma), torch.cat(lower), torch.cat(upper),
                        float(sigma), float(beta))


def robust_certificates(robust: nn.Module, images: torch.Tensor, runtime: Runtime, n0: int | None = None,
                        n: int | None = None, beta: float | None = None,
                        sigma: float | None = None) -> Certificates:
    """Certificates of a loaded robust model by its `kind`; n0 / n / beta / sigma override the
    model's own smoothing settings."""
    kind = getattr(robust, "kind", None)
    if kind == "lipschitz":
        return lipschitz_certificates(robust, images, runtime)
    if kind == "smoothing":
        return smoothing_certificates(
            robust, int(robust.num_classes), float(sigma if sigma is not None else robust.sigma), images,
            int(n0 if n0 is not None else robust.n0), int(n if n is not None else robust.n),
            float(beta if beta is not None else robust.beta), runtime,
            description=f"smoothing sigma={sigma if sigma is not None else robust.sigma:g}")
    raise EvaluationError(f"certify needs a robust model of kind 'lipschitz' or 'smoothing', got {kind!r}")


def mixture_clean_accuracy(logits_g: torch.Tensor, certificates: Certificates, labels: torch.Tensor,
                           alpha: float) -> float:
    """Clean accuracy of eq. 4 with h(x) = `certificates.probs_h` (for a smoothed model a Monte Carlo
    estimate: an accuracy estimate, not a certificate)."""
    log_h = certificates.probs_h.double().clamp_min(1e-300).log()
    return mean_or_nan(mix_log_probs(logits_g.double(), log_h, alpha).argmax(1) == labels)


def match_alpha(logits_g: torch.Tensor, certificates: Certificates, labels: torch.Tensor,
                target_accuracy: float, step: float = 0.01) -> tuple[float, float]:
    """The alpha in [1/2, 1] (grid of `step`) whose mixture clean accuracy is closest to
    `target_accuracy`; ties go to the larger alpha. Returns (alpha, its clean accuracy)."""
    count = round(0.5 / step)
    best = (1.0, mixture_clean_accuracy(logits_g, certificates, labels, 1.0))
    for index in range(count, -1, -1):
        alpha = round(0.5 + index * step, 10)
        accuracy = mixture_clean_accuracy(logits_g, certificates, labels, alpha)
        if abs(accuracy - target_accuracy) < abs(best[1] - target_accuracy) - 1e-12:
            best = (alpha, accuracy)
    return best


@dataclass
class CertifyResult:
    """Certified accuracy curves.

    curves: one dict per (model, theorem, alpha): `model` ("mixture" or "baseline"), `theorem`,
        `alpha`, `clean_accuracy`, `certified_fraction` (positive radius, correct class),
        `median_radius` (over correct certified samples), `accuracy` (list over `radii`).
    radii: the radius grid, in `norm`, [0,1] pixels.
    baseline: how the baseline was chosen.
    """

    curves: list[dict[str, Any]]
    radii: list[float]
    norm: str
    baseline: dict[str, Any]
    certificate_settings: dict[str, Any]


def _curve(model: str, theorem: str, alpha: float, clean_accuracy: float, certificates: Certificates,
           labels: torch.Tensor) -> dict[str, Any]:
    radius = certificates.radius(theorem, alpha)
    good = (certificates.predicted == labels) & (radius > 0)
    return {"model": model, "theorem": theorem, "alpha": float(alpha), "clean_accuracy": clean_accuracy,
            "certified_fraction": mean_or_nan(good),
            "median_radius": float(radius[good].median()) if bool(good.any()) else 0.0,
            "_radius": radius, "_predicted": certificates.predicted}


def certify_mixture(standard: nn.Module, robust: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    alphas: Sequence[float], runtime: Runtime | None = None,
                    radii: Sequence[float] | None = None, num_radii: int = 101,
                    baseline: nn.Module | None = None, baseline_label: str = "",
                    baseline_sigma: float | None = None, n0: int | None = None, n: int | None = None,
                    beta: float | None = None, sigma: float | None = None) -> CertifyResult:
    """Certified accuracy vs radius of the mixture at each alpha (Theorem 1; for a smoothed robust
    model also Theorem 2), and of a baseline robust model of equal clean accuracy (paper Fig. 3).

    Baseline: `baseline` (another loaded robust model, certified at alpha = 1), or for a smoothed
    robust model `baseline_sigma` (the same base network smoothed with that sigma); the mixture is
    then also evaluated at the alpha in [1/2, 1] whose clean accuracy matches the baseline's
    (`match_alpha`). Without either, the baseline is the robust model alone at alpha = 1.

    Radii: `radii`, or `num_radii` points from 0 to the largest certified radius found.
    n0 / n / beta override the smoothing settings of both smoothed models, `sigma` the noise level
    of the robust model (e.g. a larger sigma than it was trained with, as the paper's Fig. 3 mixes
    a large-sigma model and compares it with a smaller-sigma baseline).
    """
    runtime = runtime or Runtime()
    logits_g = predict_logits(standard, images, runtime, "standard model").double()
    if sigma is not None and getattr(robust, "kind", None) != "smoothing":
        raise EvaluationError("--sigma applies to a smoothing robust model only")
    certificates = robust_certificates(robust, images, runtime, n0=n0, n=n, beta=beta, sigma=sigma)
    curves = []
    for alpha in alphas:
        accuracy = mixture_clean_accuracy(logits_g, certificates, labels, alpha)
        for theorem in certificates.theorems():
            curves.append(_curve("mixture", theorem, alpha, accuracy, certificates, labels))

    baseline_info: dict[str, Any]
    if baseline is None and baseline_sigma is None:
        baseline_certificates = certificates
        baseline_info = {"description": "the robust model alone (alpha = 1): no robust model of equal "
                                        "clean accuracy was given", "label": "robust model"}
    elif baseline is not None:
        if getattr(baseline, "kind", None) != certificates.kind:
            raise EvaluationError(f"the baseline must be of the robust model's kind ({certificates.kind})")
        baseline_certificates = robust_certificates(baseline, images, runtime, n0=n0, n=n, beta=beta)
        baseline_info = {"description": f"robust model {baseline_label} alone (alpha = 1)",
                         "label": baseline_label}
    else:
        if certificates.kind != "smoothing":
            raise EvaluationError("--baseline-sigma needs a smoothing robust model")
        baseline_certificates = robust_certificates(robust, images, runtime, n0=n0, n=n, beta=beta,
                                                    sigma=baseline_sigma)
        baseline_info = {"description": f"the robust base network smoothed with sigma={baseline_sigma:g} "
                                        "(alpha = 1)", "label": f"sigma={baseline_sigma:g}"}
    baseline_accuracy = mixture_clean_accuracy(logits_g, baseline_certificates, labels, 1.0)
    baseline_info["clean_accuracy"] = baseline_accuracy
    for theorem in baseline_certificates.theorems():
        curves.append(_curve("baseline", theorem, 1.0, baseline_accuracy, baseline_certificates, labels))
    if baseline_certificates is not certificates:
        matched_alpha, matched_accuracy = match_alpha(logits_g, certificates, labels, baseline_accuracy)
        baseline_info.update(matched_alpha=matched_alpha, matched_clean_accuracy=matched_accuracy)
        for theorem in certificates.theorems():
            curves.append(_curve("mixture_matched", theorem, matched_alpha, matched_accuracy, certificates,
                                 labels))

    if radii is None:
        largest = max((float(curve["_radius"].max()) for curve in curves if curve["_radius"].numel()),
                      default=0.0)
        largest = largest if math.isfinite(largest) and largest > 0 else 1.0
        grid = torch.linspace(0.0, largest, max(num_radii, 2), dtype=torch.float64)
    else:
        grid = torch.as_tensor(sorted(float(r) for r in radii), dtype=torch.float64)
    for curve in curves:
        curve["accuracy"] = certified_accuracy_curve(curve.pop("_radius"), curve.pop("_predicted"), labels,
                                                     grid).tolist()
    settings: dict[str, Any] = {"kind": certificates.kind, "norm": certificates.norm,
                                "lipschitz_constant": certificates.lipschitz}
    if certificates.kind == "smoothing":
        settings.update(sigma=certificates.sigma, beta=certificates.beta,
                        n0=int(n0 if n0 is not None else robust.n0), n=int(n if n is not None else robust.n),
                        bounds="empirical Bernstein, union bound over classes, joint confidence 1 - beta")
    return CertifyResult(curves, grid.tolist(), certificates.norm, baseline_info, settings)


# ============================================================================ design (paper Fig. 1)


def design_comparison(standard: nn.Module, robust: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      gammas: Sequence[float], attack: PGDSettings, runtime: Runtime | None = None,
                      trusts: Sequence[str] | None = None, spaces: Sequence[str] | None = None,
                      known_rows: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Fig. 1: clean and PGD-attacked accuracy of eq. 3 (`design.SmoothedClassifier`) for each trust
    term R_i(x), each space (logits / probabilities, then log) and each gamma.

    The attack is end-to-end PGD (`attacks.pgd`) on the eq. 3 scores, differentiating through the
    gradient-norm trust terms as well (double backpropagation), on the clean-correct samples.
    Returns one dict per (trust, space, gamma): `trust`, `space`, `gamma`, `clean_accuracy`,
    `attacked_accuracy`, `images_per_second` (of the attack). Points already in `known_rows` (same
    keys, from an earlier run with the same models, data and attack) are reused, not recomputed.
    """
    from mixclf_ros.core import design

    runtime = runtime or Runtime()
    trusts = tuple(trusts or design.TRUST_TERMS)
    spaces = tuple(spaces or design.SPACES)
    known = {(row["trust"], row["space"], float(row["gamma"])): row for row in known_rows}
    rows = [dict(row) for row in known_rows]
    combinations = [(trust, space, float(gamma)) for trust in trusts for space in spaces for gamma in gammas
                    if (trust, space, float(gamma)) not in known]
    for trust, space, gamma in tqdm(combinations, desc="design grid", disable=not runtime.progress,
                                    unit="point"):
        scored = design.SmoothedClassifier(standard, robust, float(gamma), trust=trust, space=space,
                                           norm=attack.norm)
        scores = []
        for part in runtime.batches(images.shape[0], f"clean {trust}/{space}/{gamma:g}"):
            if trust == "one":
                with torch.inference_mode():
                    scores.append(scored(images[part].to(runtime.device)).float().cpu())
            else:  # the trust term needs input gradients
                scores.append(scored(images[part].to(runtime.device)).detach().float().cpu())
        clean_correct = torch.cat(scores).argmax(1) == labels
        attacked_correct = clean_correct.clone()
        targets = torch.nonzero(clean_correct).flatten()
        seconds = 0.0
        if targets.numel():
            adversarial, seconds = first_success_pgd(scored, images[targets], labels[targets], attack, runtime,
                                                     f"PGD {trust}/{space}/{gamma:g}")
            attacked_scores = []
            for part in runtime.batches(targets.numel(), "attacked"):
                attacked_scores.append(scored(adversarial[part].to(runtime.device)).detach().float().cpu())
            attacked_correct[targets] = torch.cat(attacked_scores).argmax(1) == labels[targets]
        rows.append({"trust": trust, "space": space, "gamma": float(gamma),
                     "clean_accuracy": mean_or_nan(clean_correct),
                     "attacked_accuracy": mean_or_nan(attacked_correct),
                     "images_per_second": images_per_second(int(targets.numel()), seconds)})
    return rows


# ============================================================================ output


def _json_ready(value: Any) -> Any:
    """NaN / inf -> None, tensors -> lists, dataclasses of settings -> dicts (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _json_ready(value.tolist())
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, PGDSettings):
        return {"norm": value.norm, "eps": value.eps, "steps": value.steps,
                "step_size": value.resolved_step_size, "restarts": value.restarts}
    return value


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(_json_ready(content), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One line per row; columns = the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                             for key, value in row.items()})


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table with right-aligned columns; floats as 4 decimals."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    text_rows = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in text_rows)) if text_rows else len(str(header))
              for i, header in enumerate(headers)]
    lines = ["  ".join(str(header).rjust(width) for header, width in zip(headers, widths))]
    lines.extend("  ".join(value.rjust(width) for value, width in zip(row, widths)) for row in text_rows)
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)
    _pyplot().close(figure)


def plot_sweep(result: SweepResult, path: Path, title: str) -> None:
    """Paper Fig. 2: accuracy of the mixture vs alpha, clean and under STD / ROB / MIX attacks."""
    plt = _pyplot()
    alphas = [row["alpha"] for row in result.rows]
    figure, axes = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    series = [("clean_accuracy", f"clean ({result.num_attacked} attacked images)", "k", "-")]
    if result.num_clean != result.num_attacked:
        series.append(("clean_accuracy_all", f"clean (all {result.num_clean} images)", "grey", ":"))
    series += [("std_accuracy", "STD attack", "tab:blue", "--"),
              ("rob_accuracy", "ROB attack", "tab:orange", "--"), ("mix_pgd_accuracy", "MIX attack (PGD)",
                                                                   "tab:red", "-")]
    if result.autoattack:
        series.append(("mix_worst_accuracy", "MIX worst case (PGD+APGD-CE/T+Square)", "tab:purple", ":"))
    series.append(("worst_accuracy", "worst case over all attacks", "tab:green", "-"))
    for key, label, color, style in series:
        points = [(alpha, row[key]) for alpha, row in zip(alphas, result.rows) if not math.isnan(row[key])]
        axes.plot([p[0] for p in points], [p[1] for p in points], style, color=color, marker="o", markersize=3,
                  label=label)
    axes.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("alpha (weight of the robust model h)")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    _save(figure, path)


def plot_margins(table: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Table I as grouped bars: mean probability gap per cell, for g and h."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    width = 0.38
    positions = range(len(MARGIN_COLUMNS))
    for offset, row in zip((-width / 2, width / 2), table):
        values = [row[column] for column in MARGIN_COLUMNS]
        bars = axes.bar([p + offset for p in positions], [0.0 if math.isnan(v) else v for v in values], width,
                        label=row["model"])
        axes.bar_label(bars, labels=["none" if math.isnan(v) else f"{v:.3f}" for v in values], fontsize=7)
    axes.set_xticks(list(positions), [column.replace("_", "\n") for column in MARGIN_COLUMNS], fontsize=8)
    axes.set_ylabel("mean top-1 minus top-2 probability")
    axes.set_ylim(0.0, 1.1)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_certify(result: CertifyResult, path: Path, title: str) -> None:
    """Paper Fig. 3: certified accuracy vs radius, one panel per theorem; empty circles at radius 0
    mark the clean accuracy (the curve is discontinuous there)."""
    plt = _pyplot()
    theorems = sorted({curve["theorem"] for curve in result.curves})
    figure, axes_list = plt.subplots(1, len(theorems), figsize=(5.2 * len(theorems), 4.0), dpi=110,
                                     squeeze=False)
    names = {"theorem1": "Theorem 1 (Lipschitz)", "theorem2": "Theorem 2 (randomized smoothing)"}
    colormap = plt.get_cmap("viridis")
    mixture_alphas = sorted({curve["alpha"] for curve in result.curves if curve["model"] == "mixture"})
    for axes, theorem in zip(axes_list[0], theorems):
        for curve in (c for c in result.curves if c["theorem"] == theorem):
            if curve["model"] == "mixture":
                position = mixture_alphas.index(curve["alpha"]) / max(len(mixture_alphas) - 1, 1)
                color, style, label = colormap(0.9 * position), "-", f"mixture alpha={curve['alpha']:g}"
            elif curve["model"] == "mixture_matched":
                color, style = "tab:red", "-."
                label = f"mixture alpha={curve['alpha']:g} (clean acc. of baseline)"
            else:
                color, style, label = "black", "--", f"baseline: {result.baseline.get('label', '')}"
            axes.plot(result.radii, curve["accuracy"], style, color=color, linewidth=1.4, label=label)
            axes.plot([0.0], [curve["clean_accuracy"]], "o", markerfacecolor="none", color=color, markersize=5)
        axes.set_xlabel(f"{result.norm} radius ([0,1] pixels)")
        axes.set_ylabel("certified accuracy")
        axes.set_ylim(0.0, 1.0)
        axes.set_title(f"{title}\n{names.get(theorem, theorem)}", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6.5)
    _save(figure, path)


def plot_design(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Paper Fig. 1: attacked vs clean accuracy, one curve (over gamma) per R_i(x) and space."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 4.4), dpi=110)
    names = {"one": "R=1", "grad_g_i": "R=||grad g_i||", "grad_max_g": "R=||grad max_j g_j||",
             "grad_g_i_grad_h_i": "R=||grad g_i|| ||grad h_i||"}
    keys = list(dict.fromkeys((row["trust"], row["space"]) for row in rows))
    colors = plt.get_cmap("tab10")
    trusts = list(dict.fromkeys(trust for trust, _ in keys))
    for trust, space in keys:
        points = sorted((row["gamma"], row["clean_accuracy"], row["attacked_accuracy"]) for row in rows
                        if row["trust"] == trust and row["space"] == space)
        probabilities = space == "probabilities"
        axes.plot([p[1] for p in points], [p[2] for p in points], "-" if probabilities else "--",
                  marker="o" if probabilities else "s", markersize=3.5, linewidth=1.4,
                  color=colors(trusts.index(trust)),
                  label=f"{names.get(trust, trust)}, {'softmax' if probabilities else 'logits'}")
    axes.set_xlabel("clean accuracy")
    axes.set_ylabel("PGD-attacked accuracy")
    axes.set_title(title + "\n(each curve: gamma from 0 to large; up and right is better)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, handlelength=3.5)
    _save(figure, path)


# ============================================================================ command line


def resolve_device(requested: str) -> torch.device:
    """`auto` (first CUDA device, else CPU), `cpu`, `cuda` or `cuda:N`."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise EvaluationError(f"--device {requested}: {error}") from error
    if device.type not in ("cpu", "cuda"):
        raise EvaluationError(f"--device {requested}: use auto, cpu or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {requested}: CUDA is not available")
    return device


def parse_floats(text: str) -> list[float]:
    """'0,0.1,0.5' -> [0.0, 0.1, 0.5]."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    if not values or not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"expected finite comma-separated numbers, got {text!r}")
    return values


def parse_alphas(text: str) -> list[float]:
    values = parse_floats(text)
    if not all(0.0 <= value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"alphas must be in [0, 1], got {text!r}")
    return values


def parse_names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    models_group = common.add_argument_group("models (zoo names win over --params)")
    models_group.add_argument("--standard", metavar="NAME", help="zoo name of g (default: standard)")
    models_group.add_argument("--robust", metavar="NAME",
                              help="zoo name of h (default: robust_at; certify: robust_lipschitz)")
    models_group.add_argument("--params", metavar="YAML",
                              help="ROS parameters file with standard_model.* / robust_model.* keys")
    data_group = common.add_argument_group("data and run")
    data_group.add_argument("--image-folder", metavar="DIR",
                            help="one sub-folder per class (default: Fashion-MNIST test set)")
    data_group.add_argument("--limit", type=int, default=None, metavar="N",
                            help="evaluate a seeded random subset of N images (default: all)")
    data_group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    data_group.add_argument("--batch-size", type=int, default=256, help="images per batch")
    data_group.add_argument("--seed", type=int, default=0, help="seed of subsets, noise and random starts")
    data_group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    data_group.add_argument("--out", default="eval_out", metavar="DIR", help="output folder")
    data_group.add_argument("--name", default=None, help="stem of the output files (default per command)")
    data_group.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    attack_options = argparse.ArgumentParser(add_help=False)
    attack_group = attack_options.add_argument_group("PGD attack")
    attack_group.add_argument("--norm", choices=NORMS, default="linf")
    attack_group.add_argument("--eps", type=float, default=None,
                              help=f"budget in [0,1] pixels (default {DEFAULT_EPS})")
    attack_group.add_argument("--steps", type=int, default=None, help="PGD steps (default 20; design: 10)")
    attack_group.add_argument("--step-size", type=float, default=None, help="default 2.5 eps / steps")
    attack_group.add_argument("--restarts", type=int, default=1, help="random starts per attack")

    parser = argparse.ArgumentParser(
        prog="mixclf-eval", description="Evaluate the mixed classifier log((1-alpha) g + alpha h) "
        "(Bai, Anderson, Sojoudi): accuracy under attack, margins, certified accuracy, design space.")
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", parents=[common, attack_options],
                                help="clean / STD / ROB / MIX-attacked accuracy over alpha (Fig. 2)")
    sweep.add_argument("--alphas", type=parse_alphas, default=list(DEFAULT_SWEEP_ALPHAS),
                       help="comma-separated weights of h in [0, 1]")
    sweep.add_argument("--attack-limit", type=int, default=None, metavar="N",
                       help="attack a seeded random subset of N of the evaluated images "
                       "(clean accuracy is also reported on all of them)")
    sweep.add_argument("--autoattack", action="store_true",
                       help="MIX: also APGD-CE, APGD-T and Square (torchattacks), worst case per sample")
    sweep.add_argument("--autoattack-iterations", type=int, default=100,
                       help="iterations of APGD-CE / APGD-T, queries of Square")
    sweep.add_argument("--autoattack-targets", type=int, default=None,
                       help="APGD-T target classes (default: all other classes)")
    sweep.add_argument("--autoattack-alphas", type=parse_alphas, default=None,
                       help="run AutoAttack only at these alphas (default: all of --alphas)")

    commands.add_parser("margins", parents=[common, attack_options],
                        help="mean top-1 minus top-2 probability gap of g and h (Table I)")

    certify_parser = commands.add_parser("certify", parents=[common],
                                         help="certified accuracy vs radius of the mixture (Fig. 3)")
    certify_parser.add_argument("--alphas", type=parse_alphas, default=list(DEFAULT_CERTIFY_ALPHAS),
                                help="comma-separated weights of h (below 1/2 nothing is certified)")
    certify_parser.add_argument("--radii", type=parse_floats, default=None,
                                help="radius grid (default: --num-radii points up to the largest radius)")
    certify_parser.add_argument("--num-radii", type=int, default=101, help="points of the default grid")
    certify_parser.add_argument("--baseline", metavar="NAME", help="zoo name of a baseline robust model")
    certify_parser.add_argument("--baseline-sigma", type=float, default=None,
                                help="smoothing: baseline = the robust base network smoothed with this sigma")
    certify_parser.add_argument("--sigma", type=float, default=None,
                                help="smoothing: noise level of the robust model (default: its config)")
    certify_parser.add_argument("--n0", type=int, default=None, help="smoothing selection samples")
    certify_parser.add_argument("--n", type=int, default=None, help="smoothing estimation samples")
    certify_parser.add_argument("--beta", type=float, default=None,
                                help="smoothing: 1 - joint confidence of the Monte Carlo bounds")

    design_parser = commands.add_parser("design", parents=[common, attack_options],
                                        help="R_i(x) choices and logits vs probabilities (Fig. 1)")
    design_parser.add_argument("--gammas", type=parse_floats, default=list(DEFAULT_GAMMAS),
                               help="comma-separated gamma >= 0 of eq. 3 (R=1 softmax: alpha = gamma/(1+gamma))")
    design_parser.add_argument("--trusts", type=parse_names, default=None,
                               help="comma-separated R_i(x) names (default: all of design.TRUST_TERMS)")
    design_parser.add_argument("--spaces", type=parse_names, default=None,
                               help="logits,probabilities (default: both)")
    design_parser.add_argument("--resume", action="store_true",
                               help="keep the points of an earlier run with the same output name, models, "
                               "data and attack, and compute only the missing ones")
    return parser


def _attack_settings(args: argparse.Namespace, default_steps: int) -> PGDSettings:
    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.norm]
    steps = args.steps if args.steps is not None else default_steps
    return PGDSettings(args.norm, eps, steps, args.step_size, args.restarts)


def _run_header(args: argparse.Namespace, argv: Sequence[str], pair: ModelPair, data: EvaluationData,
                runtime: Runtime) -> dict[str, Any]:
    return {
        "command": "mixclf-eval " + " ".join(argv),
        "arguments": {key: value for key, value in vars(args).items()},
        "device": str(runtime.device),
        "torch": torch.__version__,
        "seed": runtime.seed,
        "models": {"standard": describe_model(pair.standard, pair.standard_label),
                   "robust": describe_model(pair.robust, pair.robust_label)},
        "data": {"source": data.source, "available": data.total_available, "evaluated": int(data.labels.shape[0]),
                 "subset": "all" if data.labels.shape[0] == data.total_available
                 else f"seeded random subset (seed {runtime.seed})"},
    }


def _command_sweep(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    attack = _attack_settings(args, 20)
    attacked = subset_indices(data.labels.shape[0], args.attack_limit, args.seed)
    result = run_sweep(pair.standard, pair.robust, data.images[attacked], data.labels[attacked],
                       args.alphas, attack, runtime, clean_images=data.images, clean_labels=data.labels,
                       autoattack=args.autoattack, autoattack_iterations=args.autoattack_iterations,
                       autoattack_targets=args.autoattack_targets, autoattack_alphas=args.autoattack_alphas)
    write_csv(out / f"{stem}.csv", result.rows)
    attacked_subset = ("all evaluated images" if attacked.numel() == data.labels.shape[0] else
                       f"data.evaluation_subset({attacked.numel()}, seed={args.seed}) of the evaluated images")
    write_json(out / f"{stem}.json", {**header, "attack": attack, "num_clean": result.num_clean,
                                      "num_attacked": result.num_attacked, "attacked_subset": attacked_subset,
                                      "reference": result.reference,
                                      "throughput_images_per_second": result.throughput, "rows": result.rows})
    title = f"g={pair.standard_label}, h={pair.robust_label}\n{attack.describe()}"
    plot_sweep(result, out / f"{stem}.png", title)
    columns = ["alpha", "clean_accuracy_all", "clean_accuracy", "std_accuracy", "rob_accuracy", "mix_pgd_accuracy"]
    if result.autoattack:
        columns.append("mix_worst_accuracy")
    columns.append("worst_accuracy")
    print(f"{attack.describe()}; clean on {result.num_clean} images, attacks on {result.num_attacked}")
    headers = ["alpha", "clean(all)", "clean", "STD", "ROB", "MIX"]
    headers += ["MIX+AA", "worst"] if result.autoattack else ["worst"]
    print(format_table(headers, [[row[column] for column in columns] for row in result.rows]))
    print("reference: " + ", ".join(f"{key}={value:.4f}" for key, value in result.reference.items()))
    print("images/s: " + ", ".join(f"{key}={value:.1f}" for key, value in result.throughput.items()))


def _command_margins(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    attack = _attack_settings(args, 20)
    table = margins_table(pair.standard, pair.robust, data.images, data.labels, attack, runtime)
    write_csv(out / f"{stem}.csv", table)
    write_json(out / f"{stem}.json", {**header, "attack": attack, "table": table})
    plot_margins(table, out / f"{stem}.png",
                 f"g={pair.standard_label}, h={pair.robust_label}\n{attack.describe()} aimed at each model")
    print(f"mean top-1 minus top-2 probability; attacked = {attack.describe()} aimed at the model itself")
    print(format_table(["model", "clean correct", "clean incorrect", "PGD correct", "PGD incorrect",
                        "clean acc", "PGD acc"],
                       [[row["model"], *(row[column] for column in MARGIN_COLUMNS), row["accuracy_clean"],
                         row["accuracy_attacked"]] for row in table]))


def _command_certify(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    baseline = load_zoo_model(args.baseline, runtime.device) if args.baseline else None
    result = certify_mixture(pair.standard, pair.robust, data.images, data.labels, args.alphas, runtime,
                             radii=args.radii, num_radii=args.num_radii, baseline=baseline,
                             baseline_label=args.baseline or "", baseline_sigma=args.baseline_sigma,
                             n0=args.n0, n=args.n, beta=args.beta, sigma=args.sigma)
    long_rows = [{"model": curve["model"], "theorem": curve["theorem"], "alpha": curve["alpha"],
                  "radius": radius, "certified_accuracy": accuracy}
                 for curve in result.curves for radius, accuracy in zip(result.radii, curve["accuracy"])]
    write_csv(out / f"{stem}.csv", long_rows)
    write_json(out / f"{stem}.json", {**header, "certificate": result.certificate_settings,
                                      "baseline": result.baseline, "radii": result.radii,
                                      "curves": result.curves})
    sigma = result.certificate_settings.get("sigma")
    noise = f" smoothed with sigma={sigma:g}" if sigma is not None else ""
    plot_certify(result, out / f"{stem}.png", f"g={pair.standard_label}, h={pair.robust_label}{noise}")
    print(f"certificate: {result.certificate_settings}")
    print(f"baseline: {result.baseline}")
    probe = _probe_radii(result.radii)
    print("certified accuracy at radius r (r>0: any positive certificate):")
    print(format_table(["model", "theorem", "alpha", "clean", *[("r>0" if r == 0 else f"r>={r:.3g}") for r in probe]],
                       [[curve["model"], curve["theorem"], curve["alpha"], curve["clean_accuracy"],
                         *(_accuracy_at(result.radii, curve["accuracy"], r) for r in probe)]
                        for curve in result.curves]))


def _probe_radii(grid: Sequence[float], count: int = 5) -> list[float]:
    """A few radii of the grid for the printed table (grid points, so the values are exact)."""
    if len(grid) <= count:
        return list(grid)
    return [grid[round(i * (len(grid) - 1) / (count - 1))] for i in range(count)]


def _accuracy_at(grid: Sequence[float], accuracy: Sequence[float], radius: float) -> float:
    return accuracy[list(grid).index(radius)]


def _command_design(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    attack = _attack_settings(args, 10)
    known_rows = _resumable_rows(out / f"{stem}.json", header, attack) if args.resume else []
    rows = design_comparison(pair.standard, pair.robust, data.images, data.labels, args.gammas, attack, runtime,
                             trusts=args.trusts, spaces=args.spaces, known_rows=known_rows)
    write_csv(out / f"{stem}.csv", rows)
    write_json(out / f"{stem}.json", {**header, "attack": attack, "rows": rows})
    plot_design(rows, out / f"{stem}.png",
                f"g={pair.standard_label}, h={pair.robust_label}\neq. 3, end-to-end {attack.describe()}")
    print(f"eq. 3 scores; end-to-end {attack.describe()}")
    print(format_table(["trust", "space", "gamma", "clean", "attacked"],
                       [[row["trust"], row["space"], row["gamma"], row["clean_accuracy"],
                         row["attacked_accuracy"]] for row in rows]))


def _resumable_rows(path: Path, header: dict[str, Any], attack: PGDSettings) -> list[dict[str, Any]]:
    """Rows of an earlier design run in `path`, if it used the same models, data, seed and attack."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = (earlier.get("attack") == _json_ready(attack)
            and all(earlier["models"][role].get("sha256") == header["models"][role].get("sha256")
                    for role in ("standard", "robust"))
            and earlier.get("data") == header["data"] and earlier.get("seed") == header["seed"])
    if not same:
        raise EvaluationError(f"--resume: {path} comes from other models, data, seed or attack settings")
    return earlier["rows"]


COMMANDS = {"sweep": _command_sweep, "margins": _command_margins, "certify": _command_certify,
            "design": _command_design}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mixclf-eval`; returns the process exit status (0 ok, 2 usage/config error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.batch_size < 1:
            raise EvaluationError("--batch-size must be >= 1")
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        runtime = Runtime(resolve_device(args.device), args.batch_size, args.seed, not args.no_progress)
        torch.manual_seed(args.seed)
        pair = load_model_pair(args.standard, args.robust, args.params, DEFAULT_ROBUST[args.command],
                               runtime.device)
        if args.command != "certify" and getattr(pair.robust, "kind", None) == "smoothing":
            print("mixclf-eval: note: the robust model is a smoothing model; this command uses its base "
                  "network without noise", file=sys.stderr)
        data = load_evaluation_data(pair.robust.input_shape, args.image_folder, args.limit, args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        default_stems = {"sweep": f"sweep_{getattr(args, 'norm', '')}",
                         "margins": f"margins_{getattr(args, 'norm', '')}",
                         "design": f"design_{getattr(args, 'norm', '')}",
                         "certify": f"certify_{pair.robust_label.replace(':', '_').replace('/', '_')}"}
        stem = args.name or default_stems[args.command]
        header = _run_header(args, argv, pair, data, runtime)
        COMMANDS[args.command](args, header, pair, data, runtime, out, stem)
    except (EvaluationError, FileNotFoundError) as error:
        print(f"mixclf-eval: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__name__ != "ModelConfigError":
            raise
        print(f"mixclf-eval: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out / stem}.csv, .json, .png in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
