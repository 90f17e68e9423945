"""A deel-torchlip network as the robust model h: trained here, then certified by Theorem 1 with the
library's claimed constant and with the bound the engine computes (docs/RESULTS.md, issue 19).

    python examples/torchlip_certified.py                 # train (fixed seed, about 2 min of one CPU core) and certify
    python examples/torchlip_certified.py --limit 1000    # certify 1,000 test images (default: all 10,000)

Prints a markdown table: certified accuracy at alpha = 1 (the mixture is h alone) at a few l2 radii
in [0,1] pixels, Fashion-MNIST test set, for
  (a) the library's claim: every layer 1-Lipschitz in l2 (k_coef_lip = 1), times 1/std of the input
      normalisation, times the softmax factor `certify.softmax_lipschitz_factor('l2')` (sqrt(2)/4),
      as the node converts a logit constant to probability outputs (docs/BRING_YOUR_OWN.md);
  (b) `lipschitz.probability_lipschitz_bound`, the sound bound of the weights as they compute
      (or the engine's refusal);
  (c) for reference, the product of the layers' exact l2 operator norms, converted the same way
      (what a tight engine should reach; the layers' true norms are below the claimed 1).
Probabilities are computed in float64 with the rounding-error bound of `ErrorBoundedForward` where
it can bound the network, else without an error term (said in the output).

Weights are not committed: training is reproducible (seed 0, one torch thread, fixed number of
steps) and caches them in build/ (git-ignored). The architecture string for a parameters file is
`torchlip_certified:build` (this folder on PYTHONPATH), with mean 0.2860 and std 0.3530.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixclf_ros.core import lipschitz
from mixclf_ros.core.certify import lipschitz_radius, softmax_lipschitz_factor
from mixclf_ros.core.layers import Normalize
from mixclf_ros.data import evaluation_subset, load_fashion_mnist, to_tensor

MEAN, STD = 0.2860, 0.3530
RADII = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
"""l2 radii in [0,1] pixels at the model input (28x28 grey); 0 is clean accuracy."""
WEIGHTS = Path(__file__).resolve().parents[1] / "build" / "torchlip_certified.pt"


def build(num_classes: int = 10) -> nn.Module:
    """deel-torchlip: SpectralConv2d, GroupSort2, ScaledL2NormPool2d (twice), Flatten,
    SpectralLinear, GroupSort2, SpectralLinear. Every layer 1-Lipschitz in l2 by the library's claim.
    Input: normalised (x - MEAN) / STD images (N, 1, 28, 28)."""
    import deel.torchlip as tl

    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2),
        tl.SpectralConv2d(8, 16, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2), nn.Flatten(),
        tl.SpectralLinear(16 * 7 * 7, 64), tl.GroupSort2(), tl.SpectralLinear(64, num_classes))


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float, temperature: float) -> torch.Tensor:
    """Cross-entropy of `temperature * (z - margin * onehot(y))` (Lipschitz-margin training, Tsuzuku
    et al. 2018): the true logit must beat the others by `margin`, which for 1-Lipschitz logits is
    an l2 radius of `margin / sqrt(2)` in normalised units."""
    shifted = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(temperature * shifted, labels)


def train(steps: int, batch: int, margin: float, temperature: float, seed: int = 0) -> nn.Module:
    """The body (normalised input -> logits), trained for `steps` Adam steps on Fashion-MNIST."""
    torch.manual_seed(seed)
    body = build()
    images, labels = load_fashion_mnist("train")
    x, y = (to_tensor(images) - MEAN) / STD, torch.from_numpy(labels)
    optimiser = torch.optim.Adam(body.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    body.train()
    order = torch.randperm(len(y), generator=generator)
    for step in range(steps):
        start = (step * batch) % len(y)
        if start + batch > len(y):
            order = torch.randperm(len(y), generator=generator)
            start = 0
        index = order[start:start + batch]
        loss = margin_loss(body(x[index]), y[index], margin, temperature)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return body.eval()


def layer_norm_product(body: nn.Sequential) -> float:
    """Product of the exact l2 operator norms of the layers as they compute in eval mode: each
    affine layer materialised (the layer applied to the standard basis, minus the layer at 0) and
    its largest singular value taken; GroupSort and the l2-norm pool with disjoint windows are
    1-Lipschitz in l2 (times torchlip's `k_coef_lip`). What a tight engine should reach (issue 19)."""
    shape, product = (1, 28, 28), 1.0
    with torch.no_grad():
        for layer in body:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                size = math.prod(shape)
                basis = torch.eye(size).reshape(size, *shape)
                matrix = (layer(basis) - layer(torch.zeros(1, *shape))).reshape(size, -1).double()
                product *= float(torch.linalg.matrix_norm(matrix, ord=2))
            else:
                product *= float(getattr(layer, "_coefficient_lip", 1.0))
            shape = tuple(layer(torch.zeros(1, *shape)).shape[1:])
    return product


def probabilities(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, str]:
    """(float64 softmax probabilities, their rounding-error bound, how it was obtained)."""
    from mixclf_ros.core.forward_error import ErrorBoundedForward, UnboundedForwardError
    from mixclf_ros.core.numerics import probabilities_with_error

    try:
        forward = ErrorBoundedForward(model, torch.float64, (1, 28, 28))
    except UnboundedForwardError as error:
        with torch.no_grad():
            logits = model(x)  # the model's own float32 forward, as the node runs it without a bound
        return torch.softmax(logits.double(), dim=1), 0.0, f"no rounding-error bound ({error})"
    parts = [probabilities_with_error(*forward(chunk)) for chunk in x.split(500)]
    return torch.cat([p for p, _ in parts]), torch.cat([e for _, e in parts]), "rounding error bounded"


def certified_accuracy(probs: torch.Tensor, error: torch.Tensor | float, labels: torch.Tensor,
                       constant: float) -> list[float]:
    """Fraction of images whose class is right and certified (Theorem 1, alpha = 1) at each radius."""
    radius = lipschitz_radius(probs, constant, 1.0, probability_error=error)
    correct = probs.argmax(dim=1) == labels
    return [float((correct & (radius >= r)).double().mean()) if r > 0 else float(correct.double().mean())
            for r in RADII]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (batch 128)")
    parser.add_argument("--limit", type=int, default=10_000, help="test images (a fixed random subset)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="cached weights (trained if absent)")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.weights.exists() and not args.retrain:
        body = build()
        body.load_state_dict(torch.load(args.weights, weights_only=True))
        body.eval()
        trained = f"weights {args.weights}"
    else:
        start = time.perf_counter()
        body = train(args.steps, 128, margin=0.5, temperature=8.0)
        args.weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(body.state_dict(), args.weights)
        trained = f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s, saved to {args.weights}"
    model = nn.Sequential(Normalize([MEAN], [STD]), body).eval()

    images, labels = load_fashion_mnist("test")
    subset = evaluation_subset(args.limit) if args.limit < len(labels) else slice(None)
    x, y = to_tensor(images[subset]), torch.from_numpy(labels[subset])
    probs, error, how = probabilities(model, x)

    claimed = softmax_lipschitz_factor("l2") * 1.0 / STD
    rows = [("(a) library's claim: 1 per layer x 1/std x sqrt(2)/4", claimed),
            ("(c) product of the layers' exact norms x 1/std x sqrt(2)/4",
             softmax_lipschitz_factor("l2") * layer_norm_product(body) / STD)]
    try:
        computed = lipschitz.probability_lipschitz_bound(model, "l2", (1, 28, 28))
        rows.insert(1, ("(b) bound computed by the engine", computed))
        refusal = ""
    except lipschitz.UnsupportedLayerError as exc:
        refusal = str(exc)
    print(f"<!-- {trained}; {len(y)} test images; {how} -->")
    print("| constant Lip(h_i), l2, per [0,1] pixel | value | " + " | ".join(
        "clean" if r == 0 else f"r >= {r:g}" for r in RADII) + " |")
    print("|---|---|" + "---|" * len(RADII))
    for label, constant in rows:
        accuracy = certified_accuracy(probs, error, y, constant)
        print(f"| {label} | {constant:.4g} | " + " | ".join(f"{100 * a:.1f} %" for a in accuracy) + " |")
    if refusal:
        print(f"| (b) bound computed by the engine | refused: {refusal} |" + " |" * len(RADII))


if __name__ == "__main__":
    main()
