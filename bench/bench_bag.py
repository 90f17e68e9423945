"""`make bench` section `bag`: `mixclf-eval bag` memory on a recording and on one 10x longer. Each run is
its own process (the shipped parameters file, one torch thread, 640x480 mono8 demo frames, two alphas);
its peak resident memory comes from the kernel (`os.wait4`). Target: the 10x recording's peak within
10 % of the short one's (the frames stream; only a few shards' rows are held)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TARGET_GROWTH = 1.10


def _recording(path: Path, count: int) -> Path:
    from bagutil import Frame, write_recording

    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article

    images, _ = load_fashion_mnist("test")
    frames = [Frame(f"frame{i}", embed_article(images[i % 100])[:, :, 0].copy(), "mono8") for i in range(count)]
    return write_recording(path, "/camera/image_raw", frames, storage="mcap")


def _peak_mb(recording: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `mixclf-eval bag` process."""
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "mixclf_ros.evaluation", "bag", str(recording), "--topic", "/camera/image_raw",
               "--params", str(repo / "config" / "mixclf.yaml"), "--alphas", "0.6,1", "--threads", "1",
               "--device", "cpu", "--no-progress", "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({status})")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def bench_bag(work: Path, frames: int = 60) -> dict:
    short = _recording(work / "bag_short", frames)
    long = _recording(work / "bag_long", 10 * frames)
    short_mb, short_s = _peak_mb(short, work / "bag_out_short")
    long_mb, long_s = _peak_mb(long, work / "bag_out_long")
    return {"frames": [frames, 10 * frames], "peak_rss_mb": [short_mb, long_mb], "seconds": [short_s, long_s],
            "growth": long_mb / short_mb, "met": long_mb / short_mb <= TARGET_GROWTH}


def bag_markdown(bag: dict) -> list[str]:
    return ["## `mixclf-eval bag` memory on a 10x longer recording", "",
            "| frames (640x480 mono8, MCAP) | peak RSS (MiB) | seconds (2 alphas) |", "|---|---|---|",
            *(f"| {n} | {mb:.0f} | {s:.1f} |" for n, mb, s in zip(bag["frames"], bag["peak_rss_mb"], bag["seconds"])),
            "", f"Growth {bag['growth']:.3f}x (target <= {TARGET_GROWTH}: {'met' if bag['met'] else 'missed'}).", ""]
