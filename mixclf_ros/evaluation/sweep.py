"""Paper Fig. 2: clean and STD / ROB / MIX-attacked accuracy of the mixture (eq. 4) over alpha."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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
)
from mixclf_ros.evaluation.settings import PGDSettings, Runtime, SweepSettings
from mixclf_ros.evaluation.units import ModelSet, Unit, UnitContext, execute, shards


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

    Work units (`evaluation.units`): per image shard the clean predictions, the STD and the ROB attack
    (they do not depend on alpha: once per shard), and per (alpha, shard) the MIX attack, then
    AutoAttack on its survivors; each unit with its own seed.
    """
    runtime = runtime or Runtime()
    attack, autoattack, alphas = settings.attack, settings.autoattack, settings.alphas
    if clean_images is None or clean_labels is None:
        clean_images, clean_labels = images, labels
    clean_shards = shards(clean_images, clean_labels, runtime)
    attacked_shards = shards(images, labels, runtime)
    units = [Unit(f"clean_all/shard={i}", _clean_unit, *part, {"alphas": alphas})
             for i, part in enumerate(clean_shards)]
    for i, part in enumerate(attacked_shards):
        units.append(Unit(f"clean/shard={i}", _clean_unit, *part, {"alphas": alphas}))
        for name, target in (("std", "standard"), ("rob", "robust")):
            units.append(Unit(f"{name}/shard={i}", _transfer_unit, *part,
                              {"alphas": alphas, "attack": attack, "target": target}))
    for alpha in alphas:
        for i, part in enumerate(attacked_shards):
            mix_key = f"mix/alpha={alpha!r}/shard={i}"
            units.append(Unit(mix_key, _mix_unit, *part, {"alpha": alpha, "attack": attack}))
            if autoattack is not None and autoattack.runs_at(alpha):
                units.append(Unit(f"autoattack/alpha={alpha!r}/shard={i}", _autoattack_unit, *part,
                                  {"alpha": alpha, "attack": attack, "autoattack": autoattack}, depends_on=mix_key))
    results = execute(units, ModelSet(standard, robust), runtime, "sweep units")

    def joined(kind: str, name: str, count: int = len(attacked_shards), alpha: float | None = None) -> torch.Tensor:
        keys = [f"{kind}/shard={i}" if alpha is None else f"{kind}/alpha={alpha!r}/shard={i}" for i in range(count)]
        parts = [results[key][name] for key in keys]
        if parts:
            return torch.cat(parts, dim=-1)
        rows_of = {"mix": (len(alphas),), "per_attack": (len(AUTOATTACK_NAMES),)}
        return torch.zeros(*rows_of.get(name, ()), 0, dtype=torch.bool)  # no images in this set

    g_all, h_all, mix_all = (joined("clean_all", name, len(clean_shards)) for name in ("g", "h", "mix"))
    g_correct, h_correct, clean_mix = (joined("clean", name) for name in ("g", "h", "mix"))
    std_g, std_h, std_mix = (joined("std", name) for name in ("g", "h", "mix"))
    rob_g, rob_h, rob_mix = (joined("rob", name) for name in ("g", "h", "mix"))
    reference = {
        "standard_clean_accuracy_all": mean_or_nan(g_all),
        "robust_clean_accuracy_all": mean_or_nan(h_all),
        "standard_clean_accuracy": mean_or_nan(g_correct),
        "robust_clean_accuracy": mean_or_nan(h_correct),
        "standard_std_attacked_accuracy": mean_or_nan(g_correct & std_g),
        "robust_rob_attacked_accuracy": mean_or_nan(h_correct & rob_h),
        "robust_std_attacked_accuracy": mean_or_nan(h_correct & std_h),
        "standard_rob_attacked_accuracy": mean_or_nan(g_correct & rob_g),
    }
    rows = []
    for index, alpha in enumerate(alphas):
        clean_correct = clean_mix[index]
        std_correct = clean_correct & std_mix[index]
        rob_correct = clean_correct & rob_mix[index]
        mix_correct = joined("mix", "correct", alpha=alpha)  # clean-and-attacked correct
        row = {
            "alpha": float(alpha),
            "clean_accuracy_all": mean_or_nan(mix_all[index]),
            "clean_accuracy": mean_or_nan(clean_correct),
            "std_accuracy": mean_or_nan(std_correct),
            "rob_accuracy": mean_or_nan(rob_correct),
            "mix_pgd_accuracy": mean_or_nan(mix_correct),
        }
        robust_to_all = std_correct & rob_correct & mix_correct
        if autoattack is not None:
            runs = autoattack.runs_at(alpha)
            per_attack = joined("autoattack", "per_attack", alpha=alpha) if runs else None
            for position, name in enumerate(AUTOATTACK_NAMES):
                row[f"mix_{name.replace('-', '_')}_accuracy"] = (mean_or_nan(per_attack[position]) if runs
                                                                 else math.nan)
            if runs:
                worst = joined("autoattack", "worst", alpha=alpha)
                row["mix_worst_accuracy"] = mean_or_nan(worst)
                robust_to_all &= worst
            else:
                row["mix_worst_accuracy"] = math.nan
        row["worst_accuracy"] = mean_or_nan(robust_to_all)
        rows.append(row)

    def rate(prefix: str) -> float:
        chosen = [result for key, result in results.items() if key.startswith(prefix)]
        return images_per_second(sum(int(result["attacked"]) for result in chosen),
                                 sum(float(result["seconds"]) for result in chosen))

    throughput = {"pgd_std": rate("std/"), "pgd_rob": rate("rob/"), "pgd_mix": rate("mix/")}
    if autoattack is not None:
        throughput["autoattack_apgd_ce_apgd_t_square"] = rate("autoattack/")
    return SweepResult(rows, reference, throughput, attack, int(clean_labels.shape[0]),
                       int(labels.shape[0]), autoattack is not None)


def _mixture_per_alpha(logits_g: torch.Tensor, logits_h: torch.Tensor, labels: torch.Tensor,
                       alphas: tuple[float, ...]) -> torch.Tensor:
    """(len(alphas), n) bool: eq. 4 correct at each alpha."""
    if not alphas:
        return torch.zeros(0, labels.shape[0], dtype=torch.bool)
    return torch.stack([mixture_correct(logits_g, logits_h, labels, alpha) for alpha in alphas])


def _clean_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, torch.Tensor]:
    """Clean predictions of one shard: g, h (n,) correct and the mixture (alphas, n) correct."""
    runtime = context.runtime_for(unit)
    logits_g, logits_h = both_logits(context.models.standard, context.models.robust, unit.images, runtime)
    return {"g": logits_g.argmax(1) == unit.labels, "h": logits_h.argmax(1) == unit.labels,
            "mix": _mixture_per_alpha(logits_g, logits_h, unit.labels, unit.params["alphas"])}


def _transfer_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, object]:
    """STD or ROB attack on one shard (classic PGD aimed at g or at h): g, h and the mixture at each
    alpha correct on the adversarial images (not yet and-ed with clean correctness)."""
    runtime = context.runtime_for(unit)
    model = getattr(context.models, unit.params["target"])
    adversarial, seconds = final_iterate_pgd(model, unit.images, unit.labels, unit.params["attack"], runtime,
                                             f"PGD on {unit.params['target']}")
    logits_g, logits_h = both_logits(context.models.standard, context.models.robust, adversarial, runtime)
    return {"g": logits_g.argmax(1) == unit.labels, "h": logits_h.argmax(1) == unit.labels,
            "mix": _mixture_per_alpha(logits_g, logits_h, unit.labels, unit.params["alphas"]),
            "seconds": seconds, "attacked": int(unit.labels.shape[0])}


def _mix_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, object]:
    """MIX attack on one shard at one alpha: end-to-end first-success PGD on the mixture, on the samples
    it classifies correctly; `correct` (n,) = correct on the clean and on the adversarial image."""
    runtime = context.runtime_for(unit)
    standard, robust = context.models.standard, context.models.robust
    alpha, images, labels = unit.params["alpha"], unit.images, unit.labels
    correct = mixture_correct(*both_logits(standard, robust, images, runtime), labels, alpha)
    targets = torch.nonzero(correct).flatten()  # wrong on clean data: already not robust
    seconds = 0.0
    if targets.numel():
        adversarial, seconds = first_success_pgd(MixedClassifier(standard, robust, alpha), images[targets],
                                                 labels[targets], unit.params["attack"], runtime,
                                                 f"MIX attack alpha={alpha:g}")
        correct[targets] = mixture_correct(*both_logits(standard, robust, adversarial, runtime), labels[targets],
                                           alpha)
    return {"correct": correct, "seconds": seconds, "attacked": int(targets.numel())}


def _autoattack_unit(context: UnitContext, unit: Unit, dependency: dict) -> dict[str, object]:
    """APGD-CE, APGD-T and Square on the mixture, on the samples of one shard that survive its MIX
    attack (`dependency`): `per_attack` (3, n) robust to PGD and that attack, `worst` (n,) to all."""
    runtime = context.runtime_for(unit)
    standard, robust = context.models.standard, context.models.robust
    alpha, attack, labels = unit.params["alpha"], unit.params["attack"], unit.labels
    autoattack = unit.params["autoattack"]
    mix_correct = dependency["correct"]
    survivors = torch.nonzero(mix_correct).flatten()
    worst = mix_correct.clone()
    per_attack = [mix_correct.clone() for _ in AUTOATTACK_NAMES]
    seconds = 0.0
    if survivors.numel():
        adversarial, seconds = autoattack_in_batches(
            MixedClassifier(standard, robust, alpha), unit.images[survivors], labels[survivors], attack.norm,
            attack.eps, autoattack.iterations, autoattack.target_classes, runtime, f"AutoAttack alpha={alpha:g}")
        for position, name in enumerate(AUTOATTACK_NAMES):
            still = mixture_correct(*both_logits(standard, robust, adversarial[name], runtime), labels[survivors],
                                    alpha)
            per_attack[position][survivors] = still
            worst[survivors] &= still
    return {"per_attack": torch.stack(per_attack), "worst": worst, "seconds": seconds,
            "attacked": int(survivors.numel())}
