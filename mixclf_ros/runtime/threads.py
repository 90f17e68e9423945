"""torch's intra-op thread count chosen by measurement, per batch size, at warm-up.

One thread is fastest for the tiny demo models on one frame (threads cost more to wake than they
save); a 224x224 ResNet or a batch of several cameras gains from every core. Which holds on a given
machine and load is measured, not assumed: each candidate count runs the real classification path.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

GAIN_REQUIRED = 0.8
"""More threads are kept only when they take at most this fraction of the time of fewer (ties and
noise go to fewer threads, which leaves cores to the executor and other processes)."""


def default_candidates() -> range:
    """1 .. cores - 1 (at least 1): one core stays with the executor thread that receives and
    deserializes frames. On a shared 2-core machine a warm-up that saw both cores idle chose 2
    threads (2.21 against 2.50 ms a frame), and at 30 Hz the node then answered 86 of 240 frames at
    21 ms p50: torch's threads and the executor fought over the cores."""
    return range(1, max(1, available_cores() - 1) + 1)


def available_cores() -> int:
    """CPU cores this process may run on (affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ThreadPlan:
    """Thread count per batch size, with the timings (median ms per candidate count) behind it."""

    threads: dict[int, int]
    timings_ms: dict[int, dict[int, float]] = field(default_factory=dict)

    def for_batch(self, batch_size: int) -> int:
        """The count measured for the largest measured batch size <= `batch_size` (the smallest
        measured one below that)."""
        sizes = sorted(self.threads)
        chosen = sizes[0]
        for size in sizes:
            if size <= batch_size:
                chosen = size
        return self.threads[chosen]

    def apply(self, batch_size: int) -> int:
        """Sets torch's thread count for a batch of this size (only when it changes); returns it."""
        count = self.for_batch(batch_size)
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        return count

    def describe(self) -> str:
        parts = []
        for size in sorted(self.threads):
            timing = ", ".join(f"{count}: {ms:.2f} ms" for count, ms in sorted(self.timings_ms.get(size, {}).items()))
            parts.append(f"batch {size} -> {self.threads[size]}" + (f" ({timing})" if timing else ""))
        return "; ".join(parts)


def fixed_plan(count: int) -> ThreadPlan:
    """A plan that always uses `count` threads (an explicit setting, no measurement)."""
    return ThreadPlan({1: max(1, int(count))})


def measure_thread_plan(run: Callable[[int], object], batch_sizes: Iterable[int],
                        candidates: Iterable[int] | None = None, repeats: int = 7,
                        clock: Callable[[], float] = time.perf_counter, budget_s: float = 5.0) -> ThreadPlan:
    """Times `run(batch_size)` (the real path: preprocessing, both models, certificate) under each
    candidate thread count (default `default_candidates()`) and keeps, per batch size, the fewest
    threads within `GAIN_REQUIRED` of the fastest. Median of `repeats` after one unmeasured call per
    count; fewer repeats (at least 1) where the unmeasured call shows that `repeats` would overrun
    `budget_s` seconds for the whole measurement (a large model in float64 takes seconds a pass);
    `clock` in seconds. Leaves torch set for the smallest batch size."""
    counts = sorted(set(candidates or default_candidates()))
    plan = ThreadPlan({})
    sizes = sorted(set(int(b) for b in batch_sizes))
    share = budget_s / (len(sizes) * len(counts))
    for size in sizes:
        timings = {}
        for count in counts:
            torch.set_num_threads(count)
            start = clock()
            run(size)
            first = clock() - start
            samples = []
            for _ in range(max(1, min(repeats, int(share / first) if first > 0 else repeats))):
                start = clock()
                run(size)
                samples.append(1e3 * (clock() - start))
            timings[count] = statistics.median(samples)
        best = counts[0]
        for count in counts[1:]:
            if timings[count] <= GAIN_REQUIRED * timings[best]:
                best = count
        plan.threads[size] = best
        plan.timings_ms[size] = timings
    plan.apply(min(plan.threads))
    return plan
