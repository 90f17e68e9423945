"""In-process A/B of the per-frame levers (`python -m bench --only levers`): preprocessing paths,
torch thread counts per batch size, and torch.set_num_threads switching. Medians in ms, one run,
side by side."""

from __future__ import annotations

import time

import numpy as np
import torch


def median_ms(function, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(1e3 * (time.perf_counter() - start))
    return float(np.median(samples))


def _camera_frame():
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article
    from mixclf_ros.vision.decode import DecodedImage

    images, _ = load_fashion_mnist("test")
    return DecodedImage(embed_article(images[0]), "rgb", 1 / 255)


def preprocessing(repeats: int = 200) -> dict:
    """uint8 integer block sums against the float64 area path, 640x480 rgb8 -> crop 476 -> 28x28 grey."""
    from mixclf_ros.vision import preprocess

    torch.set_num_threads(1)
    frame = _camera_frame()
    config = preprocess.PreprocessConfig(1, 28, 28, 476, 476, "area")
    out = {}
    original = preprocess._integer_area_factors
    try:
        for name, factors in (("integer_block_sums", original), ("float64_area", lambda *args: None)):
            preprocess._integer_area_factors = factors
            run = preprocess.Preprocessor(config)
            for batch in (1, 8):
                out[f"{name}_batch{batch}_ms"] = median_ms(lambda run=run, batch=batch: run([frame] * batch), repeats)
    finally:
        preprocess._integer_area_factors = original
    return out


def threads(repeats: int = 30) -> dict:
    """The full classify path of the demo models, and the bare forward pass of resnet18 at 224, under
    1 .. cores threads at batch 1 and 8; the plan `measure_thread_plan` picks from the same path."""
    import torchvision

    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
    from mixclf_ros.runtime.node_parameters import MODELS
    from mixclf_ros.runtime.threads import available_cores, measure_thread_plan
    from mixclf_ros.vision.preprocess import PreprocessConfig

    frame = _camera_frame()
    standard, robust = (load_model(zoo_config(MODELS[role])) for role in ("standard_model", "robust_model"))
    classifier = CertifiedClassifier(standard, robust, PreprocessConfig(1, 28, 28, 476, 476), torch.device("cpu"),
                                     seed=0)
    settings = LiveSettings(alpha=0.6, safe_radius=0.0)
    counts = range(1, available_cores() + 1)
    out: dict = {"cores": available_cores(), "demo_classify_ms": {}, "resnet18_224_forward_ms": {}}
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    for batch in (1, 8):
        for count in counts:
            torch.set_num_threads(count)
            out["demo_classify_ms"][f"batch{batch}_threads{count}"] = median_ms(
                lambda batch=batch: classifier.classify([frame] * batch, settings), repeats)
            x = torch.rand(batch, 3, 224, 224)
            with torch.inference_mode():
                out["resnet18_224_forward_ms"][f"batch{batch}_threads{count}"] = median_ms(
                    lambda x=x: resnet(x), max(3, repeats // (4 * batch)), warmup=1)
    plan = measure_thread_plan(lambda batch: classifier.classify([frame] * batch, settings), (1, 8))
    out["demo_plan"] = plan.describe()
    switches = [1, available_cores()]
    index = iter(range(10**9))
    out["set_num_threads_switch_ms"] = median_ms(lambda: torch.set_num_threads(switches[next(index) % 2]), 200)
    torch.set_num_threads(1)
    return out


def bench_levers() -> dict:
    return {"preprocessing": preprocessing(), "threads": threads()}
