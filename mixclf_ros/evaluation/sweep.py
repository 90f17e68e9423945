"""Paper Fig. 2: clean and STD / ROB / MIX-attacked accuracy of the mixture (eq. 4) over alpha."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from mixclf_ros.core.mixing import MixedClassifier
from mixclf_ros.evaluation.attack_runs import (
    AUTOATTACK_NAMES,
    autoattack_in_batches,
    both_logits,
    final_iterate_pgd,
    first_success_pgd,
    images_per_second,
    mean_or_nan,
    mixture_correct,
    predict_logits,
)
from mixclf_ros.evaluation.settings import PGDSettings, Runtime, SweepSettings


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
              settings: SweepSettings, runtime: Runtime | None = None, clean_images: torch.Tensor | None = None,
              clean_labels: torch.Tensor | None = None) -> SweepResult:
    """Clean and attacked accuracy of `MixedClassifier(standard, robust, alpha)` for each alpha.

    Args:
        standard, robust: g and h, [0,1] pixels -> logits, in eval mode on `runtime.device`.
        images, labels: the attacked set, (N, C, H, W) in [0, 1] and (N,), on CPU.
        settings: the alphas (weights of h, in [0, 1]), the PGD budget of all three attacks (STD,
            ROB, MIX) and optional AutoAttack (APGD-CE, APGD-T and Square on the mixture, on the
            samples still correct after the MIX PGD attack; at `settings.autoattack.alphas` only,
            the other rows get NaN in the AutoAttack columns).
        clean_images, clean_labels: optional larger clean set for `clean_accuracy_all`.

    The STD and ROB adversarial examples do not depend on alpha and are computed once.
    """
    runtime = runtime or Runtime()
    attack, autoattack = settings.attack, settings.autoattack
    if clean_images is None or clean_labels is None:
        clean_images, clean_labels = images, labels
    g_clean_all = predict_logits(standard, clean_images, runtime, "clean g")
    h_clean_all = predict_logits(robust, clean_images, runtime, "clean h")
    g_clean = predict_logits(standard, images, runtime, "clean g (attacked set)")
    h_clean = predict_logits(robust, images, runtime, "clean h (attacked set)")

    x_std, seconds_std = final_iterate_pgd(standard, images, labels, attack, runtime, "STD attack")
    x_rob, seconds_rob = final_iterate_pgd(robust, images, labels, attack, runtime, "ROB attack")
    g_on_std, h_on_std = both_logits(standard, robust, x_std, runtime)
    g_on_rob, h_on_rob = both_logits(standard, robust, x_rob, runtime)

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
    mix_timer = _Timer()
    auto_timer = _Timer()
    rows = []
    for alpha in tqdm(settings.alphas, desc="alpha grid", disable=not runtime.progress, unit="alpha"):
        clean_correct = mixture_correct(g_clean, h_clean, labels, alpha)
        std_correct = clean_correct & mixture_correct(g_on_std, h_on_std, labels, alpha)
        rob_correct = clean_correct & mixture_correct(g_on_rob, h_on_rob, labels, alpha)

        mixture = MixedClassifier(standard, robust, alpha)
        mix_correct = clean_correct.clone()
        targets = torch.nonzero(clean_correct).flatten()  # wrong on clean data: already not robust
        if targets.numel():
            x_mix, seconds = first_success_pgd(mixture, images[targets], labels[targets], attack, runtime,
                                               f"MIX attack alpha={alpha:g}")
            mix_timer.add(targets.numel(), seconds)
            mix_correct[targets] = mixture_correct(*both_logits(standard, robust, x_mix, runtime),
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
        if autoattack is not None:
            worst_correct = _autoattack_columns(row, mixture, standard, robust, images, labels, mix_correct,
                                                alpha, settings, runtime, auto_timer)
            if worst_correct is not None:
                robust_to_all &= worst_correct
        row["worst_accuracy"] = mean_or_nan(robust_to_all)
        rows.append(row)
    throughput = {
        "pgd_std": images_per_second(images.shape[0], seconds_std),
        "pgd_rob": images_per_second(images.shape[0], seconds_rob),
        "pgd_mix": mix_timer.rate(),
    }
    if autoattack is not None:
        throughput["autoattack_apgd_ce_apgd_t_square"] = auto_timer.rate()
    return SweepResult(rows, reference, throughput, attack, int(clean_labels.shape[0]),
                       int(labels.shape[0]), autoattack is not None)


class _Timer:
    """Images attacked and seconds spent, summed over the alpha grid."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def add(self, count: int, seconds: float) -> None:
        self.count += int(count)
        self.seconds += seconds

    def rate(self) -> float:
        return images_per_second(self.count, self.seconds)


def _autoattack_columns(row: dict[str, float], mixture: nn.Module, standard: nn.Module, robust: nn.Module,
                        images: torch.Tensor, labels: torch.Tensor, mix_correct: torch.Tensor, alpha: float,
                        settings: SweepSettings, runtime: Runtime, timer: _Timer) -> torch.Tensor | None:
    """Fills the AutoAttack columns of `row` (NaN where AutoAttack does not run at `alpha`); returns
    (N,) bool correct under PGD and all three attacks, or None where it does not run."""
    autoattack = settings.autoattack
    assert autoattack is not None
    if not autoattack.runs_at(alpha):
        for name in AUTOATTACK_NAMES:
            row[f"mix_{name.replace('-', '_')}_accuracy"] = math.nan
        row["mix_worst_accuracy"] = math.nan
        return None
    survivors = torch.nonzero(mix_correct).flatten()
    worst_correct = mix_correct.clone()
    per_attack = {name: mix_correct.clone() for name in AUTOATTACK_NAMES}
    if survivors.numel():
        adversarial, seconds = autoattack_in_batches(
            mixture, images[survivors], labels[survivors], settings.attack.norm, settings.attack.eps,
            autoattack.iterations, autoattack.target_classes, runtime, f"AutoAttack alpha={alpha:g}")
        timer.add(survivors.numel(), seconds)
        for name in AUTOATTACK_NAMES:
            still = mixture_correct(*both_logits(standard, robust, adversarial[name], runtime),
                                    labels[survivors], alpha)
            per_attack[name][survivors] = still
            worst_correct[survivors] &= still
    for name in AUTOATTACK_NAMES:
        row[f"mix_{name.replace('-', '_')}_accuracy"] = mean_or_nan(per_attack[name])
    row["mix_worst_accuracy"] = mean_or_nan(worst_correct)
    return worst_correct
