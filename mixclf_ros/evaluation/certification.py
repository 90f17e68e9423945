"""Paper Fig. 3: certified accuracy vs radius of the mixture at each alpha (Theorems 1 and 2) and of a
baseline robust model of equal clean accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.attack_runs import mean_or_nan, predict_logits
from mixclf_ros.evaluation.certificates import (
    Certificates,
    match_alpha,
    mixture_clean_accuracy,
    robust_certificates,
)
from mixclf_ros.evaluation.settings import CertifySettings, EvaluationError, Runtime, SmoothingOverrides
from mixclf_ros.evaluation.units import ModelSet, Unit, UnitContext, execute, shards
from mixclf_ros.runtime.frame_result import ONE_GREY_LEVEL
from mixclf_ros.runtime.reachability import unreachable_warning


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
class CertifyResult:
    """Certified accuracy curves.

    curves: one dict per (model, theorem, alpha): `model` ("mixture" or "baseline"), `theorem`,
        `alpha`, `clean_accuracy`, `certified_fraction` (positive radius, correct class),
        `median_radius` (over correct certified samples), `accuracy` (list over `radii`).
    radii: the radius grid, in `norm`, [0,1] pixels.
    baseline: how the baseline was chosen.
    warnings: what makes the curves meaningless in practice (e.g. every radius below one grey level).
    """

    curves: list[dict[str, Any]]
    radii: list[float]
    norm: str
    baseline: dict[str, Any]
    certificate_settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _curve(model: str, theorem: str, alpha: float, clean_accuracy: float, certificates: Certificates,
           labels: torch.Tensor) -> dict[str, Any]:
    radius = certificates.radius(theorem, alpha)
    good = (certificates.predicted == labels) & (radius > 0)
    return {"model": model, "theorem": theorem, "alpha": float(alpha), "clean_accuracy": clean_accuracy,
            "certified_fraction": mean_or_nan(good),
            "median_radius": float(radius[good].median()) if bool(good.any()) else 0.0,
            "_radius": radius, "_predicted": certificates.predicted}


def certify_mixture(standard: nn.Module, robust: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    settings: CertifySettings, runtime: Runtime | None = None, baseline: nn.Module | None = None,
                    baseline_label: str = "") -> CertifyResult:
    """Certified accuracy vs radius of the mixture at each alpha (Theorem 1; for a smoothed robust
    model also Theorem 2), and of a baseline robust model of equal clean accuracy (paper Fig. 3).

    Baseline: `baseline` (another loaded robust model, certified at alpha = 1), or for a smoothed
    robust model `settings.baseline_sigma` (the same base network smoothed with that sigma); the
    mixture is then also evaluated at the alpha in [1/2, 1] whose clean accuracy matches the
    baseline's (`match_alpha`). Without either, the baseline is the robust model alone at alpha = 1.

    `settings.smoothing` n0 / n / beta override the settings of both smoothed models, its sigma the
    noise level of the robust model (e.g. a larger sigma than it was trained with, as the paper's
    Fig. 3 mixes a large-sigma model and compares it with a smaller-sigma baseline).
    """
    runtime = runtime or Runtime()
    overrides = settings.smoothing
    if overrides.sigma is not None and getattr(robust, "kind", None) != "smoothing":
        raise EvaluationError("--sigma applies to a smoothing robust model only")
    kind = getattr(robust, "kind", None)
    if kind not in ("lipschitz", "smoothing"):
        raise EvaluationError(f"certify needs a robust model of kind 'lipschitz' or 'smoothing', got {kind!r}")
    baseline_plan = _baseline_plan(robust, settings, baseline, baseline_label)
    parts = shards(images, labels, runtime)
    plans = {"robust": ("robust", overrides)}
    if baseline_plan is not None:
        plans["baseline"] = baseline_plan[:2]
    units = [Unit(f"certify/logits_g/shard={i}", _logits_unit, *part, {"role": "standard"})
             for i, part in enumerate(parts)]
    units += [Unit(f"certify/{name}/shard={i}", _certificates_unit, *part, {"role": role, "overrides": unit_overrides})
              for name, (role, unit_overrides) in plans.items() for i, part in enumerate(parts)]
    results = execute(units, ModelSet(standard, robust, baseline), runtime, "certify units")
    logits_g = torch.cat([results[f"certify/logits_g/shard={i}"]["logits"] for i in range(len(parts))]).double()
    certificates = _joined_certificates([results[f"certify/robust/shard={i}"] for i in range(len(parts))])
    if baseline_plan is None:
        baseline_certificates, baseline_info = certificates, {
            "description": "the robust model alone (alpha = 1): no robust model of equal clean accuracy was "
                           "given", "label": "robust model"}
    else:
        baseline_certificates = _joined_certificates([results[f"certify/baseline/shard={i}"]
                                                      for i in range(len(parts))])
        baseline_info = baseline_plan[2]
    curves = []
    for alpha in settings.alphas:
        accuracy = mixture_clean_accuracy(logits_g, certificates, labels, alpha)
        for theorem in certificates.theorems():
            curves.append(_curve("mixture", theorem, alpha, accuracy, certificates, labels))

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
    warnings = _grey_level_warnings(curves, certificates.norm)
    radii, num_radii = settings.radii, settings.num_radii
    if radii is None:
        largest = max((float(curve["_radius"].max()) for curve in curves if curve["_radius"].numel()),
                      default=0.0)
        largest = largest if math.isfinite(largest) and largest > 0 else 1.0
        grid = torch.linspace(0.0, largest, max(num_radii, 2), dtype=torch.float64)
    else:
        grid = torch.as_tensor(radii, dtype=torch.float64)
    for curve in curves:
        curve["accuracy"] = certified_accuracy_curve(curve.pop("_radius"), curve.pop("_predicted"), labels,
                                                     grid).tolist()
    described: dict[str, Any] = {"kind": certificates.kind, "norm": certificates.norm,
                                "lipschitz_constant": certificates.lipschitz}
    if certificates.kind == "lipschitz":
        described["rounding_error"] = "estimated" if certificates.probability_error is None else "bounded"
    if certificates.kind == "smoothing":
        described.update(sigma=certificates.sigma, beta=certificates.beta,
                         n0=int(overrides.n0 if overrides.n0 is not None else robust.n0),
                         n=int(overrides.n if overrides.n is not None else robust.n),
                         bounds="empirical Bernstein, union bound over classes, joint confidence 1 - beta")
    warnings += _unreachable_warnings(certificates, settings.alphas, described.get("n"))
    return CertifyResult(curves, grid.tolist(), certificates.norm, baseline_info, described, warnings)


def _grey_level_warnings(curves: Sequence[dict[str, Any]], norm: str) -> list[str]:
    """A warning when the mixture certifies some samples, but none at a radius of one grey level or more
    (radii at the model input, [0,1] pixels)."""
    mixture = [curve for curve in curves if curve["model"] != "baseline"]
    largest = max((float(curve["_radius"].max()) for curve in mixture if curve["_radius"].numel()), default=0.0)
    if largest >= ONE_GREY_LEVEL or not largest > 0:
        return []
    return [f"every certified radius of the mixture is below one grey level (largest {largest:.3g} < 1/255 = "
            f"{ONE_GREY_LEVEL:.4g} in {norm}, [0,1] pixels): these certificates exclude no perturbation an 8-bit "
            "image can carry, so 'r>0' counts are not evidence of robustness"]


def largest_certifiable_radius(certificates: Certificates, alpha: float, n: int | None = None) -> float:
    """The largest radius the mixture can ever certify at `alpha` with this robust model, over the
    theorems the curves use ([0,1] pixels at the model input, in `certificates.norm`): Theorem 1 at a
    one-hot robust output; for smoothing also Theorem 2 at the best Monte Carlo outcome of `n` samples.
    The node's `CertifiedClassifier.max_certified_radius` uses the same core functions."""
    from mixclf_ros.core.certify import max_lipschitz_radius
    from mixclf_ros.core.smoothing import max_smoothing_radius

    num_classes = int(certificates.probs_h.shape[1])
    largest = max_lipschitz_radius(certificates.lipschitz, alpha, num_classes, certificates.logit_lipschitz)
    if certificates.kind == "smoothing" and n is not None:
        largest = max(largest, max_smoothing_radius(certificates.sigma, n, certificates.beta, alpha, num_classes))
    return largest


def _unreachable_warnings(certificates: Certificates, alphas: Sequence[float], n: int | None) -> list[str]:
    """As the node warns: at each alpha >= 1/2 (below, no certificate is meant), a warning when no
    sample can reach the node's default `safe_radius` (one grey level) whatever the data."""
    warnings = []
    for alpha in alphas:
        if alpha >= 0.5:
            text = unreachable_warning(f"model input at alpha {alpha:g}", largest_certifiable_radius(
                certificates, alpha, n), "(the node's default) safe_radius", ONE_GREY_LEVEL, certificates.norm)
            if text:
                warnings.append(text)
    return warnings


def _baseline_plan(robust: nn.Module, settings: CertifySettings, baseline: nn.Module | None,
                   baseline_label: str) -> tuple[str, SmoothingOverrides, dict[str, Any]] | None:
    """How the baseline is certified (see `certify_mixture`): (model role, smoothing overrides, how it
    was chosen), or None when the baseline is the robust model alone."""
    overrides = settings.smoothing
    kind = getattr(robust, "kind", None)
    if baseline is None and settings.baseline_sigma is None:
        return None
    if baseline is not None:
        if getattr(baseline, "kind", None) != kind:
            raise EvaluationError(f"the baseline must be of the robust model's kind ({kind})")
        keep_sigma = SmoothingOverrides(None, overrides.n0, overrides.n, overrides.beta)
        return "baseline", keep_sigma, {"description": f"robust model {baseline_label} alone (alpha = 1)",
                                        "label": baseline_label}
    if kind != "smoothing":
        raise EvaluationError("--baseline-sigma needs a smoothing robust model")
    sigma = settings.baseline_sigma
    return "robust", replace(overrides, sigma=sigma), {
        "description": f"the robust base network smoothed with sigma={sigma:g} (alpha = 1)",
        "label": f"sigma={sigma:g}"}


def _logits_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, torch.Tensor]:
    """Logits of one model on one shard."""
    model = getattr(context.models, unit.params["role"])
    return {"logits": predict_logits(model, unit.images, context.runtime_for(unit))}


def _certificates_unit(context: UnitContext, unit: Unit, dependency: None) -> dict[str, Any]:
    """Certificates of one robust model on one shard (`robust_certificates`; smoothing noise seeded
    per shard), as plain tensors and numbers."""
    model = getattr(context.models, unit.params["role"])
    certificates = robust_certificates(model, unit.images, context.runtime_for(unit), unit.params["overrides"])
    return {name: getattr(certificates, name) for name in CERTIFICATE_FIELDS}


CERTIFICATE_FIELDS = tuple(item.name for item in fields(Certificates))


def _joined_certificates(parts: Sequence[dict[str, Any]]) -> Certificates:
    """The certificates of consecutive shards as one `Certificates`."""
    first = parts[0]
    joined = {name: (torch.cat([part[name] for part in parts]) if isinstance(first[name], torch.Tensor)
                     else first[name]) for name in CERTIFICATE_FIELDS}
    return Certificates(**joined)
