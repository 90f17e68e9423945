"""Batched inference and the attack runners of the experiments: classic final-iterate PGD (STD / ROB
attacks, Table I), end-to-end first-success PGD (MIX attacks, eq. 3 design), AutoAttack components.

Images are [0,1] pixels (N, C, H, W) on the CPU; batches run on `Runtime.device`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mixclf_ros import attacks
from mixclf_ros.core.mixing import mix_log_probs
from mixclf_ros.evaluation.settings import PGDSettings, Runtime, seeded_global_rng


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
    """Classic PGD aimed at `model` (`attacks.pgd(..., keep="final")`: torchattacks `PGD` / `PGDL2`,
    random start, all `steps` steps); per sample the final iterate of the restart with the highest
    cross-entropy, random starts from the global RNG seeded with `runtime.seed`.

    This is the adversarial data of the paper's STD / ROB attacks and of Table I: unlike an attack
    that stops at the first misclassified iterate, it ends deep in the wrong class, so it is the
    strong choice to transfer to another classifier (the mixture).

    Returns (x_adv on CPU, seconds spent attacking).
    """
    def final(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pgd": attacks.pgd(model, x, y, eps=settings.eps, norm=settings.norm, steps=settings.steps,
                                   step_size=settings.resolved_step_size, restarts=settings.restarts, keep="final")}

    with seeded_global_rng(runtime.seed, runtime.device):
        adversarial, seconds = _attack_in_batches(final, images, labels, runtime, description, ("pgd",))
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


def both_logits(standard: nn.Module, robust: nn.Module, images: torch.Tensor,
                runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of g, logits of h) on `images`, on CPU."""
    return predict_logits(standard, images, runtime), predict_logits(robust, images, runtime)
