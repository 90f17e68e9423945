"""The Lipschitz certificate at the price of one pass: the robust model's logits and the bound of
their rounding error from one evaluation of the bound engine's plan, with the cheapest bound that
is tight enough for the frame.

Routes, cheapest first; a frame goes on to the next only where the bound of the one before could
change `safe` or lower the radius by more than `RADIUS_FRACTION` against what a tighter bound could
give: the radius of the same logits without any error term, or of the most favourable logits
within the bound (so a frame pushed across a threshold by the route's own rounding goes on):

1. `float32`: the float32 plan in the cheap domain (each sample's l2 error bound carried through
   the network by each layer's operator norm, plus its own rounding through `||x||_2`: no |W| |x|
   products; its affine layers sum float32 partials of at most 16 terms in float64,
   `core.partial_sums`). Given up for good (`float32_refusal`) where, after the first
   `FLOAT32_TRIAL_FRAMES` frames, it does not pay on this device: where its time per frame is at
   least the float64 pass's times the share of frames it keeps (both measured on these frames,
   `route_seconds`), float32 first costs more than float64 alone;
2. `float64`: the float64 plan in the cheap domain;
3. `componentwise`: the float64 plan with the componentwise bound as well (the smaller is used).

Each route's logits and bound come from one evaluation (never a bound of one evaluation for the
logits of another), and every bound is a proof, so every radius is sound. The radius is the larger
of Theorem 1's on the probabilities and Lemma 1's through the logits where their bound is computed
(`certify.best_lipschitz_radius`), each with the error taken at its worst. Probabilities are the
float64 softmax of the logits (float32 ones cast exactly).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward
from mixclf_ros.core.numerics import UnboundedForwardError, probabilities_with_error

RADIUS_FRACTION = 1e-3
"""The largest relative radius a frame may lose to a route's bound before the next route is
computed for it."""

FLOAT32_TRIAL_FRAMES = 32
"""Frames after which (and at every batch after) the float32 route is given up where it does not
pay (the module docstring)."""

ROUTES = ("float32", "float64", "componentwise")
LOOSE = "it does not pay for this model on this device"


def _clock(x: torch.Tensor) -> float:
    """Seconds, once the device has finished the work queued so far for x."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


class LipschitzPass:
    """Logits, probabilities, probability error and certified radius of a batch.

    Args:
        bounded: the robust model's float64 error-bounded forward.
        lipschitz_constant: the probability outputs' Lipschitz constant, in `norm` (l2 or linf)
            per [0,1] pixel at the model input.
        logit_lipschitz_constant: the logits' (0: none).
        norm: l2 or linf.
        float32: the same model's float32 error-bounded forward (`BoundPlan.recast`), tried
            first; None: the float64 routes only.
        no_float32: why there is no float32 forward (where `float32` is None).

    `frames[route]` counts the frames whose certificate each route gave (see the module
    docstring), `last_routes` holds the route (index in `ROUTES`) of each frame of the last batch;
    `float32_refusal` and `cheap_refusal` say why a route is skipped, where it is."""

    def __init__(self, bounded: ErrorBoundedForward, lipschitz_constant: float, logit_lipschitz_constant: float = 0.0,
                 norm: str = "l2", float32: ErrorBoundedForward | None = None, no_float32: str = "no float32 plan"):
        self.bounded = bounded
        self.float32 = float32
        self.lipschitz_constant = lipschitz_constant
        self.logit_lipschitz_constant = logit_lipschitz_constant
        self.norm = norm
        self.frames = dict.fromkeys(ROUTES, 0)
        self.last_routes = torch.zeros(0, dtype=torch.int8)
        self.float32_trial_frames = FLOAT32_TRIAL_FRAMES
        """0: the float32 route is never given up for its cost."""
        self.float32_tried = self.float32_kept = 0
        self.route_seconds = {route: [0.0, 0] for route in ROUTES}
        """Per route, [seconds, frames] of its passes since the float32 trial began."""
        self.float32_refusal = "" if float32 is not None else no_float32
        """Why the float32 route is skipped (no float32 plan, it failed, or it does not pay for this
        model on this device); empty while it is tried."""
        self.cheap_refusal = ""
        """Why the float64 cheap bound failed on this model, where it did (frames then go on to the
        componentwise bound); empty otherwise."""

    @property
    def componentwise_frames(self) -> int:
        """Frames that needed the componentwise bound."""
        return self.frames["componentwise"]

    def __call__(self, x: torch.Tensor, alpha: float, meets_thresholds: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, probabilities, probability error, radius), float64, for inputs x;
        `meets_thresholds` maps radii (N,) of the whole batch to whether each frame's `safe`
        thresholds would be met."""
        routes = [route for route, refusal in zip(ROUTES, (self.float32_refusal, self.cheap_refusal, ""))
                  if not refusal]
        rows = torch.arange(len(x), device=x.device)
        taken = torch.zeros(len(x), dtype=torch.int8, device=x.device)
        results: list[torch.Tensor] = []
        float32_counts = None
        for route in routes:
            try:
                start = _clock(x)
                logits, logit_error = self._evaluate(route, x if not results else x[rows])
                spent = self.route_seconds[route]
                spent[0] += _clock(x) - start
                spent[1] += len(rows)
            except UnboundedForwardError as error:
                if route == "componentwise":
                    raise
                self._refuse(route, error)  # the same frames go on to the next route, from now on
                continue
            taken[rows] = ROUTES.index(route)
            probs, probability_error = probabilities_with_error(logits, logit_error)
            last = route == routes[-1]
            radius, hopeful = self._radii(logits, logit_error, probs, probability_error, alpha, not last)
            if not results:
                results = [logits, probs, probability_error, radius]
            else:
                for held, value in zip(results, (logits, probs, probability_error, radius)):
                    held[rows] = value
            if last:
                self.frames[route] += len(rows)
                break
            best = results[3].clone()
            best[rows] = hopeful
            looser = ((results[3] < (1.0 - RADIUS_FRACTION) * best)
                      | (meets_thresholds(results[3]) != meets_thresholds(best)))[rows]
            looser |= ~torch.isfinite(logit_error).all(dim=1)
            kept = len(rows) - int(looser.sum())
            self.frames[route] += kept
            if route == "float32":
                float32_counts = (len(rows), kept)
            if not bool(looser.any()):
                break
            rows = rows[looser]
        if float32_counts is not None:  # after the batch's float64 passes, which it is measured against
            self._judge_float32(*float32_counts)
        self.last_routes = taken
        return results[0], results[1], results[2], results[3]

    def _evaluate(self, route: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, logit error bound), float64, of one route on inputs x."""
        if route == "float32":
            logits, logit_error = self.float32(x, componentwise=False)
            return logits.double(), logit_error.double()  # exact
        return self.bounded(x, componentwise=route == "componentwise")

    def _refuse(self, route: str, error: UnboundedForwardError) -> None:
        if route == "float32":
            self.float32_refusal = f"the float32 pass failed: {error}"
        else:
            self.cheap_refusal = str(error)

    def restart_float32_trial(self) -> None:
        """Forgets the frames the float32 route was tried on so far (warm-up's blank frames), and
        tries it again where it was given up for its cost."""
        if self.float32_refusal.startswith(LOOSE):
            self.float32_refusal = ""
        self.float32_tried = self.float32_kept = 0
        self.route_seconds = {route: [0.0, 0] for route in ROUTES}

    def _judge_float32(self, tried: int, kept: int) -> None:
        """Gives the float32 route up after the trial where float32 first costs more than float64
        alone: `t32 + (1 - kept share) t64 >= t64`, per frame, as measured on this device."""
        self.float32_tried += tried
        self.float32_kept += kept
        if not 0 < self.float32_trial_frames <= self.float32_tried:
            return
        (seconds32, frames32), (seconds64, frames64) = self.route_seconds["float32"], self.route_seconds["float64"]
        if not frames64:
            return  # every frame kept: no float64 pass to save
        per_frame32, per_frame64 = seconds32 / max(frames32, 1), seconds64 / frames64
        share = self.float32_kept / self.float32_tried
        if per_frame32 >= share * per_frame64:
            self.float32_refusal = (f"{LOOSE}: it kept {self.float32_kept} of {self.float32_tried} frames at "
                                    f"{1e3 * per_frame32:.2f} ms a frame, against {1e3 * per_frame64:.2f} ms for "
                                    "float64, which the others needed too")

    def _radii(self, logits: torch.Tensor, logit_error: torch.Tensor, probs: torch.Tensor,
               probability_error: torch.Tensor, alpha: float, hopeful: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the frames' radius with their bound, and with `hopeful` what a tighter route could give
        them, else None), from one radius computation over the stacked cases. What a tighter route
        could give: the larger of the error-free radius of these logits and that of the most
        favourable logits within their bound (the top one raised, the others lowered), so that a
        frame the route's own rounding pushed across a threshold goes on."""
        logit_error = logit_error.nan_to_num(torch.inf)
        if not hopeful:
            return self._radius(logits, logit_error, probs, probability_error.nan_to_num(torch.inf), alpha), None
        top = logits.argmax(dim=1, keepdim=True)
        toward_top = torch.full_like(logits, -1.0).scatter_(1, top, 1.0)
        favourable = logits + toward_top * logit_error.nan_to_num(0.0, posinf=0.0)
        zero = torch.zeros_like(logit_error)
        radii = self._radius(torch.cat([logits, logits, favourable]), torch.cat([logit_error, zero, zero]),
                             torch.cat([probs, probs, torch.softmax(favourable, dim=1)]),
                             torch.cat([probability_error.nan_to_num(torch.inf), zero[:, 0], zero[:, 0]]), alpha)
        radius, exact, most_favourable = radii.split(len(logits))
        return radius, torch.maximum(exact, most_favourable)

    def _radius(self, logits: torch.Tensor, logit_error: torch.Tensor, probs: torch.Tensor,
                probability_error: torch.Tensor, alpha: float) -> torch.Tensor:
        return certify.best_lipschitz_radius(probs, probability_error, self.lipschitz_constant, alpha, logits=logits,
                                             logit_error=logit_error, logit_lipschitz=self.logit_lipschitz_constant,
                                             norm=self.norm)
