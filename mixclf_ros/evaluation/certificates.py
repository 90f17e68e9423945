"""Per-sample certificates of the robust model h, computed once and reused for every alpha:
Theorem 1 (Lipschitz h, any lp norm; with the logit-margin form of Lemma 1 where the logits' bound is
computed, as in the node) and Theorem 2 (randomized smoothing, l2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward
from mixclf_ros.core.mixing import mix_log_probs
from mixclf_ros.core.numerics import full_precision, probabilities_with_error
from mixclf_ros.evaluation.attack_runs import mean_or_nan, predict_logits
from mixclf_ros.evaluation.settings import EvaluationError, Runtime, SmoothingOverrides


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
    probability_error: torch.Tensor | None = None
    """(N,) bound of the rounding error of `probs_h` (Lipschitz: the bound engine's rounding domain,
    subtracted from the margin as the node does); None where the forward's error is not bounded
    (the radii are then an estimate)."""
    logits: torch.Tensor | None = None
    """(N, C) float64 logits of a Lipschitz h from its bounded forward, with `logit_error` (N, C)
    their rounding bound and `logit_lipschitz` the computed bound of their Lipschitz constant: the
    node's logit-margin radius (`certify.best_lipschitz_radius`). None / 0 where not computed."""
    logit_error: torch.Tensor | None = None
    logit_lipschitz: float = 0.0
    radius_scale: float = 1.0
    """Operator norm of the preprocessing from the evaluated images to the model's input, where the
    certificate was computed at that input (a smoothing model behind its preprocessing): radii are
    divided by it, so they are in the evaluated images' units (as the node's `image_radius`)."""

    def theorems(self) -> tuple[str, ...]:
        return ("theorem1",) if self.kind == "lipschitz" else ("theorem1", "theorem2")

    def radius(self, theorem: str, alpha: float) -> torch.Tensor:
        """(N,) certified radius of the mixture at `alpha` (0 = none), float64."""
        radius = self._model_input_radius(theorem, alpha)
        return radius if self.radius_scale == 1.0 else radius / self.radius_scale

    def _model_input_radius(self, theorem: str, alpha: float) -> torch.Tensor:
        if self.kind == "lipschitz":
            if theorem != "theorem1":
                raise EvaluationError("a Lipschitz robust model is certified with Theorem 1 only")
            error = 0.0 if self.probability_error is None else self.probability_error.double()
            return certify.best_lipschitz_radius(self.probs_h.double(), error, self.lipschitz, alpha,
                                                 logits=self.logits, logit_error=self.logit_error,
                                                 logit_lipschitz=self.logit_lipschitz, norm=self.norm).double()
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
    probability outputs in `norm`). Where the model's plan bounds its rounding error (a loaded
    model whose constant is computed), its float64 logits and that bound come from the plan, as in
    the node (`runtime.lipschitz_pass`, componentwise: evaluation is offline); otherwise the float32
    probabilities, with no error bound (an estimate)."""
    constant = float(getattr(robust, "lipschitz_constant", 0.0) or 0.0)
    if not constant > 0:
        raise EvaluationError("the Lipschitz robust model has no positive lipschitz_constant")
    plan = getattr(robust, "bound_plan", None)
    if plan is None or plan.rounding_refusal:
        probs = torch.softmax(predict_logits(robust, images, runtime, "robust model").double(), dim=1)
        return Certificates("lipschitz", str(robust.norm), probs.argmax(1), probs, constant)
    bounded = ErrorBoundedForward(robust.network, input_shape=robust.input_shape, plan=plan).to(runtime.device)
    logits, logit_errors = [], []
    with torch.inference_mode(), full_precision():
        for part in runtime.batches(images.shape[0], "robust model (bounded)"):
            part_logits, part_error = bounded(images[part].to(runtime.device))
            logits.append(part_logits.cpu())
            logit_errors.append(part_error.cpu())
    logits_h = torch.cat(logits) if logits else torch.zeros(0, 2, dtype=torch.float64)
    logit_error = torch.cat(logit_errors) if logit_errors else torch.zeros(0, 2, dtype=torch.float64)
    probs_h, error = probabilities_with_error(logits_h, logit_error)
    return Certificates("lipschitz", str(robust.norm), probs_h.argmax(1), probs_h, constant, probability_error=error,
                        logits=logits_h, logit_error=logit_error,
                        logit_lipschitz=float(getattr(robust, "logit_lipschitz_constant", 0.0) or 0.0))


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


def robust_certificates(robust: nn.Module, images: torch.Tensor, runtime: Runtime,
                        overrides: SmoothingOverrides | None = None) -> Certificates:
    """Certificates of a loaded robust model by its `kind`; `overrides` replace the model's own
    smoothing settings (n0, n, beta, sigma)."""
    overrides = overrides or SmoothingOverrides()
    kind = getattr(robust, "kind", None)
    if kind == "lipschitz":
        return lipschitz_certificates(robust, images, runtime)
    if kind == "smoothing":
        sigma = overrides.sigma if overrides.sigma is not None else robust.sigma
        base, scale = robust, 1.0
        if hasattr(robust, "to_model_input"):  # behind its preprocessing: the noise is drawn at its own input
            with torch.inference_mode():
                images = torch.cat([robust.to_model_input(images[part].to(runtime.device)).cpu()
                                    for part in runtime.batches(images.shape[0], "preprocessing")])
            base, scale = robust.model, float(robust.operator_norm)
        certificates = smoothing_certificates(
            base, int(robust.num_classes), float(sigma), images,
            int(overrides.n0 if overrides.n0 is not None else robust.n0),
            int(overrides.n if overrides.n is not None else robust.n),
            float(overrides.beta if overrides.beta is not None else robust.beta), runtime,
            description=f"smoothing sigma={sigma:g}")
        certificates.radius_scale = scale
        return certificates
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
