"""The mixed classifier of eq. 4: `h_alpha_i(x) = log((1 - alpha) g_i(x) + alpha h_i(x))`.

`g` and `h` are the softmax probabilities of the standard and the robust model. The mixture is
returned as log-probabilities, so it can be used as logits by any loss or attack. It is computed
with `logaddexp` of log-softmaxes, which never underflows to `log(0)` for finite logits and so
never masks gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

Alpha = float | torch.Tensor
"""Weight of the robust model: a number in [0, 1], or a tensor of them (one per sample)."""


def validate_alpha(alpha: Alpha) -> Alpha:
    """Returns `alpha` as a Python float (numbers, 0-d tensors without grad) or as a tensor.

    Raises ValueError unless every value is in [0, 1] (NaN included).
    """
    if isinstance(alpha, torch.Tensor):
        if not (alpha.dtype.is_floating_point or alpha.dtype in (torch.int64, torch.int32, torch.bool)):
            raise ValueError(f"alpha must be a real tensor, got dtype {alpha.dtype}")
        detached = alpha.detach()
        if detached.numel() and not bool(((detached >= 0) & (detached <= 1)).all()):
            raise ValueError("alpha must be in [0, 1] (found a value outside, or NaN)")
        if alpha.dim() == 0 and not alpha.requires_grad:
            return float(detached)
        return alpha
    try:
        value = float(alpha)
    except (TypeError, ValueError) as error:
        raise ValueError(f"alpha must be a number or a tensor, got {alpha!r}") from error
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1], got {value}")
    return value


def mix_log_probs(logits_g: torch.Tensor, logits_h: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """Log-probabilities of the mixture, eq. 4: `log((1 - alpha) softmax(g) + alpha softmax(h))`.

    Args:
        logits_g: logits of the standard model g, shape (..., C) (usually (N, C)).
        logits_h: logits of the robust model h, same shape. Log-probabilities work too.
        alpha: weight of h in [0, 1]; a number, or a tensor of shape `logits.shape[:-1]` (one value
            per sample). alpha = 0 returns exactly `log_softmax(g)`, alpha = 1 exactly
            `log_softmax(h)`.

    Returns:
        (..., C) log-probabilities in the promoted floating dtype of the inputs. Finite for finite
        logits (as long as the spread of each row's logits is representable in that dtype).
    """
    if logits_g.shape != logits_h.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_g.shape)} vs {tuple(logits_h.shape)}")
    if logits_g.dim() < 1 or logits_g.shape[-1] < 1:
        raise ValueError(f"logits must have a class dimension, got shape {tuple(logits_g.shape)}")
    dtype = torch.promote_types(logits_g.dtype, logits_h.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits_g.dtype} and {logits_h.dtype}")
    alpha = validate_alpha(alpha)
    log_p_g = F.log_softmax(logits_g.to(dtype), dim=-1)
    log_p_h = F.log_softmax(logits_h.to(dtype), dim=-1)

    if not isinstance(alpha, torch.Tensor):
        if alpha == 0.0:
            return log_p_g
        if alpha == 1.0:
            return log_p_h
        return torch.logaddexp(log_p_g + math.log1p(-alpha), log_p_h + math.log(alpha))

    batch_shape = logits_g.shape[:-1]
    if alpha.dim() != 0 and alpha.shape != batch_shape:
        raise ValueError(f"per-sample alpha must have shape {tuple(batch_shape)}, got {tuple(alpha.shape)}")
    alpha = alpha.to(device=log_p_g.device).unsqueeze(-1)
    # Weights are computed in float64 and only the mixed branch sees them. Where alpha is exactly
    # 0 or 1 that branch gets a harmless stand-in (0.5), so no -inf ever enters the graph (an
    # -inf in the unselected branch of `where` would still produce NaN gradients).
    alpha64 = alpha.to(torch.float64)
    interior = (alpha64 > 0) & (alpha64 < 1)
    alpha_safe = torch.where(interior, alpha64, torch.full_like(alpha64, 0.5))
    log_weight_g = torch.log1p(-alpha_safe).to(dtype)
    log_weight_h = torch.log(alpha_safe).to(dtype)
    mixed = torch.logaddexp(log_p_g + log_weight_g, log_p_h + log_weight_h)
    return torch.where(alpha64 == 0, log_p_g, torch.where(alpha64 == 1, log_p_h, mixed))


class MixedClassifier(nn.Module):
    """The mixture of eq. 4 as a module: `forward(x)` returns (N, C) log-probabilities.

    Args:
        standard: the accurate model g, [0,1] pixels (N, C, H, W) -> logits (N, classes).
        robust: the robust model h, same contract.
        alpha: weight of h (see `mix_log_probs`); the attribute can be changed between calls.
        concurrent_streams: on CUDA, run g and h on two side streams so they can overlap.

    Differentiable end to end (attacks on the mixture go through both models).
    """

    def __init__(self, standard: nn.Module, robust: nn.Module, alpha: Alpha = 0.5,
                 concurrent_streams: bool = True):
        super().__init__()
        self.standard = standard
        self.robust = robust
        self.alpha = alpha
        self.concurrent_streams = concurrent_streams

    @property
    def alpha(self) -> Alpha:
        return self._alpha

    @alpha.setter
    def alpha(self, value: Alpha) -> None:
        self._alpha = validate_alpha(value)

    def _both_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not (x.is_cuda and self.concurrent_streams):
            return self.standard(x), self.robust(x)
        current = torch.cuda.current_stream(x.device)
        stream_g = torch.cuda.Stream(device=x.device)
        stream_h = torch.cuda.Stream(device=x.device)
        stream_g.wait_stream(current)
        stream_h.wait_stream(current)
        with torch.cuda.stream(stream_g):
            logits_g = self.standard(x)
        with torch.cuda.stream(stream_h):
            logits_h = self.robust(x)
        current.wait_stream(stream_g)
        current.wait_stream(stream_h)
        # Tell the caching allocator about cross-stream use, so no memory is reused too early.
        x.record_stream(stream_g)
        x.record_stream(stream_h)
        logits_g.record_stream(current)
        logits_h.record_stream(current)
        return logits_g, logits_h

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass of both models: `(logits_g, logits_h, mixed_log_probs)`."""
        logits_g, logits_h = self._both_logits(x)
        return logits_g, logits_h, mix_log_probs(logits_g, logits_h, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)[2]

    def extra_repr(self) -> str:
        alpha = self.alpha if not isinstance(self.alpha, torch.Tensor) else "per-sample tensor"
        return f"alpha={alpha}, concurrent_streams={self.concurrent_streams}"
