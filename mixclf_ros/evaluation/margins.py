"""Paper Table I: mean top-1 minus top-2 probability gap of g and of h, clean and under PGD."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.attack_runs import final_iterate_pgd, mean_or_nan, predict_logits
from mixclf_ros.evaluation.settings import PGDSettings, Runtime
from mixclf_ros.evaluation.units import ModelSet, Unit, UnitContext, execute, shards


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
    parts = shards(images, labels, runtime)
    units = [Unit(f"margins/{name}/shard={i}", _margins_unit, *part, {"attack": attack, "target": role})
             for name, role in (("g", "standard"), ("h", "robust")) for i, part in enumerate(parts)]
    results = execute(units, ModelSet(standard, robust), runtime, "margins units")
    table = []
    for name in ("g", "h"):
        keys = [f"margins/{name}/shard={i}" for i in range(len(parts))]
        row: dict[str, Any] = {"model": name}
        for condition in ("clean", "attacked"):
            correct = _joined(results, keys, f"{condition}_correct", torch.bool)
            gap = _joined(results, keys, f"{condition}_gap", torch.float32)
            row[f"accuracy_{condition}"] = mean_or_nan(correct)
            for outcome, mask in (("correct", correct), ("incorrect", ~correct)):
                row[f"{condition}_{outcome}"] = mean_or_nan(gap[mask])
                row[f"count_{condition}_{outcome}"] = int(mask.sum())
        table.append(row)
    return table


def _joined(results: dict[str, dict], keys: list[str], name: str, dtype: torch.dtype) -> torch.Tensor:
    parts = [results[key][name] for key in keys]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def _margins_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, torch.Tensor]:
    """One model on one shard: correct and top-1 minus top-2 gap, clean and under PGD aimed at it."""
    runtime = context.runtime_for(unit)
    model = getattr(context.models, unit.params["target"])
    clean_logits = predict_logits(model, unit.images, runtime)
    adversarial, _ = final_iterate_pgd(model, unit.images, unit.labels, unit.params["attack"], runtime, "PGD")
    attacked_logits = predict_logits(model, adversarial, runtime)
    return {f"{condition}_{what}": value for condition, logits in (("clean", clean_logits),
                                                                   ("attacked", attacked_logits))
            for what, value in (("correct", logits.argmax(1) == unit.labels), ("gap", probability_gap(logits)))}
