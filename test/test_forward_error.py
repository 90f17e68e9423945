"""Floating-point error of the forward pass: near-threshold certificates through the real pipeline.

Inputs are crafted where Theorem 1's numerator `alpha (h_y - h_i) + alpha - 1` is just above 0
(about 1e-10) at alpha = 0.6, with the zoo's `standard` and `robust_lipschitz` models, and the
standard model confident in the robust model's runner-up (so the mixture's own margin is tiny
too). Every frame `CertifiedClassifier.classify` marks safe must keep its class at random points
at 0.999999 of its certified radius, classified by the same pipeline.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mixclf_ros.data import load_fashion_mnist, to_tensor
from mixclf_ros.models.loading import load_model, zoo_config
from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
from mixclf_ros.vision.decode import DecodedImage
from mixclf_ros.vision.preprocess import PreprocessConfig

ALPHA = 0.6


def _numerator(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Theorem 1's numerator min_i alpha (h_y - h_i) + alpha - 1, the top class y and the minimising i."""
    top = probs.argmax(1, keepdim=True)
    gaps = probs.gather(1, top) - probs
    gaps.scatter_(1, top, 9.0)
    return ALPHA * gaps.min(1).values + ALPHA - 1, top[:, 0], gaps.argmin(1)


@pytest.fixture(scope="module")
def models():
    standard = load_model(zoo_config("standard"))
    robust = load_model(zoo_config("robust_lipschitz"))
    return standard, robust


@pytest.fixture(scope="module")
def crafted(models) -> list[torch.Tensor]:
    """(1, 28, 28) float32 images in [0, 1] with a float64 numerator in (0, 1e-8] and g confident
    (to 1e-6) in the robust model's runner-up."""
    standard, robust = models
    robust64 = copy.deepcopy(robust).double()
    images, _ = load_fashion_mnist("test")
    x = to_tensor(images[:100])
    with torch.no_grad():
        probs_g = torch.softmax(standard(x).double(), 1)
        probs_h = torch.softmax(robust64(x.double()), 1)
    numerator, top_h, runner_up = _numerator(probs_h)
    top_g = probs_g.argmax(1)
    starts = [index for index in range(len(x)) if numerator[index] > 0.1][:40]
    # Targeted l2 steps on g alone (radius 3) make g confident in h's runner-up.
    clean, target = x[starts], runner_up[starts]
    adversarial = clean.clone()
    rows = torch.arange(len(starts))
    for _ in range(60):
        adversarial.requires_grad_(True)
        logits = standard(adversarial)
        others = logits.clone()
        others[rows, target] = -1e9
        loss = (logits[rows, target] - others.max(1).values).clamp(max=25).sum()
        (grad,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
            delta = adversarial + 0.1 * step - clean
            scale = (3.0 / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None, None, None]
            adversarial = (clean + delta * scale).clamp(0, 1)
    with torch.no_grad():
        probs_h_adv = torch.softmax(robust64(adversarial.double()), 1)
        probs_g_adv = torch.softmax(standard(adversarial).double(), 1)
    numerator_adv, top_adv, runner_adv = _numerator(probs_h_adv)
    frames = []
    for k, start in enumerate(starts):
        cls = int(target[k])
        if not (numerator_adv[k] > 0 and top_adv[k] == top_h[start] and runner_adv[k] == cls
                and probs_g_adv[k, cls] > 1 - 1e-7):
            continue
        ends = [c for c in range(len(x)) if top_h[c] == cls and top_g[c] == cls and probs_g[c, cls] > 1 - 1e-7]
        if not ends:
            continue
        source, end = adversarial[k].double(), x[ends[0]].double()

        def at(t: float, source=source, end=end) -> tuple[float, int, int, torch.Tensor]:
            frame = ((1 - t) * source + t * end).float()
            with torch.no_grad():
                n, y, i = _numerator(torch.softmax(robust64(frame[None].double()), 1))
            return float(n), int(y), int(i), frame

        low, high = 0.0, 1.0
        for _ in range(55):  # bisection on the blend towards an image of class `cls`
            middle = (low + high) / 2
            n, y, _, _ = at(middle)
            low, high = (middle, high) if (n > 0 and y == int(top_h[start])) else (low, middle)
        n, _, i, frame = at(low)
        with torch.no_grad():
            confidence = float(torch.softmax(standard(frame[None]).double(), 1)[0, cls])
        if 0 < n <= 1e-8 and i == cls and confidence > 1 - 1e-6:
            frames.append(frame)
    assert len(frames) >= 5, "could not craft enough near-threshold inputs"
    return frames


def _decoded(image: torch.Tensor) -> DecodedImage:
    return DecodedImage(np.ascontiguousarray(image[0].numpy()[:, :, None]), "mono", 1.0)


def _points_within(image: torch.Tensor, radius: float, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` float32 images at l2 distance <= 0.999999 radius from `image` (every coordinate of the
    float64 perturbation rounded towards the image, so no rounding enlarges it), clamped to [0, 1]."""
    base = image.double().flatten()
    points = []
    for _ in range(count):
        direction = torch.randn(base.numel(), generator=generator, dtype=torch.float64)
        delta = direction * (0.999999 * radius / float(direction.norm()))
        single = (base + delta).float()
        too_far = (single.double() - base).abs() > delta.abs()
        single = torch.where(too_far, torch.nextafter(single, base.float()), single)
        single = single.clamp(0.0, 1.0)
        assert float((single.double() - base).norm()) <= radius
        points.append(single.view_as(image))
    return points


@pytest.mark.slow
@pytest.mark.parametrize(("certificate_precision", "points"), [("auto", 1000), ("float32", 100)])
def test_safe_near_threshold_frames_keep_their_class_within_the_radius(models, crafted, certificate_precision,
                                                                       points):
    """With the float64 routes (auto on the CPU) and with the float32 route first on every frame
    (fewer points: the routes share everything but the bound, and the suite keeps its time)."""
    standard, robust = models
    classifier = CertifiedClassifier(standard, robust, PreprocessConfig(1, 28, 28), torch.device("cpu"),
                                     certificate_precision=certificate_precision)
    classifier.lipschitz_pass.float32_trial_frames = 0  # never given up: on this CPU it would be, for its cost
    settings = LiveSettings(alpha=ALPHA, safe_radius=0.0, safe_image_radius=0.0)  # no threshold: the numerics decide
    results = classifier.classify([_decoded(frame) for frame in crafted], settings)
    generator = torch.Generator().manual_seed(0)
    safe_frames, changed = 0, []
    for frame, result in zip(crafted, results):
        if not result.safe:
            continue
        safe_frames += 1
        within = _points_within(frame, result.certified_radius, points, generator)
        classes = [r.class_id for r in classifier.classify([_decoded(p) for p in within], settings)]
        changed.append(sum(c != result.class_id for c in classes))
    assert safe_frames >= 1, "no crafted frame was certified: the test would be vacuous"
    assert not any(changed), f"class changed within the certified radius: {changed} of {points} points per safe frame"
