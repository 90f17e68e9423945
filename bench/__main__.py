"""`make bench`: speed and memory of the node, measured side by side in one run.

    python -m bench [--only latency,naive,cameras,smoothing,certify,attacks,cluster,soak,bag,transport]
                    [--soak-seconds 60]

Every figure is a ratio against a baseline measured in the same run (this machine is shared and
noisy). Results: bench/results/latest.json, and a summary regenerated in docs/BENCHMARKS.md.

- latency:   image published -> result received (ping-pong, one frame in flight, 640x480 rgb8) for
             the mixclf node and for a bare relay node; bare forward passes of both models on the
             preprocessed input; overhead = node / (relay + forward). Also with torchvision
             resnet18 at 224x224 (random weights), where compute dominates.
- naive:     our node against the common way (bench/naive_node.py) at 30 Hz input.
- cameras:   throughput with 1, 2, 4, 8 cameras into one node against as many separate nodes.
- smoothing: certified frames/s for n = 100, 1 000, 10 000; noisy samples/s against the bare
             batched forward pass of the same base model.
- certify:   certificate arithmetic against one forward pass (bench/bench_certify.py).
- cluster:   a PGD sweep on a local Ray instance with 1 and 2 single-threaded workers, against the same
             work units in process with one thread (bench/bench_cluster.py).
- soak:      resident memory of the node at 30 Hz over --soak-seconds.
- bag:       peak memory of `mixclf-eval bag` on a recording and on one 10x longer (bench/bench_bag.py).
- transport: best-effort 640x480 rgb8 frames lost between two processes at 30 Hz on a loaded
             machine, per Fast DDS configuration (bench/bench_transport.py).
- levers:    in-process A/B of preprocessing paths and torch thread counts (bench/levers.py).
- executors: ping-pong latency of the node per executor (events, multi_threaded) with and without
             inline inference, beside the relay.

Every run ends with the targets (bench/targets.py), each met, missed or not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "test"))
os.environ.setdefault("ROS_DOMAIN_ID", "57")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

from rosutil import RosClient, image_message, node_process, rss_mb  # noqa: E402

from bench import targets  # noqa: E402
from bench.bench_bag import bag_markdown, bench_bag  # noqa: E402
from bench.bench_certify import median_seconds  # noqa: E402
from bench.bench_cluster import bench_cluster, cluster_markdown  # noqa: E402
from bench.bench_onepass import bench_onepass  # noqa: E402
from bench.bench_transport import bench_transport  # noqa: E402
from bench.bench_transport import markdown as transport_markdown  # noqa: E402
from bench.levers import bench_levers  # noqa: E402

CONFIG = REPO_ROOT / "config" / "mixclf.yaml"
# Reliable frames everywhere: Fast DDS drops best-effort 900 KB frames between processes here
# (README, "Large images and Fast DDS"); a lost ping would measure the timeout, not the node.
RELIABLE = ["-p", "qos_overrides./image.subscription.reliability:=reliable"]
RESULTS = REPO_ROOT / "bench" / "results"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def demo_frames(count: int = 10) -> list[np.ndarray]:
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article

    images, _ = load_fashion_mnist("test")
    return [embed_article(images[i]) for i in range(count)]


class Session:
    """An rclpy context plus a client node for one measurement."""

    def __init__(self, name: str):
        import rclpy

        self.context = rclpy.context.Context()
        rclpy.init(context=self.context)
        self.client = RosClient(self.context, name=name, reliable=True, single_threaded=True)

    def close(self) -> None:
        import rclpy

        self.client.close()
        rclpy.try_shutdown(context=self.context)


def wait_for_first_result(client: RosClient, frame: np.ndarray, timeout: float = 300.0) -> None:
    """Sends frames until one comes back classified (node active and warm, discovery done); a
    relay's answers (status 0 too) count as well."""
    client.clear()
    deadline = time.monotonic() + timeout
    index = 0
    while time.monotonic() < deadline:
        frame_id = f"warm-{index}"
        client.image_publisher.publish(image_message(frame, frame_id, client.node))
        found = client.wait_for({frame_id}, timeout=0.5)
        if found and found[frame_id].status == 0:
            return
        index += 1
    raise RuntimeError("no result from the node")


def ping_pong(client: RosClient, frames: list[np.ndarray], count: int) -> list[float]:
    """Latency in ms of `count` frames sent one at a time, each after the previous result."""
    client.clear()  # results of an earlier measurement carry the same frame ids
    wait_for_first_result(client, frames[0])
    for index in range(10):  # warm-up of the measured path
        client.image_publisher.publish(image_message(frames[index % len(frames)], f"w{index}", client.node))
        client.wait_for({f"w{index}"}, timeout=5)
    latencies = []
    for index in range(count):
        frame_id = f"ping-{index}"
        message = image_message(frames[index % len(frames)], frame_id, client.node)
        start = time.perf_counter()
        client.image_publisher.publish(message)
        found = client.wait_for({frame_id}, timeout=2)
        if found and found[frame_id].status == 0:
            latencies.append(1e3 * (time.perf_counter() - start))
    return latencies


def stream(client: RosClient, frames: list[np.ndarray], rate: float, seconds: float, topic_publishers=None):
    """Publishes at `rate` Hz on each publisher; returns (sent ids, per-result latency ms, results/s)."""
    publishers = topic_publishers or [client.image_publisher]
    client.clear()
    sent = []
    start = time.monotonic()
    total = int(rate * seconds)
    for index in range(total):
        for camera, publisher in enumerate(publishers):
            frame_id = f"s{camera}-{index}"
            message = image_message(frames[index % len(frames)], frame_id, client.node)
            publisher.publish(message)
            sent.append(frame_id)
        time.sleep(max(0.0, start + (index + 1) / rate - time.monotonic()))
    time.sleep(1.0)
    now_ns = client.node.get_clock().now().nanoseconds
    results = client.results_for(set(sent))
    del now_ns
    latencies = [r.inference_ms for r in results.values()]
    return sent, results, latencies, len(results) / seconds


def received_latency(client: RosClient) -> dict[str, int]:
    """Records the arrival time (ns, ROS clock) of every result by frame id, so that
    latency = arrival - header stamp. Returns the dict it fills."""
    from mixclf_ros.msg import CertifiedClassification

    arrivals: dict[str, int] = {}

    def on_result(message) -> None:
        arrivals.setdefault(message.header.frame_id, client.node.get_clock().now().nanoseconds)

    client.node.create_subscription(CertifiedClassification, "certified_classification", on_result, 100)
    return arrivals


def stamp_latencies(results: dict, arrivals: dict[str, int]) -> list[float]:
    values = []
    for frame_id, result in results.items():
        if frame_id in arrivals:
            stamp = result.header.stamp.sec * 10**9 + result.header.stamp.nanosec
            values.append((arrivals[frame_id] - stamp) * 1e-6)
    return values


def bare_forward_ms(standard, robust, shape: tuple[int, ...], repeats: int = 200) -> float:
    x = torch.rand(1, *shape)
    with torch.inference_mode():
        return 1e3 * median_seconds(lambda: (standard(x), robust(x)), torch.device("cpu"), repeats, warmup=20)


def node_threads(log_path: Path) -> int:
    """torch threads the node chose (or was given) for one frame, from its configure log line."""
    import re

    found = re.search(r"torch threads: batch 1 -> (\d+)", log_path.read_text())
    return int(found.group(1)) if found else 1


def bench_latency(work: Path, count: int) -> dict:
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.node_parameters import MODELS

    frames = demo_frames()
    out = {}
    session = Session("bench_latency")
    try:
        with node_process("mixclf_node", "--params-file", str(CONFIG), "-p", "max_image_age:=0.0", *RELIABLE,
                          log_path=work / "node.log"):
            node_ms = ping_pong(session.client, frames, count)
        relay = [sys.executable, str(REPO_ROOT / "bench" / "relay_node.py")]
        with subprocess_node(relay, work / "relay.log"):
            relay_ms = ping_pong(session.client, frames, count)
    finally:
        session.close()
    threads = node_threads(work / "node.log")  # the bare forward passes run under the node's thread setting
    torch.set_num_threads(threads)
    forward_ms = bare_forward_ms(*(load_model(zoo_config(MODELS[role])) for role in ("standard_model", "robust_model")),
                                 (1, 28, 28))
    out["demo_models_640x480_rgb8"] = {**summarize_overhead(node_ms, relay_ms, forward_ms),
                                       "node_torch_threads": threads}

    # a model large enough that compute dominates: torchvision resnet18 at 224x224, both models
    import torchvision

    torch.manual_seed(0)
    weights = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    model_args = []
    for prefix in ("standard_model", "robust_model"):
        for key, value in {"architecture": "torchvision:resnet18", "weights": str(weights), "sha256": "''",
                           "input_channels": 3, "input_height": 224, "input_width": 224,
                           "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]"}.items():
            model_args += ["-p", f"{prefix}.{key}:={value}"]
    # the robust resnet's constant is computed (its bound and rounding error by the engine, as a user's would be)
    model_args += ["-p", "robust_model.kind:=lipschitz", "-p", "robust_model.lipschitz_constant:=0.0",
                   "-p", "standard_model.kind:=standard", "-p", "max_image_age:=0.0"]
    for prefix in ("standard_model", "robust_model"):
        model_args += ["-p", f"{prefix}.crop_height:=0", "-p", f"{prefix}.crop_width:=0",
                       "-p", f"{prefix}.resize:=bilinear"]
    try:  # configure bounds the robust resnet (about 8 s cold on a loaded 2-core machine, ~1 s warm)
        session = Session("bench_latency_resnet")
        try:
            with node_process("mixclf_node", "--params-file", str(CONFIG), *model_args, *RELIABLE,
                              log_path=work / "resnet.log"):
                node_ms = ping_pong(session.client, frames, max(20, count // 4))
            with subprocess_node(relay, work / "relay2.log"):
                relay_ms = ping_pong(session.client, frames, max(20, count // 4))
        finally:
            session.close()
        model = torchvision.models.resnet18(num_classes=10).eval()
        threads = node_threads(work / "resnet.log")
        torch.set_num_threads(threads)
        forward_ms = bare_forward_ms(model, model, (3, 224, 224), repeats=20)
        out["resnet18_224_640x480_rgb8"] = {**summarize_overhead(node_ms, relay_ms, forward_ms),
                                            "node_torch_threads": threads}
    except Exception as error:  # recorded, so that the other figures of the run survive
        out["resnet18_224_640x480_rgb8_error"] = f"{type(error).__name__}: {error}"[:500]
    out["target_overhead_ratio"] = 1.15
    return out


def bench_executors(work: Path, count: int, rounds: int = 3) -> dict:
    """Ping-pong latency (ms) of the demo node per executor and inference hand-off, and of the relay
    on both executors, interleaved over `rounds` rounds (load on this machine moves between minutes):
    p50 and p99 over all rounds' pings, and each round's p50."""
    frames = demo_frames()
    variants = [(f"{executor}_{'inline' if inline else 'handoff'}", executor, inline)
                for executor in ("events", "multi_threaded") for inline in (True, False)]
    variants += [(f"relay_{executor}", executor, None) for executor in ("events", "single")]
    pooled: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    per_round: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    session = Session("bench_executors")
    try:
        for round_index in range(rounds):
            for name, executor, inline in variants:
                log = work / f"exec_{name}_{round_index}.log"
                if inline is None:
                    starter = subprocess_node([sys.executable, str(REPO_ROOT / "bench" / "relay_node.py"), executor],
                                              log)
                else:
                    starter = node_process("mixclf_node", "--params-file", str(CONFIG), "-p", "max_image_age:=0.0",
                                           *RELIABLE, "-p", f"executor:={executor}", "-p",
                                           f"inline_inference:={str(inline).lower()}", log_path=log)
                with starter:
                    latencies = ping_pong(session.client, frames, count)
                pooled[name] += latencies
                per_round[name].append(percentile(latencies, 50))
    finally:
        session.close()
    return {name: {"p50": percentile(pooled[name], 50), "p99": percentile(pooled[name], 99),
                   "frames": len(pooled[name]), "round_p50s": per_round[name]} for name in pooled}


def summarize_overhead(node_ms: list[float], relay_ms: list[float], forward_ms: float) -> dict:
    node_p50, relay_p50 = percentile(node_ms, 50), percentile(relay_ms, 50)
    return {
        "frames": len(node_ms),
        "node_latency_ms": {"p50": node_p50, "p99": percentile(node_ms, 99)},
        "relay_latency_ms": {"p50": relay_p50, "p99": percentile(relay_ms, 99)},
        "bare_forward_both_models_ms": forward_ms,
        "overhead_ratio_p50": node_p50 / (relay_p50 + forward_ms),
        "overhead_ratio_p99": percentile(node_ms, 99) / (percentile(relay_ms, 99) + forward_ms),
    }


class subprocess_node:  # noqa: N801 - used like node_process
    def __init__(self, command: list[str], log_path: Path):
        self.command, self.log_path = command, log_path

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        return self.process

    def __exit__(self, *exc):
        self.process.send_signal(2)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def bench_naive(work: Path, seconds: float) -> dict:
    frames = demo_frames()
    out = {}
    for name, starter in (
        ("mixclf_node", lambda: node_process("mixclf_node", "--params-file", str(CONFIG), *RELIABLE,
                                             "-p", "max_image_age:=0.0", log_path=work / "node_naive.log")),
        ("naive_node", lambda: subprocess_node([sys.executable, str(REPO_ROOT / "bench" / "naive_node.py")],
                                               work / "naive.log")),
    ):
        session = Session(f"bench_{name}")
        try:
            arrivals = received_latency(session.client)
            with starter():
                wait_for_first_result(session.client, frames[0])
                sent, results, _, _ = stream(session.client, frames, 30.0, seconds)
                # results that arrive late still count for the naive node's queue: wait them out
                time.sleep(3.0)
                results = session.client.results_for(set(sent))
        finally:
            session.close()
        latencies = stamp_latencies(results, arrivals)
        out[name] = {"sent": len(sent), "received": len(results), "throughput_hz": len(results) / seconds,
                     "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}}
    out["latency_ratio_p50_naive_over_ours"] = (
        out["naive_node"]["latency_ms"]["p50"] / out["mixclf_node"]["latency_ms"]["p50"])
    out["throughput_ratio_ours_over_naive"] = (
        out["mixclf_node"]["throughput_hz"] / max(out["naive_node"]["throughput_hz"], 1e-9))
    return out


def bench_cameras(work: Path, seconds: float, counts=(1, 2, 4, 8)) -> dict:
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    frames = demo_frames()
    out = {}
    for cameras in counts:
        topics = [f"cam{i}/image" for i in range(cameras)]
        for layout in ("one_node", "separate_nodes"):
            session = Session(f"bench_cameras_{cameras}_{layout}")
            qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
            publishers = [session.client.node.create_publisher(Image, topic, qos) for topic in topics]
            try:
                with _camera_nodes(work, topics, layout):
                    _wait_all_cameras(session.client, publishers, frames[0])
                    _, _, _, throughput = stream(session.client, frames, 30.0, seconds, publishers)
            finally:
                session.close()
            out.setdefault(str(cameras), {})[layout] = {"results_per_s": throughput}
        entry = out[str(cameras)]
        entry["ratio_one_node_over_separate"] = (
            entry["one_node"]["results_per_s"] / max(entry["separate_nodes"]["results_per_s"], 1e-9))
    return out


class _camera_nodes:  # noqa: N801
    def __init__(self, work: Path, topics: list[str], layout: str):
        self.contexts = []
        base = ["--params-file", str(CONFIG), "-p", "max_image_age:=0.0"]
        base += [arg for topic in topics
                 for arg in ("-p", f"qos_overrides./{topic}.subscription.reliability:=reliable")]
        if layout == "one_node":
            listing = "[" + ",".join(f"'{t}'" for t in topics) + "]"
            self.specs = [(base + ["-p", f"image_topics:={listing}"], work / "cams_one.log")]
        else:
            self.specs = [(base + ["-p", f"image_topics:=['{t}']", "-r", f"__node:=mixclf_{i}"],
                           work / f"cams_sep_{i}.log") for i, t in enumerate(topics)]

    def __enter__(self):
        for args, log in self.specs:
            context = node_process("mixclf_node", *args, log_path=log)
            context.__enter__()
            self.contexts.append(context)
        return self

    def __exit__(self, *exc):
        for context in self.contexts:
            context.__exit__(None, None, None)


def _wait_all_cameras(client: RosClient, publishers, frame, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(range(len(publishers)))
    index = 0
    while pending and time.monotonic() < deadline:
        for camera in list(pending):
            frame_id = f"warm{camera}-{index}"
            publishers[camera].publish(image_message(frame, frame_id, client.node))
            if client.wait_for({frame_id}, timeout=0.3):
                pending.discard(camera)
        index += 1
    if pending:
        raise RuntimeError(f"cameras {sorted(pending)} never answered")


def bench_smoothing() -> dict:
    from mixclf_ros.core.smoothing import Smooth
    from mixclf_ros.models.loading import load_model, zoo_config

    torch.set_num_threads(2)
    base = load_model(zoo_config("robust_smoothing"))
    smooth = Smooth(base, base.num_classes, base.sigma)
    x = torch.rand(1, *base.input_shape)
    out = {}
    for n in (100, 1_000, 10_000):
        frames = 20 if n <= 1000 else 3
        generator = torch.Generator().manual_seed(0)
        smooth.certify(x, n0=64, n=n, beta=0.001, batch_size=1000, generator=generator)
        start = time.perf_counter()
        for _ in range(frames):
            smooth.certify(x, n0=64, n=n, beta=0.001, batch_size=1000, generator=generator)
        out[f"certified_frames_per_s_n{n}"] = frames / (time.perf_counter() - start)
    batch = torch.rand(1000, *base.input_shape)
    with torch.inference_mode():
        base(batch)
        start = time.perf_counter()
        for _ in range(10):
            base(batch)
        bare = 10_000 / (time.perf_counter() - start)
        smooth.predict_probs(x, n=1000, batch_size=1000)
        start = time.perf_counter()
        for _ in range(10):
            smooth.predict_probs(x, n=1000, batch_size=1000)
        smoothing = 10_000 / (time.perf_counter() - start)
    out["bare_forward_samples_per_s"] = bare
    out["smoothing_samples_per_s"] = smoothing
    out["smoothing_over_bare_ratio"] = smoothing / bare
    out["target_ratio"] = 0.9
    return out


def bench_certify() -> dict:
    """Certificate arithmetic (batch 64, 10 classes) against one forward pass of both demo models
    on the same batch (target: under 1 %), plus bench/bench_certify.py's figures."""
    from mixclf_ros.core import certify
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.node_parameters import MODELS

    torch.set_num_threads(1)
    standard, robust = (load_model(zoo_config(MODELS[role])) for role in ("standard_model", "robust_model"))
    x = torch.rand(64, *robust.input_shape)

    def median_ms(function, repeats: int) -> float:
        return 1e3 * median_seconds(function, torch.device("cpu"), repeats, warmup=5)

    with torch.inference_mode():
        forward_ms = median_ms(lambda: (standard(x), robust(x)), 50)
        logits = robust(x).double()
        probs = torch.softmax(logits, dim=1)
        lipschitz_ms = median_ms(lambda: certify.best_lipschitz_radius(
            probs, 0.0, robust.lipschitz_constant, 0.6, logits=logits, logit_lipschitz=robust.logit_lipschitz_constant),
            500)
        p_lower = torch.rand(64, dtype=torch.float64) * 0.5 + 0.5
        smoothing_ms = median_ms(lambda: certify.smoothing_radius(p_lower, 1 - p_lower, 0.25, 0.6), 500)
    demo = {"forward_both_demo_models_batch64_ms": forward_ms, "lipschitz_radius_ms": lipschitz_ms,
            "smoothing_radius_ms": smoothing_ms, "lipschitz_radius_fraction": lipschitz_ms / forward_ms,
            "smoothing_radius_fraction": smoothing_ms / forward_ms, "target_fraction": 0.01}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_certify.py")],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return {"demo_models": demo, "error": result.stderr[-2000:]}
    return {"demo_models": demo, **json.loads(result.stdout[result.stdout.index("{"):])}


def bench_attacks(images_pgd: int = 256, images_autoattack: int = 16) -> dict:
    """Images per second of each evaluation attack, standard + robust_at at alpha 0.6, linf
    eps 0.1: PGD-20 aimed at g (STD), at h (ROB) and at the mixture (MIX), and the AutoAttack
    components (APGD-CE, APGD-T, Square at 100 iterations) on the mixture."""
    from mixclf_ros.data import evaluation_subset, load_fashion_mnist, to_tensor
    from mixclf_ros.evaluation.model_pair import load_zoo_model
    from mixclf_ros.evaluation.settings import AutoAttackSettings, PGDSettings, Runtime, SweepSettings
    from mixclf_ros.evaluation.sweep import run_sweep

    torch.set_num_threads(2)
    runtime = Runtime(device=torch.device("cpu"), batch_size=256)
    standard, robust = load_zoo_model("standard", runtime.device), load_zoo_model("robust_at", runtime.device)
    images, labels = load_fashion_mnist("test")
    subset = torch.from_numpy(evaluation_subset())
    x, y = to_tensor(images)[subset], torch.from_numpy(labels)[subset]
    attack = PGDSettings(norm="linf", eps=0.1, steps=20)
    pgd_run = run_sweep(standard, robust, x[:images_pgd], y[:images_pgd], SweepSettings((0.6,), attack), runtime)
    auto_run = run_sweep(standard, robust, x[:images_autoattack], y[:images_autoattack],
                         SweepSettings((0.6,), attack, AutoAttackSettings()), runtime)
    return {"attack": attack.describe(), "images_pgd": images_pgd, "images_autoattack": images_autoattack,
            "images_per_s": {**pgd_run.throughput,
                             "autoattack_apgd_ce_apgd_t_square": auto_run.throughput[
                                 "autoattack_apgd_ce_apgd_t_square"]}}


def bench_soak(work: Path, seconds: float) -> dict:
    frames = demo_frames()
    session = Session("bench_soak")
    samples = []
    try:
        with node_process("mixclf_node", "--params-file", str(CONFIG), "-p", "max_image_age:=0.0", *RELIABLE,
                          log_path=work / "soak.log") as process:
            wait_for_first_result(session.client, frames[0])
            stop = threading.Event()

            def sample():
                start = time.monotonic()
                while not stop.wait(max(1.0, seconds / 30)):
                    samples.append((time.monotonic() - start, rss_mb(process.pid)))

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                _, _, _, throughput = stream(session.client, frames, 30.0, seconds)
            finally:
                stop.set()
                sampler.join()
    finally:
        session.close()
    times, rss = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
    half = len(rss) // 2
    return {"seconds": seconds, "results_per_s": throughput, "rss_mb_first": float(rss[0]),
            "rss_mb_last": float(rss[-1]), "rss_mb_max": float(rss.max()),
            "rss_growth_mb_second_half": float(rss[half:].max() - rss[half:].min()) if half else float("nan"),
            "rss_slope_mb_per_min": float(np.polyfit(times, rss, 1)[0] * 60) if len(rss) > 2 else float("nan")}


def write_markdown(report: dict) -> None:
    runs = "; then ".join(f"`{run['command']}` at {run['date']}" for run in report["runs"])
    lines = ["# Benchmarks", "", f"Generated on {report['machine']} by {runs}.",
             "All ratios are measured side by side in the same run. Raw figures: `bench/results/latest.json`.", ""]
    lines += ["## Targets", ""] + targets.table(targets.evaluate(report)) + [""]
    latency = report.get("latency")
    if latency:
        lines += ["## End-to-end latency (one frame in flight, 640x480 rgb8)", "",
                  "| models | node p50 / p99 ms | relay p50 / p99 ms | bare forward ms "
                  "| overhead p50 (target <= 1.15) |",
                  "|---|---|---|---|---|"]
        for name in ("demo_models_640x480_rgb8", "resnet18_224_640x480_rgb8"):
            if name in latency:
                r = latency[name]
                ratio = r["overhead_ratio_p50"]
                lines.append(f"| {name} | {r['node_latency_ms']['p50']:.2f} / {r['node_latency_ms']['p99']:.2f} | "
                             f"{r['relay_latency_ms']['p50']:.2f} / {r['relay_latency_ms']['p99']:.2f} | "
                             f"{r['bare_forward_both_models_ms']:.2f} | {ratio:.2f} "
                             f"({'met' if ratio <= 1.15 else 'missed'}) |")
        lines.append("")
    naive = report.get("naive")
    if naive:
        lines += ["## Against the common way (30 Hz input)", "",
                  "| node | received / sent | results/s | latency p50 / p99 ms (stamp -> result) |",
                  "|---|---|---|---|"]
        for name in ("mixclf_node", "naive_node"):
            r = naive[name]
            lines.append(f"| {name} | {r['received']} / {r['sent']} | {r['throughput_hz']:.1f} | "
                         f"{r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f} |")
        lines += ["", f"Latency ratio naive / ours (p50): {naive['latency_ratio_p50_naive_over_ours']:.2f}; "
                  f"throughput ratio ours / naive: {naive['throughput_ratio_ours_over_naive']:.2f}.", ""]
    cameras = report.get("cameras")
    if cameras:
        lines += ["## Multi-camera batching (30 Hz per camera)", "",
                  "| cameras | one node results/s | separate nodes results/s | ratio |", "|---|---|---|---|"]
        for count, r in cameras.items():
            lines.append(f"| {count} | {r['one_node']['results_per_s']:.1f} | "
                         f"{r['separate_nodes']['results_per_s']:.1f} | {r['ratio_one_node_over_separate']:.2f} |")
        lines.append("")
    smoothing = report.get("smoothing")
    if smoothing:
        lines += ["## Randomized smoothing", "", "| n | certified frames/s |", "|---|---|"]
        for n in (100, 1000, 10000):
            lines.append(f"| {n} | {smoothing[f'certified_frames_per_s_n{n}']:.2f} |")
        lines += ["", f"Noisy samples/s over bare batched forward: {smoothing['smoothing_over_bare_ratio']:.3f} "
                  f"(target >= 0.9: {'met' if smoothing['smoothing_over_bare_ratio'] >= 0.9 else 'missed'}).", ""]
    certify = report.get("certify")
    if certify:
        lines += ["## Certificate arithmetic", "", "```json", json.dumps(certify, indent=1), "```", ""]
    attacks = report.get("attacks")
    if attacks:
        lines += ["## Evaluation attacks (`mixclf-eval sweep`), images/s", "",
                  f"{attacks['attack']}, standard + robust_at, alpha 0.6; PGD on {attacks['images_pgd']} "
                  f"test images, AutoAttack on {attacks['images_autoattack']}.", "",
                  "| attack | images/s |", "|---|---|"]
        lines += [f"| {name} | {rate:.1f} |" for name, rate in attacks["images_per_s"].items()]
        lines.append("")
    if report.get("cluster"):
        lines += cluster_markdown(report["cluster"])
    executors = report.get("executors")
    if executors:
        lines += ["## Executor and inference hand-off (ping-pong, demo models)", "",
                  "| node | p50 / p99 ms (all rounds) | p50 per round |", "|---|---|---|"]
        lines += [f"| {name} | {r['p50']:.2f} / {r['p99']:.2f} | "
                  + ", ".join(f"{v:.1f}" for v in r.get("round_p50s", [])) + " |" for name, r in executors.items()]
        lines.append("")
    levers = report.get("levers")
    if levers:
        lines += ["## Levers, in process (`--only levers`)", "", "```json", json.dumps(levers, indent=1), "```", ""]
    soak = report.get("soak")
    if soak:
        lines += ["## Memory soak at 30 Hz", "",
                  f"{soak['seconds']:.0f} s, {soak['results_per_s']:.1f} results/s; "
                  f"RSS first {soak['rss_mb_first']:.0f} MiB, "
                  f"last {soak['rss_mb_last']:.0f} MiB, max {soak['rss_mb_max']:.0f} MiB, slope "
                  f"{soak['rss_slope_mb_per_min']:.2f} MiB/min.", ""]
    if report.get("bag"):
        lines += bag_markdown(report["bag"])
    if report.get("transport"):
        lines += transport_markdown(report["transport"])
    notes = REPO_ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    (REPO_ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="latency,naive,cameras,smoothing,certify,attacks,cluster,soak,bag,transport,"
                                          "levers,executors,onepass")
    parser.add_argument("--pings", type=int, default=100)
    parser.add_argument("--stream-seconds", type=float, default=8.0)
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--transport-frames", type=int, default=1000)
    args = parser.parse_args(argv)
    selected = args.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="mixclf_bench_"))
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"torch {torch.__version__}, cuda {'yes' if torch.cuda.is_available() else 'no'}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    steps = {
        "latency": lambda: bench_latency(work, args.pings),
        "naive": lambda: bench_naive(work, args.stream_seconds),
        "cameras": lambda: bench_cameras(work, args.stream_seconds),
        "smoothing": bench_smoothing,
        "certify": bench_certify,
        "attacks": bench_attacks,
        "cluster": bench_cluster,
        "soak": lambda: bench_soak(work, args.soak_seconds),
        "bag": lambda: bench_bag(work),
        "transport": lambda: bench_transport(work, args.transport_frames),
        "levers": bench_levers,
        "executors": lambda: bench_executors(work, args.pings),
        "onepass": bench_onepass,
    }
    for name in selected:
        start = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        report[name] = steps[name]()
        print(json.dumps(report[name], indent=1), flush=True)
        print(f"bench: {name} took {time.monotonic() - start:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    run = {"command": "make bench" + (f" ARGS='{' '.join(argv)}'" if argv else ""), "date": report["date"],
           "sections": selected}
    report["runs"] = [run]
    if latest.exists() and set(selected) != set(steps):  # a partial run updates its sections only
        previous = json.loads(latest.read_text())
        report = {**previous, **report, "runs": previous.get("runs", []) + [run]}
    latest.write_text(json.dumps(report, indent=1))
    write_markdown(report)
    print("\n".join(["bench: targets"] + targets.table(targets.evaluate(report))), flush=True)
    print(f"bench: logs in {work}; summary in docs/BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
