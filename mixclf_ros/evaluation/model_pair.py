"""The two models g (standard) and h (robust) of an evaluation: loaded from the zoo or a parameters
file, frozen, in eval mode, and described for the JSON output."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.params_file import model_configs_from_parameters


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


def load_config(config: dict[str, Any], device: torch.device, role: str = "") -> nn.Module:
    """`models.load_model` (validated against `models.schema`; errors prefixed with `role`), prepared."""
    from mixclf_ros import models

    model = models.load_model(dict(config), name=role)
    if role and (note := models.unpinned_note(model, role)):
        print(note, file=sys.stderr)
    return prepare_model(model, device)


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
            loaded.append((load_config(configs[prefix], device, prefix), f"{Path(params_file).name}:{prefix}"))
        else:
            chosen = name or default
            loaded.append((load_zoo_model(chosen, device), chosen))
    (standard, standard_label), (robust, robust_label) = loaded
    models.check_compatible(standard, robust)
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
