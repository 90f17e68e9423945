"""Settings of the evaluation experiments: where to run (`Runtime`), the PGD budget, and one frozen
dataclass per experiment (`SweepSettings`, `CertifySettings`, `DesignSettings`).

Units: images are [0,1] pixel tensors at the model input; `eps` and radii are in the named norm
("linf" or "l2") in those units; `alpha` is the weight of the robust model h (eq. 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from mixclf_ros.core.certify import NORMS
from mixclf_ros.runtime.node_parameters import MODELS

DEFAULT_EPS = {"linf": 0.1, "l2": 1.5}
"""Default attack budgets for Fashion-MNIST, [0,1]-pixel units (linf: per pixel; l2: whole image)."""
DEFAULT_SWEEP_ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_CERTIFY_ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_GAMMAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
DEFAULT_ROBUST = {"sweep": "robust_at", "margins": "robust_at", "design": "robust_at",
                  "certify": MODELS["robust_model"], "bag": MODELS["robust_model"]}


class EvaluationError(ValueError):
    """A user-facing problem with the command line, a parameters file or the data."""


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
    """Where and how to run: device, batch size (images per forward/attack batch), seed, progress, and
    `execution` (an `evaluation.units.Execution`: Ray backend, checkpoints, shard size; None: in this
    process, no checkpoints, default shards)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 256
    seed: int = 0
    progress: bool = False
    execution: Any = None

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


def _alphas(values: Sequence[float], what: str) -> tuple[float, ...]:
    alphas = tuple(float(value) for value in values)
    if not all(0.0 <= alpha <= 1.0 for alpha in alphas):
        raise EvaluationError(f"{what}: every alpha must be in [0, 1], got {list(alphas)}")
    return alphas


@dataclass(frozen=True)
class AutoAttackSettings:
    """APGD-CE, APGD-T and Square (torchattacks) after PGD on the mixture.

    iterations: iterations of APGD-CE / APGD-T, queries of Square. target_classes: APGD-T targets
    (None: all other classes). alphas: run only at these alphas (None: at every alpha of the sweep).
    """

    iterations: int = 100
    target_classes: int | None = None
    alphas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.alphas is not None:
            object.__setattr__(self, "alphas", _alphas(self.alphas, "AutoAttack alphas"))

    def runs_at(self, alpha: float) -> bool:
        return self.alphas is None or any(math.isclose(alpha, chosen) for chosen in self.alphas)


@dataclass(frozen=True)
class SweepSettings:
    """Paper Fig. 2: the alpha grid, the PGD budget of the STD / ROB / MIX attacks, and optional
    AutoAttack on the mixture (None: PGD only)."""

    alphas: tuple[float, ...]
    attack: PGDSettings
    autoattack: AutoAttackSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", _alphas(self.alphas, "sweep"))


@dataclass(frozen=True)
class SmoothingOverrides:
    """Overrides of a smoothing robust model's own settings (None: keep the model's value).

    sigma: Gaussian noise level, [0,1] pixels, l2. n0 / n: selection / estimation samples per image.
    beta: 1 - joint confidence of the Monte Carlo bounds.
    """

    sigma: float | None = None
    n0: int | None = None
    n: int | None = None
    beta: float | None = None


@dataclass(frozen=True)
class CertifySettings:
    """Paper Fig. 3: the alphas of the mixture and the radius grid of the curves.

    radii: the grid, in the certificate's norm, [0,1] pixels (None: `num_radii` points from 0 to the
    largest certified radius). smoothing: overrides of both smoothed models' settings (its sigma
    applies to the robust model only). baseline_sigma: baseline = the robust base network smoothed
    with this sigma.
    """

    alphas: tuple[float, ...]
    radii: tuple[float, ...] | None = None
    num_radii: int = 101
    smoothing: SmoothingOverrides = field(default_factory=SmoothingOverrides)
    baseline_sigma: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", _alphas(self.alphas, "certify"))
        if self.radii is not None:
            object.__setattr__(self, "radii", tuple(sorted(float(r) for r in self.radii)))


@dataclass(frozen=True)
class DesignSettings:
    """Paper Fig. 1 / eq. 3: the gamma grid, the trust terms R_i(x) and spaces (None: all of
    `core.design.TRUST_TERMS` / `SPACES`), and the end-to-end PGD budget."""

    gammas: tuple[float, ...]
    attack: PGDSettings
    trusts: tuple[str, ...] | None = None
    spaces: tuple[str, ...] | None = None
