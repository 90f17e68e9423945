"""Cost of certification next to the cost of the models, printed as JSON.

1. Certificate arithmetic (Theorem 1 `lipschitz_radius` on a (64, 10) probability batch, Theorem 2
   `smoothing_radius` on 64 bound pairs) against one forward pass of the model on 64 inputs.
2. Randomized smoothing throughput (`Smooth.predict_probs`, noisy samples per second) against the
   bare batched forward pass of the same base model on batches of the same size.

Usage: python bench/bench_certify.py [--device cpu|cuda] [--model package.module:callable]
The default model is a small Fashion-MNIST-like CNN (1 x 28 x 28 inputs, 10 classes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mixclf_ros.core import certify
from mixclf_ros.core.smoothing import Smooth


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def load_builder(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def median_seconds(function: Callable[[], object], device: torch.device, repeats: int,
                   warmup: int = 3) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        function()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="package.module:callable returning an nn.Module")
    parser.add_argument("--input-shape", default="1,28,28")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--smoothing-images", type=int, default=8)
    parser.add_argument("--smoothing-samples", type=int, default=1000)
    parser.add_argument("--smoothing-batch", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.input_shape.split(","))
    model = (load_builder(args.model)() if args.model else small_cnn()).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.rand((args.batch, *shape), generator=generator, device=device)

    with torch.inference_mode():
        forward_s = median_seconds(lambda: model(x), device, args.repeats)
        probs = torch.softmax(model(x), dim=1)
        p_lower = probs.max(dim=1).values
        p_upper = probs.topk(2, dim=1).values[:, 1]
        lipschitz_s = median_seconds(lambda: certify.lipschitz_radius(probs, 0.5, 0.8), device, args.repeats)
        smoothing_radius_s = median_seconds(
            lambda: certify.smoothing_radius(p_lower, p_upper, 0.25, 0.8), device, args.repeats)

        smooth = Smooth(model, args.classes, sigma=0.25)
        images = x[: args.smoothing_images]
        total_samples = args.smoothing_images * args.smoothing_samples
        smoothing_s = median_seconds(
            lambda: smooth.predict_probs(images, args.smoothing_samples, args.smoothing_batch, generator),
            device, max(3, args.repeats // 4), warmup=1)
        bare_batch = torch.rand((args.smoothing_batch, *shape), generator=generator, device=device)
        bare_s = median_seconds(lambda: model(bare_batch), device, args.repeats)

    result = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model or "small_cnn",
        "input_shape": list(shape),
        "certificate_arithmetic": {
            "batch": args.batch,
            "classes": int(probs.shape[1]),
            "forward_ms": forward_s * 1e3,
            "lipschitz_radius_ms": lipschitz_s * 1e3,
            "smoothing_radius_ms": smoothing_radius_s * 1e3,
            "lipschitz_radius_vs_forward": lipschitz_s / forward_s,
            "smoothing_radius_vs_forward": smoothing_radius_s / forward_s,
        },
        "smoothing_throughput": {
            "images": args.smoothing_images,
            "samples_per_image": args.smoothing_samples,
            "batch_size": args.smoothing_batch,
            "smooth_samples_per_s": total_samples / smoothing_s,
            "bare_forward_samples_per_s": args.smoothing_batch / bare_s,
            "smooth_vs_bare": (total_samples / smoothing_s) / (args.smoothing_batch / bare_s),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
