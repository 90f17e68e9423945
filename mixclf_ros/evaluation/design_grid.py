"""Paper Fig. 1 / eq. 3: clean and end-to-end attacked accuracy over the design space of R_i(x),
logits or probabilities, and gamma."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.attack_runs import first_success_pgd, images_per_second, mean_or_nan
from mixclf_ros.evaluation.settings import DesignSettings, Runtime
from mixclf_ros.evaluation.units import ModelSet, Unit, UnitContext, execute, shards


def design_comparison(standard: nn.Module, robust: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      settings: DesignSettings, runtime: Runtime | None = None,
                      known_rows: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Fig. 1: clean and PGD-attacked accuracy of eq. 3 (`design.SmoothedClassifier`) for each trust
    term R_i(x), each space (logits / probabilities, then log) and each gamma of `settings`.

    The attack is end-to-end PGD (`attacks.pgd`) on the eq. 3 scores, differentiating through the
    gradient-norm trust terms as well (double backpropagation), on the clean-correct samples.
    Returns one dict per (trust, space, gamma): `trust`, `space`, `gamma`, `clean_accuracy`,
    `attacked_accuracy`, `images_per_second` (of the attack). Points already in `known_rows` (same
    keys, from an earlier run with the same models, data and attack) are reused, not recomputed.
    """
    from mixclf_ros.core import design

    runtime = runtime or Runtime()
    attack, gammas = settings.attack, settings.gammas
    trusts = tuple(settings.trusts or design.TRUST_TERMS)
    spaces = tuple(settings.spaces or design.SPACES)
    known = {(row["trust"], row["space"], float(row["gamma"])): row for row in known_rows}
    rows = [dict(row) for row in known_rows]
    combinations = [(trust, space, float(gamma)) for trust in trusts for space in spaces for gamma in gammas
                    if (trust, space, float(gamma)) not in known]
    parts = shards(images, labels, runtime)

    def key(trust: str, space: str, gamma: float, shard: int) -> str:
        return f"design/{trust}/{space}/gamma={gamma!r}/shard={shard}"

    units = [Unit(key(trust, space, gamma, i), _design_unit, *part,
                  {"trust": trust, "space": space, "gamma": gamma, "attack": attack})
             for trust, space, gamma in combinations for i, part in enumerate(parts)]
    results = execute(units, ModelSet(standard, robust), runtime, "design units")
    for trust, space, gamma in combinations:
        done = [results[key(trust, space, gamma, i)] for i in range(len(parts))]
        clean_correct = torch.cat([unit["clean_correct"] for unit in done]) if done else torch.zeros(0, dtype=bool)
        attacked_correct = (torch.cat([unit["attacked_correct"] for unit in done]) if done
                            else torch.zeros(0, dtype=bool))
        rows.append({"trust": trust, "space": space, "gamma": float(gamma),
                     "clean_accuracy": mean_or_nan(clean_correct),
                     "attacked_accuracy": mean_or_nan(attacked_correct),
                     "images_per_second": images_per_second(sum(int(unit["attacked"]) for unit in done),
                                                            sum(float(unit["seconds"]) for unit in done))})
    return rows


def _design_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, object]:
    """One (trust term, space, gamma) point of eq. 3 on one shard: clean correct, and correct under
    end-to-end first-success PGD (on the clean-correct samples)."""
    from mixclf_ros.core import design

    runtime = context.runtime_for(unit)
    trust, space, gamma, attack = (unit.params[name] for name in ("trust", "space", "gamma", "attack"))
    images, labels = unit.images, unit.labels
    scored = design.SmoothedClassifier(context.models.standard, context.models.robust, float(gamma), trust=trust,
                                       space=space, norm=attack.norm)
    scores = []
    for part in runtime.batches(images.shape[0], "clean"):
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
    return {"clean_correct": clean_correct, "attacked_correct": attacked_correct, "seconds": seconds,
            "attacked": int(targets.numel())}
