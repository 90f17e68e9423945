"""The certificate at the price of one pass (issue 21), measured in process, one torch thread:

1. per frame: the robust model's float32 forward, its bounded float64 pass with only the per-sample
   l2 error bound (the cheap pass), with the componentwise bound too, and the float32 plan's cheap
   pass (the first route of `runtime.lipschitz_pass`);
2. the radius the cheap bound gives up against the componentwise one, before the switch of
   `runtime.lipschitz_pass` (which bounds it by RADIUS_FRACTION), over Fashion-MNIST test images at
   alpha 0.6 (zoo model); the float32 bound's: its logit error and the radius it gives up against
   float64's componentwise at alpha 0.6 and 1, and how many frames the float32 route keeps; the
   logit error bounds for resnet18 at 224 (random weights: no radius to compare);
3. `CertifiedClassifier.classify` on one 640x480 rgb8 frame (random pixels), median ms, with
   `certificate_precision` float32 (the float32 route tried on every frame, never given up) and
   float64, for the demo models and for resnet18 at 224 as both models;
4. configure: building resnet18's plan at 224 cold, and again with the operator norms on disk, and
   its float32 plan from it.

Usage: python -m bench --only onepass
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_certify import median_seconds

CLASSIFY_ALPHA = 0.6


def _latencies(plan_forward, float32_forward, network, x: torch.Tensor, repeats: int) -> dict:
    cpu = torch.device("cpu")
    with torch.inference_mode():
        return {
            "float32_forward_ms": 1e3 * median_seconds(lambda: network(x), cpu, repeats),
            "cheap_pass_ms": 1e3 * median_seconds(lambda: plan_forward(x, componentwise=False), cpu, repeats),
            "componentwise_pass_ms": 1e3 * median_seconds(lambda: plan_forward(x, componentwise=True), cpu, repeats),
            "float32_cheap_pass_ms": 1e3 * median_seconds(lambda: float32_forward(x, componentwise=False), cpu,
                                                          repeats),
        }


def _radius(model, logits: torch.Tensor, logit_error: torch.Tensor, alpha: float) -> torch.Tensor:
    from mixclf_ros.core import certify
    from mixclf_ros.core.numerics import probabilities_with_error

    probs, probability_error = probabilities_with_error(logits, logit_error)
    return certify.best_lipschitz_radius(probs, probability_error, model.lipschitz_constant, alpha, logits=logits,
                                         logit_error=logit_error, logit_lipschitz=model.logit_lipschitz_constant,
                                         norm=model.norm)


def _float32_route(model, bounded, float32, x: torch.Tensor) -> dict:
    """The float32 bound against float64's componentwise one: logit error, radius given up per
    alpha (certified frames), and the frames the float32 route keeps (never given up)."""
    from mixclf_ros.runtime.lipschitz_pass import LipschitzPass

    with torch.inference_mode():
        logits, error = bounded(x, componentwise=True)
        logits32, error32 = (value.double() for value in float32(x, componentwise=False))
    report: dict = {"logit_error_median": float(error32[:, 0].median()),
                    "float64_componentwise_logit_error_median": float(error.amax(dim=1).median())}
    for alpha in (0.6, 1.0):
        exact, loose = _radius(model, logits, error, alpha), _radius(model, logits32, error32, alpha)
        certified = exact > 0
        loss = ((exact - loose) / exact)[certified]
        certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm,
                                    float32)
        certificate.float32_trial_frames = 0
        with torch.inference_mode():
            certificate(x, alpha, lambda radii: torch.zeros_like(radii, dtype=torch.bool))
        report[f"alpha_{alpha:g}"] = {"certified": int(certified.sum()), "radius_loss_median": float(loss.median()),
                                      "radius_loss_worst": float(loss.max()), "frames_by_route": certificate.frames}
    return report


def _classify_ms(standard, robust, preprocess, repeats: int) -> dict:
    """Median classify ms of one 640x480 rgb8 frame per certificate_precision, and the route the
    frame took."""
    from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
    from mixclf_ros.vision.decode import DecodedImage

    frame = DecodedImage(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8), "rgb", 1 / 255)
    settings = LiveSettings(alpha=CLASSIFY_ALPHA)
    report = {}
    for precision in ("float32", "float64"):
        classifier = CertifiedClassifier(standard, robust, preprocess, torch.device("cpu"), seed=0,
                                         certificate_precision=precision)
        classifier.lipschitz_pass.float32_trial_frames = 0
        seconds = median_seconds(lambda c=classifier: c.classify([frame], settings), torch.device("cpu"), repeats)
        routes = {route: count for route, count in classifier.lipschitz_pass.frames.items() if count}
        radius = classifier.classify([frame], settings)[0].certified_radius
        report[precision] = {"classify_ms": 1e3 * seconds, "routes": routes, "certified_radius": radius}
    return report


def bench_onepass(images: int = 1000, repeats: int = 100) -> dict:
    import torchvision

    from mixclf_ros.core import certify
    from mixclf_ros.core.engine import BoundPlan
    from mixclf_ros.core.forward_error import ErrorBoundedForward
    from mixclf_ros.core.numerics import probabilities_with_error
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.models.norm_cache import CACHE_DIR_VARIABLE, NormStore
    from mixclf_ros.runtime.node_parameters import MODELS
    from mixclf_ros.vision.preprocess import PreprocessConfig

    torch.set_num_threads(1)
    report: dict = {}
    zoo = load_model(zoo_config(MODELS["robust_model"]))
    bounded = ErrorBoundedForward(zoo.network, input_shape=zoo.input_shape, plan=zoo.bound_plan)
    float32 = ErrorBoundedForward(zoo.network, torch.float32, plan=zoo.bound_plan.recast(torch.float32))
    report["zoo"] = _latencies(bounded, float32, zoo.network, torch.rand(1, *zoo.input_shape), repeats)
    pixels, _ = load_fashion_mnist("test")
    x = torch.from_numpy(pixels[:images].copy()).float().div(255).unsqueeze(1)
    with torch.inference_mode():
        radii = {}
        for componentwise in (False, True):
            logits, error = bounded(x, componentwise=componentwise)
            probs, probability_error = probabilities_with_error(logits, error)
            radii[componentwise] = certify.lipschitz_radius(probs, zoo.lipschitz_constant, 0.6,
                                                            probability_error=probability_error)
    certified = radii[True] > 0
    loss = ((radii[True] - radii[False]) / radii[True].clamp_min(1e-300))[certified].tolist()
    report["zoo"]["radius_loss_relative"] = {"images": images, "certified": len(loss),
                                             "median": statistics.median(loss), "worst": max(loss)}
    report["zoo"]["float32_route"] = {"images": min(images, 200), **_float32_route(zoo, bounded, float32, x[:200])}
    standard = load_model(zoo_config(MODELS["standard_model"]))
    report["zoo"]["classify_640x480"] = _classify_ms(standard, zoo, PreprocessConfig(1, 28, 28, 476, 476),
                                                     max(20, repeats // 2))

    os.environ[CACHE_DIR_VARIABLE] = tempfile.mkdtemp(prefix="mixclf_bench_norms_")
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    configure = {}
    for run in ("cold", "restart"):
        store = NormStore.open()
        start = time.perf_counter()
        plan = BoundPlan(resnet, (3, 224, 224), "resnet18", norm_store=store)
        store.save()
        configure[f"{run}_s"] = time.perf_counter() - start
    start = time.perf_counter()
    plan32 = plan.recast(torch.float32)
    configure["float32_plan_s"] = time.perf_counter() - start
    report["resnet18_224"] = {"configure": configure}
    bounded = ErrorBoundedForward(resnet, input_shape=(3, 224, 224), plan=plan)
    float32 = ErrorBoundedForward(resnet, torch.float32, plan=plan32)
    frame = torch.rand(1, 3, 224, 224)
    report["resnet18_224"].update(_latencies(bounded, float32, resnet, frame, max(5, repeats // 20)))
    with torch.inference_mode():
        cheap = bounded(frame, componentwise=False)[1]
        tight = bounded(frame, componentwise=True)[1]
        cheap32 = float32(frame, componentwise=False)[1]
    ratio = (cheap / tight).flatten().tolist()
    report["resnet18_224"]["logit_error_cheap_over_componentwise"] = {
        "median": statistics.median(ratio), "worst": max(ratio), "cheap_max": float(cheap.max())}
    report["resnet18_224"]["float32_logit_error_max"] = float(cheap32.max())
    path = Path(tempfile.mkdtemp()) / "resnet18.pt"
    torch.save(resnet.state_dict(), path)
    config = {"architecture": "torchvision:resnet18", "weights": str(path), "num_classes": 10, "input_channels": 3,
              "input_height": 224, "input_width": 224}
    pair = load_model({**config, "kind": "standard"}), load_model({**config, "kind": "lipschitz"})
    report["resnet18_224"]["classify_640x480"] = _classify_ms(*pair, None, max(5, repeats // 10))
    return report
