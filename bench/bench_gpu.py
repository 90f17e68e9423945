"""The certificate on a GPU (issue 21), in process: run it whenever a GPU machine is at hand, never in
tests. Printed as JSON.

For the demo models (zoo `standard` + `robust_lipschitz`, 640x480 rgb8 frames) and for resnet18 at
224 as both models (random weights: latency only), on `--device`:
- latency p50/p99 of `CertifiedClassifier.classify` on one frame, with `certificate_precision`
  float64 and auto (float32 first on CUDA), the frames each route certified and why the float32
  route was given up, where it was;
- the robust model's cheap bounded pass in float64 and in float32 (the rounding bound is a proof in
  either; robot GPUs run float64 at a small fraction of float32 speed), against its float32 forward;
- the radii on the device against the CPU's float64 radii for the same frames (relative, median and
  worst; a device radius above the CPU's would mean the bounds disagree);
- randomized smoothing at n = 1,000 per frame (zoo `robust_smoothing`): certified frames per second;
- the precision switches (TF32 and the like) inside the certificate's precision scope.

Usage: python -m bench.bench_gpu [--device cuda] [--frames 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def _percentiles(times_ms: list[float]) -> dict:
    ordered = sorted(times_ms)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def _timed(function, device: torch.device, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _frames(count: int) -> list:
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article
    from mixclf_ros.vision.decode import DecodedImage

    images, _ = load_fashion_mnist("test")
    return [DecodedImage(embed_article(images[i]), "rgb", 1 / 255) for i in range(count)]


def bench_pair(standard_config: dict, robust_config: dict, device: torch.device, frames: list) -> dict:
    from mixclf_ros.core.engine import BoundPlan
    from mixclf_ros.core.forward_error import ErrorBoundedForward
    from mixclf_ros.models.loading import load_model
    from mixclf_ros.models.norm_cache import NormStore
    from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings

    settings = LiveSettings()
    standard, robust = load_model(standard_config), load_model(robust_config)
    on_cpu = CertifiedClassifier(load_model(standard_config), load_model(robust_config), None, torch.device("cpu"),
                                 seed=0)
    report: dict = {}
    for precision in ("float64", "auto"):  # auto last: its radii are compared below
        on_device = CertifiedClassifier(standard, robust, None, device, seed=0, certificate_precision=precision)
        on_device.warm_up(settings)
        times = _timed(lambda c=on_device: c.classify(frames[:1], settings), device, len(frames))
        certificate = on_device.lipschitz_pass
        report[f"classify_ms_{precision}"] = {
            **_percentiles(times), "routes": dict(certificate.frames) if certificate else None,
            "float32_refusal": certificate.float32_refusal if certificate else None}
    device_radii = [r.certified_radius for r in on_device.classify(frames, settings)]
    cpu_radii = [r.certified_radius for r in on_cpu.classify(frames, settings)]
    pairs = [(d, c) for d, c in zip(device_radii, cpu_radii) if c > 0]
    if pairs:
        relative = [(d - c) / c for d, c in pairs]
        report["radius_device_over_cpu_relative"] = {"median": statistics.median(relative), "worst_above": max(
            relative), "worst_below": min(relative), "certified": len(pairs)}
    x = torch.rand(1, *robust.input_shape, device=device)
    network = robust.network.to(device)
    with torch.inference_mode():
        report["robust_float32_forward_ms"] = _percentiles(_timed(lambda: network(x), device, len(frames)))
        for dtype in (torch.float64, torch.float32):
            norms = NormStore.open()
            plan = BoundPlan(robust.network.cpu(), robust.input_shape, "robust_model", dtype, norm_store=norms)
            norms.save()
            bounded = ErrorBoundedForward(robust.network, dtype, robust.input_shape, plan=plan).to(device)
            report[f"robust_cheap_pass_{str(dtype).split('.')[-1]}_ms"] = _percentiles(
                _timed(lambda b=bounded: b(x, componentwise=False), device, len(frames)))
    return report


def bench_smoothing(device: torch.device, frames: list) -> dict:
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
    from mixclf_ros.runtime.node_parameters import MODELS

    standard = load_model(zoo_config(MODELS["standard_model"]))
    classifier = CertifiedClassifier(standard, load_model(zoo_config("robust_smoothing")),
                                     None, device, seed=0)
    settings = LiveSettings()
    classifier.warm_up(settings)
    times = _timed(lambda: classifier.classify(frames[:1], settings), device, max(3, len(frames) // 10))
    return {"n": 1000, "frame_ms": _percentiles(times), "frames_per_s": 1e3 / statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    from mixclf_ros.core.numerics import full_precision, precision_flags
    from mixclf_ros.models.loading import zoo_config
    from mixclf_ros.runtime.node_parameters import MODELS

    parser = argparse.ArgumentParser(prog="python -m bench.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--skip-resnet", action="store_true", help="demo models and smoothing only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    frames = _frames(args.frames)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    with full_precision():
        report["precision_in_certificate_scope"] = {name: str(value) for name, value in precision_flags().items()}
    report["demo_models"] = bench_pair(zoo_config(MODELS["standard_model"]), zoo_config(MODELS["robust_model"]),
                                       device, frames)
    resnet = {"architecture": "torchvision:resnet18", "weights": "", "num_classes": 10, "input_channels": 3,
              "input_height": 224, "input_width": 224}
    if not args.skip_resnet:
        report["resnet18_224"] = _resnet_pair(resnet, device, frames[: max(5, args.frames // 5)])
    report["smoothing"] = bench_smoothing(device, frames)
    print(json.dumps(report, indent=1))
    return 0


def _resnet_pair(config: dict, device: torch.device, frames: list) -> dict:
    """resnet18 at 224 with random weights (saved once to a temporary state_dict) as both models."""
    import tempfile
    from pathlib import Path

    import torchvision

    path = Path(tempfile.mkdtemp()) / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    standard = {**config, "weights": str(path), "kind": "standard"}
    robust = {**config, "weights": str(path), "kind": "lipschitz"}
    return bench_pair(standard, robust, device, frames)


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
