"""The Lipschitz certificate at the price of one pass: the robust model's logits and the bound of
their rounding error from one evaluation of the bound engine's plan, with the cheapest bound that
is tight enough for the frame.

The cheap pass carries only each sample's l2 error bound through the network (each layer's
operator norm times the incoming bound, plus its own rounding through `||x||_2`): no |W| |x|
products, about the price of the forward. Where that bound would change `safe` or lower the radius
by more than `RADIUS_FRACTION` against the radius of the same probabilities without any error
term (an upper bound of every sound radius), those frames alone are evaluated again with the
componentwise bound as well; the smaller error is used. Both bounds are proofs, so either radius is
sound. The radius is the larger of Theorem 1's on the probabilities and Lemma 1's through the
logits where their bound is computed (`certify.best_lipschitz_radius`), each with the error taken at
its worst.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward
from mixclf_ros.core.numerics import UnboundedForwardError, probabilities_with_error

RADIUS_FRACTION = 1e-3
"""The largest relative radius a frame may lose to the cheap error bound before the componentwise
bound is computed for it."""


class LipschitzPass:
    """Logits, probabilities, probability error and certified radius of a batch, from `bounded`
    (the robust model's error-bounded forward), the probability outputs' Lipschitz constant and,
    where computed, the logits' (0: none), both in `norm` (l2 or linf) per [0,1] pixel at the model
    input. `componentwise_frames` counts the frames that needed the componentwise bound."""

    def __init__(self, bounded: ErrorBoundedForward, lipschitz_constant: float, logit_lipschitz_constant: float = 0.0,
                 norm: str = "l2"):
        self.bounded = bounded
        self.lipschitz_constant = lipschitz_constant
        self.logit_lipschitz_constant = logit_lipschitz_constant
        self.norm = norm
        self.componentwise_frames = 0
        self.cheap_refusal = ""
        """Why the cheap bound failed on this model, where it did (every frame then gets the
        componentwise bound); empty otherwise."""

    def __call__(self, x: torch.Tensor, alpha: float, meets_thresholds: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, probabilities, probability error, radius) for inputs x; `meets_thresholds`
        maps radii (N,) to whether each frame's `safe` thresholds would be met."""
        try:
            logits, logit_error = self.bounded(x, componentwise=self.cheap_refusal != "")
        except UnboundedForwardError as error:
            if self.cheap_refusal:
                raise
            # a rule that fails in the cheap domain alone: the componentwise bound, from now on
            self.cheap_refusal = str(error)
            logits, logit_error = self.bounded(x, componentwise=True)
        logit_error = logit_error.contiguous()  # an expanded view of the per-sample bound; rows are replaced below
        probs, probability_error = probabilities_with_error(logits, logit_error)
        radius = self._radius(logits, logit_error, probs, probability_error, alpha)
        best = self._radius(logits, torch.zeros_like(logit_error), probs, torch.zeros_like(probability_error), alpha)
        looser = (radius < (1.0 - RADIUS_FRACTION) * best) | (meets_thresholds(radius) != meets_thresholds(best))
        if bool(looser.any()):
            index = looser.nonzero().flatten()
            _, tight_logit_error = self.bounded(x[index], componentwise=True)
            _, tight_error = probabilities_with_error(logits[index], tight_logit_error)
            probability_error[index] = torch.minimum(probability_error[index], tight_error)
            logit_error[index] = torch.minimum(logit_error[index], tight_logit_error)
            radius[index] = self._radius(logits[index], logit_error[index], probs[index], probability_error[index],
                                         alpha)
            self.componentwise_frames += len(index)
        return logits, probs, probability_error, radius

    def _radius(self, logits: torch.Tensor, logit_error: torch.Tensor, probs: torch.Tensor,
                probability_error: torch.Tensor, alpha: float) -> torch.Tensor:
        return certify.best_lipschitz_radius(probs, probability_error.nan_to_num(torch.inf), self.lipschitz_constant,
                                             alpha, logits=logits, logit_error=logit_error.nan_to_num(torch.inf),
                                             logit_lipschitz=self.logit_lipschitz_constant, norm=self.norm)
