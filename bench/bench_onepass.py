"""The certificate at the price of one pass (issue 21), measured in process, one torch thread:

1. per frame: the robust model's float32 forward, its bounded float64 pass with only the per-sample
   l2 error bound (the cheap pass the node runs), and with the componentwise bound too;
2. the radius the cheap bound gives up against the componentwise one, before the switch of
   `runtime.lipschitz_pass` (which bounds it by RADIUS_FRACTION), over Fashion-MNIST test images at
   alpha 0.6 (zoo model), and the logit error bounds' ratio for resnet18 at 224 (random weights:
   no radius to compare);
3. configure: building resnet18's plan at 224 cold, and again with the operator norms on disk.

Usage: python -m bench --only onepass
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from bench.bench_certify import median_seconds


def _latencies(plan_forward, network, x: torch.Tensor, repeats: int) -> dict:
    cpu = torch.device("cpu")
    with torch.inference_mode():
        return {
            "float32_forward_ms": 1e3 * median_seconds(lambda: network(x), cpu, repeats),
            "cheap_pass_ms": 1e3 * median_seconds(lambda: plan_forward(x, componentwise=False), cpu, repeats),
            "componentwise_pass_ms": 1e3 * median_seconds(lambda: plan_forward(x, componentwise=True), cpu, repeats),
        }


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

    torch.set_num_threads(1)
    report: dict = {}
    zoo = load_model(zoo_config(MODELS["robust_model"]))
    bounded = ErrorBoundedForward(zoo.network, input_shape=zoo.input_shape, plan=zoo.bound_plan)
    report["zoo"] = _latencies(bounded, zoo.network, torch.rand(1, *zoo.input_shape), repeats)
    pixels, _ = load_fashion_mnist("test")
    x = torch.from_numpy(pixels[:images]).float().div(255).unsqueeze(1)
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

    os.environ[CACHE_DIR_VARIABLE] = tempfile.mkdtemp(prefix="mixclf_bench_norms_")
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    configure = {}
    for run in ("cold", "restart"):
        store = NormStore.open()
        start = time.perf_counter()
        plan = BoundPlan(resnet, (3, 224, 224), "resnet18", norm_store=store)
        store.save()
        configure[f"{run}_s"] = time.perf_counter() - start
    report["resnet18_224"] = {"configure": configure}
    bounded = ErrorBoundedForward(resnet, input_shape=(3, 224, 224), plan=plan)
    frame = torch.rand(1, 3, 224, 224)
    report["resnet18_224"].update(_latencies(bounded, resnet, frame, max(5, repeats // 20)))
    with torch.inference_mode():
        cheap = bounded(frame, componentwise=False)[1]
        tight = bounded(frame, componentwise=True)[1]
    ratio = (cheap / tight).flatten().tolist()
    report["resnet18_224"]["logit_error_cheap_over_componentwise"] = {
        "median": statistics.median(ratio), "worst": max(ratio), "cheap_max": float(cheap.max())}
    return report
