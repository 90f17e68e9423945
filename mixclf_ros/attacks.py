"""White-box attacks shared by training, the evaluation CLI, the demo and the tests.

`pgd` is the one projected gradient descent of the package, in two variants:
- `keep="first_success"` (default): end-to-end PGD that keeps, per sample, the first iterate that
  fools the model, with per-sample radii and a projection that is exact in float64 (certificate
  tests attack at each sample's certified radius). torchattacks has neither, so this loop is ours.
- `keep="final"`: classic PGD (Madry et al.) that runs every step and returns the final iterate of
  the restart with the highest loss: torchattacks `PGD` / `PGDL2`. Adversarial training and the
  transfer (STD / ROB) attacks use it.
AutoAttack's components (APGD-CE, APGD-T, Square) come from torchattacks too (`apgd_and_square`).

All attacks take [0,1] pixel inputs (N, C, H, W) and a model returning logits or log-probabilities
(N, classes) (cross-entropy is the same for both: log_softmax of log-probabilities is the
identity), keep the adversarial example in the eps-ball of the attack norm ("l2" or "linf", in
[0,1]-pixel units) and in [0,1].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core.certify import NORMS

KEEP = ("first_success", "final")

Model = Callable[[torch.Tensor], torch.Tensor]


def _check_attack(norm: str, steps: int, restarts: int, min_steps: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if steps < min_steps or restarts < 1:
        raise ValueError(f"need steps >= {min_steps} and restarts >= 1")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("pgd needs autograd: do not call it under torch.inference_mode()")


def _per_sample_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    flat = t.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (like.dim() - 1))


def _per_sample(value: float | torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """`value` as an (N,) tensor of x's dtype, rounded towards zero (a float64 radius must not grow
    when it is stored in float32)."""
    wide = torch.as_tensor(value, dtype=torch.float64, device=x.device)
    tensor = wide.to(x.dtype)
    tensor = torch.where(tensor.double().abs() > wide.abs(), torch.nextafter(tensor, torch.zeros_like(tensor)), tensor)
    if tensor.dim() == 0:
        tensor = tensor.expand(x.shape[0])
    if tensor.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a number or a ({x.shape[0]},) tensor, got {tuple(tensor.shape)}")
    return tensor


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Projects x_adv onto {||x_adv - x||_norm <= eps} intersected with [0, 1]^d (eps: number or
    (N,) tensor).

    Clamping to [0,1] after the ball projection stays in the ball: x is in [0,1], so clamping can
    only move each coordinate towards x."""
    eps_per_sample = _per_sample(eps, x, "eps")
    radius = _expand(eps_per_sample, x)
    delta = x_adv - x
    if norm == "linf":
        delta = torch.minimum(torch.maximum(delta, -radius), radius)
    else:
        length = _expand(_per_sample_norm(delta, "l2"), x)
        shrink = torch.where(length > radius, radius / length.clamp_min(1e-30), torch.ones_like(length))
        delta = delta * shrink
    projected = (x + delta).clamp(0.0, 1.0)
    return _inside_exactly(projected, x, eps_per_sample, norm)


def _inside_exactly(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Undoes the rounding of `x + delta`: afterwards `||x_adv - x|| <= eps` holds when measured in
    float64, so attacks "within the radius" really are (certificate tests depend on it)."""
    eps64 = _expand(eps.double(), x)
    for attempt in range(8):
        delta64 = x_adv.double() - x.double()
        size = _per_sample_norm(delta64, norm)
        outside = size > eps.double()
        if not bool(outside.any()):
            return x_adv
        if norm == "linf":
            # Move the offending coordinates one ulp towards x.
            offending = (delta64.abs() > eps64) & _expand(outside, x)
            x_adv = torch.where(offending, torch.nextafter(x_adv, x), x_adv)
        else:
            # Rounding back to x.dtype can push the point out again: grow the safety margin.
            slack = 1e-6 * 8.0**attempt
            factor = (eps.double() / size.clamp_min(1e-300) * (1 - slack)).clamp(0.0, 1.0)
            shrunk = (x.double() + delta64 * _expand(factor, x)).to(x.dtype)
            x_adv = torch.where(_expand(outside, x), shrunk, x_adv)
    still_outside = _per_sample_norm(x_adv.double() - x.double(), norm) > eps.double()
    return torch.where(_expand(still_outside, x), x, x_adv)  # never reached in practice


def _random_start(x: torch.Tensor, eps: torch.Tensor, norm: str, generator: torch.Generator | None
                  ) -> torch.Tensor:
    radius = _expand(eps, x)
    if norm == "linf":
        noise = (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * radius
    else:
        # Uniform in the l2 ball: Gaussian direction, radius eps * U^(1/d).
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _expand(direction.flatten(1).norm(dim=1).clamp_min(1e-30), x)
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        noise = direction * radius * _expand(u.pow(1.0 / x[0].numel()), x)
    return project(x + noise, x, eps, norm)


def _is_success(output: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    prediction = output.argmax(dim=1)
    return prediction == y if targeted else prediction != y


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor, norm: str, steps: int,
        step_size: float | torch.Tensor | None = None, restarts: int = 1, targeted: bool = False,
        generator: torch.Generator | None = None, keep: str = "first_success") -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (Madry et al.), l2 or linf.

    `keep="final"` is classic PGD (torchattacks `PGD` / `PGDL2`, see `final_iterate_pgd`): a number
    `eps` and `step_size`, untargeted; the random starts come from `generator` if given (the global
    RNG is left untouched), else from the global RNG as torchattacks draws them.

    Args:
        model: [0,1] pixels -> logits or log-probabilities. Used as is (set eval mode yourself).
        x: (N, C, H, W) clean inputs in [0, 1]. y: (N,) labels (target labels if `targeted`).
        eps: radius in `norm`, [0,1]-pixel units; a number or an (N,) tensor (one per sample).
        steps: iterations per restart.
        step_size: default 2.5 eps / steps (linf: sign steps; l2: normalised gradient steps).
        restarts: each restart starts uniformly at random in the ball and only attacks the samples
            not yet successful.
        generator: for the random starts.

    Returns:
        (N, C, H, W) adversarial examples (detached): per sample the first iterate found that is
        misclassified (targeted: classified as y), else the last iterate of the last restart
        (`keep="final"`: the final iterate of the restart with the highest cross-entropy).
    """
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if keep == "final":
        if targeted or isinstance(eps, torch.Tensor) or isinstance(step_size, torch.Tensor):
            raise ValueError("keep='final' (torchattacks) takes a number eps and step_size, untargeted")
        if not isinstance(model, nn.Module):
            model = _EvalModule(model)
        step = step_size if step_size is not None else 2.5 * float(eps) / max(steps, 1)
        return final_iterate_pgd(model, x, y, float(eps), norm, steps, float(step), restarts, generator)
    _check_attack(norm, steps, restarts, min_steps=0)
    x = x.detach()
    y = y.detach().to(x.device)
    eps_all = _per_sample(eps.detach() if isinstance(eps, torch.Tensor) else eps, x, "eps")
    if bool((eps_all < 0).any()) or not bool(torch.isfinite(eps_all).all()):
        raise ValueError("eps must be finite and >= 0")
    if step_size is None:
        step_all = 2.5 * eps_all / max(steps, 1)
    else:
        step_all = _per_sample(step_size, x, "step_size")
    result = x.clone()
    active = torch.nonzero(eps_all > 0).flatten()
    with torch.enable_grad():
        for _ in range(restarts):
            if active.numel() == 0:
                break
            x_clean, y_active, eps_active = x[active], y[active], eps_all[active]
            step_active = _expand(step_all[active], x_clean)
            x_adv = _random_start(x_clean, eps_active, norm, generator)
            found_here = torch.zeros(active.numel(), dtype=torch.bool, device=x.device)
            best = x_adv.clone()
            for step in range(steps + 1):
                x_adv.requires_grad_(True)
                output = model(x_adv)
                success = _is_success(output.detach(), y_active, targeted) & ~found_here
                best[success] = x_adv.detach()[success]
                found_here |= success
                if step == steps:
                    break
                loss = F.cross_entropy(output, y_active, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_adv)
                if targeted:
                    grad = -grad
                with torch.no_grad():
                    if norm == "linf":
                        update = grad.sign()
                    else:
                        update = grad / _expand(grad.flatten(1).norm(dim=1).clamp_min(1e-30), grad)
                    x_adv = project(x_adv.detach() + step_active * update, x_clean, eps_active, norm)
            result[active] = torch.where(_expand(found_here, best), best, x_adv.detach())
            active = active[~found_here]
    return result.detach()


def final_iterate_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int,
                      step_size: float, restarts: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classic PGD: torchattacks `PGD` (linf) / `PGDL2` (l2) with a random start in the ball and all
    `steps` steps of `step_size`; over `restarts` runs, per sample the final iterate of the run with
    the highest cross-entropy. Unlike the first-success variant it ends deep in the wrong class: the
    adversarial data of adversarial training and of transfer attacks.

    torchattacks draws its random starts from the global RNG: with a `generator`, one seed is drawn
    from it and the attack runs on a forked, seeded global RNG (left as it was afterwards).
    """
    import torchattacks

    _check_attack(norm, steps, restarts, min_steps=1)
    x = x.detach()
    y = y.detach().to(x.device)
    if norm == "linf":
        attack = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    else:
        attack = torchattacks.PGDL2(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
    attack.set_device(x.device)

    def strongest_restart() -> torch.Tensor:
        best = x.clone()
        best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
        for _ in range(restarts):
            with torch.enable_grad():
                candidate = attack(x, y)
            with torch.no_grad():
                loss = F.cross_entropy(model(candidate), y, reduction="none")
            better = loss > best_loss
            best[better] = candidate[better]
            best_loss = torch.where(better, loss, best_loss)
        return best.detach()

    if generator is None:
        return strongest_restart()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return strongest_restart()


class _EvalModule(nn.Module):
    """Wraps a plain callable so torchattacks can call .eval()/.train() on something harmless."""

    def __init__(self, function: Model):
        super().__init__()
        self.function = function
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def apgd_and_square(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                    n_iter: int = 100, seed: int = 0, n_target_classes: int | None = None,
                    restarts: int = 1) -> dict[str, torch.Tensor]:
    """AutoAttack's components from torchattacks 3.5.1: APGD-CE, APGD-T (targeted DLR; only with
    >= 4 classes, which its loss needs) and Square (margin loss, `n_iter` queries), each with
    `n_iter` iterations and `restarts` restarts; APGD-T tries `n_target_classes` targets (default
    all other classes).

    The model may return logits or log-probabilities (CE, DLR and the margin loss are invariant to
    a per-sample shift of the outputs). Inputs in [0, 1]; torchattacks' own normalisation is not
    used. The global RNG state is left untouched (torchattacks reseeds it; we fork it).

    Returns:
        {"apgd-ce": x_adv, "apgd-t": x_adv, "square": x_adv} ("apgd-t" absent below 4 classes),
        each (N, C, H, W), detached.
        Samples an attack did not break are returned unchanged (clean x) by torchattacks.
    """
    import torchattacks  # optional dependency, only needed here

    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attacks need autograd: do not call them under torch.inference_mode()")
    if norm == "l2" and min(x.shape[-2:]) < 5:
        raise ValueError("torchattacks' l2 Square attack needs images of at least 5 x 5 pixels")
    module = model if isinstance(model, nn.Module) else _EvalModule(model)
    attack_norm = "Linf" if norm == "linf" else "L2"
    x = x.detach()
    y = y.detach().to(x.device)
    with torch.no_grad():
        num_classes = int(module(x[:1]).shape[1])
    targets = num_classes - 1 if n_target_classes is None else min(n_target_classes, num_classes - 1)
    attacks = {
        "apgd-ce": torchattacks.APGD(module, norm=attack_norm, eps=eps, steps=n_iter, n_restarts=restarts,
                                     seed=seed, loss="ce"),
        "apgd-t": torchattacks.APGDT(module, norm=attack_norm, eps=eps, steps=n_iter, n_restarts=restarts,
                                     seed=seed, n_classes=num_classes),
        "square": torchattacks.Square(module, norm=attack_norm, eps=eps, n_queries=n_iter,
                                      n_restarts=restarts, seed=seed, loss="margin"),
    }
    attacks["apgd-t"].n_target_classes = targets
    if num_classes < 4:
        del attacks["apgd-t"]
    devices = [x.device] if x.device.type == "cuda" else []
    results = {}
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        for name, attack in attacks.items():
            attack.set_device(x.device)
            results[name] = attack(x, y).detach()
    return results
