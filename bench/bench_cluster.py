"""`make bench` section `cluster`: a PGD sweep (`evaluation.sweep.run_sweep` as work units) on a local Ray
instance with 1 and with 2 single-threaded workers, against the same units in this process with one torch
thread. Targets: 2 workers >= 1.6x faster than 1; 1 Ray worker <= 1.1x the in-process time.

This process, and each Ray instance's workers (torch imported, models loaded), are warmed up before the
timed runs: the figures are the steady state of a long sweep, not Ray's start-up."""

from __future__ import annotations

import os
import time

import torch

TARGET_SCALING = 1.6
TARGET_OVERHEAD = 1.1


def bench_cluster(images: int = 256, shard_size: int = 32, alphas: tuple[float, ...] = (0.0, 0.5, 1.0)) -> dict:
    from mixclf_ros.data import evaluation_subset, load_fashion_mnist, to_tensor
    from mixclf_ros.evaluation.cluster import RayBackend
    from mixclf_ros.evaluation.model_pair import load_zoo_model
    from mixclf_ros.evaluation.settings import PGDSettings, Runtime, SweepSettings
    from mixclf_ros.evaluation.sweep import run_sweep
    from mixclf_ros.evaluation.units import Execution

    torch.set_num_threads(1)
    device = torch.device("cpu")
    standard, robust = load_zoo_model("standard", device), load_zoo_model("robust_at", device)
    all_images, all_labels = load_fashion_mnist("test")
    subset = torch.from_numpy(evaluation_subset())
    x, y = to_tensor(all_images)[subset][:images], torch.from_numpy(all_labels)[subset][:images]
    settings = SweepSettings(alphas, PGDSettings(norm="linf", eps=0.1, steps=20))

    def timed(backend, count: int = images) -> tuple[float, list[dict]]:
        runtime = Runtime(device, batch_size=shard_size, seed=0, execution=Execution(backend, None, shard_size))
        started = time.perf_counter()
        result = run_sweep(standard, robust, x[:count], y[:count], settings, runtime)
        return time.perf_counter() - started, result.rows

    timed(None, shard_size)  # warm-up of this process (first autograd passes, lazy imports)
    load_before = os.getloadavg()[0]
    in_process_seconds, rows = timed(None)
    seconds, identical = {}, True
    for workers in (1, 2):
        backend = RayBackend("local", threads=1, num_cpus=workers)
        try:
            timed(backend, workers * shard_size)  # warm-up: start the workers, load the models
            seconds[workers], ray_rows = timed(backend)
        finally:
            backend.close()
        identical &= ray_rows == rows
    scaling = seconds[1] / seconds[2]
    overhead = seconds[1] / in_process_seconds
    print(f"cluster: scaling 1 -> 2 workers {scaling:.2f}x (target >= {TARGET_SCALING}: "
          f"{'met' if scaling >= TARGET_SCALING else 'missed'}); 1 Ray worker over in process {overhead:.2f}x "
          f"(target <= {TARGET_OVERHEAD}: {'met' if overhead <= TARGET_OVERHEAD else 'missed'})", flush=True)
    units = len(alphas) * -(-images // shard_size) + 4 * -(-images // shard_size)
    return {"sweep": f"PGD-20 linf eps=0.1, alphas {list(alphas)}, {images} images in shards of {shard_size} "
                     f"({units} units), standard + robust_at, one torch thread per worker",
            "in_process_one_thread_s": in_process_seconds, "ray_1_worker_s": seconds[1], "ray_2_workers_s": seconds[2],
            "scaling_1_to_2_workers": scaling, "target_scaling": TARGET_SCALING,
            "scaling_met": scaling >= TARGET_SCALING,
            "overhead_1_worker_over_in_process": overhead, "target_overhead": TARGET_OVERHEAD,
            "overhead_met": overhead <= TARGET_OVERHEAD, "rows_identical": identical,
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def cluster_markdown(cluster: dict) -> list[str]:
    def verdict(met: bool) -> str:
        return "met" if met else "missed"

    return ["## Evaluation on Ray (`mixclf-eval sweep --ray local`)", "", cluster["sweep"] + ".", "",
            "| run | seconds |", "|---|---|",
            f"| in process, 1 thread | {cluster['in_process_one_thread_s']:.1f} |",
            f"| Ray, 1 worker | {cluster['ray_1_worker_s']:.1f} |",
            f"| Ray, 2 workers | {cluster['ray_2_workers_s']:.1f} |", "",
            f"Scaling 1 -> 2 workers: {cluster['scaling_1_to_2_workers']:.2f}x (target >= {TARGET_SCALING}: "
            f"{verdict(cluster['scaling_met'])}); 1 Ray worker over in process: "
            f"{cluster['overhead_1_worker_over_in_process']:.2f}x (target <= {TARGET_OVERHEAD}: "
            f"{verdict(cluster['overhead_met'])}); rows identical: {cluster['rows_identical']}.",
            *([f"1-minute load average before / after (other processes share the cores): "
               f"{cluster['load_average_1min'][0]:.1f} / {cluster['load_average_1min'][1]:.1f}."]
              if "load_average_1min" in cluster else []), ""]
