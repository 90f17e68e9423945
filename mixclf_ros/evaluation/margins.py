"""Paper Table I: mean top-1 minus top-2 probability gap of g and of h, clean and under PGD."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.attack_runs import final_iterate_pgd, mean_or_nan, predict_logits
from mixclf_ros.evaluation.settings import PGDSettings, Runtime


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
