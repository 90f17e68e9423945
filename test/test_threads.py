"""Thread counts chosen by measurement: the choice rule on a simulated clock (no timing here)."""

from __future__ import annotations

import torch

from mixclf_ros.runtime.threads import GAIN_REQUIRED, ThreadPlan, fixed_plan, measure_thread_plan


class SimulatedWork:
    """`run(batch)` advances a fake clock by cost[(batch, threads)] seconds."""

    def __init__(self, cost: dict[tuple[int, int], float]):
        self.cost, self.now = cost, 0.0

    def clock(self) -> float:
        return self.now

    def run(self, batch: int) -> None:
        self.now += self.cost[(batch, torch.get_num_threads())]


def test_fewest_threads_unless_more_are_clearly_faster():
    before = torch.get_num_threads()
    try:
        work = SimulatedWork({(1, 1): 0.002, (1, 2): 0.0019,  # within the noise margin: 1 thread
                              (8, 1): 0.020, (8, 2): 0.011})  # clearly faster: 2 threads
        plan = measure_thread_plan(work.run, (1, 8), candidates=(1, 2), clock=work.clock)
        assert plan.threads == {1: 1, 8: 2}
        assert abs(plan.timings_ms[8][2] - 11.0) < 1e-9
        assert torch.get_num_threads() == 1  # left at the smallest batch's count
        assert plan.for_batch(4) == 1 and plan.for_batch(8) == 2 and plan.for_batch(16) == 2
        assert plan.apply(9) == 2 and torch.get_num_threads() == 2
        assert "batch 8 -> 2" in plan.describe()
        assert 0.0019 > GAIN_REQUIRED * 0.002
    finally:
        torch.set_num_threads(before)


def test_fixed_plan_and_smaller_batches():
    assert fixed_plan(3).for_batch(1) == 3 and fixed_plan(3).for_batch(64) == 3
    plan = ThreadPlan({4: 2, 16: 1})
    assert plan.for_batch(1) == 2  # below every measured size: the smallest one's count
    assert plan.for_batch(20) == 1


def test_slow_paths_are_timed_fewer_times():
    before = torch.get_num_threads()
    try:
        work = SimulatedWork({(1, 1): 2.0, (1, 2): 1.0})  # seconds a pass: a large float64 model
        calls = []
        plain_run = work.run
        work.run = lambda batch: (calls.append(batch), plain_run(batch))
        plan = measure_thread_plan(work.run, (1,), candidates=(1, 2), clock=work.clock, budget_s=4.0)
        assert plan.threads == {1: 2}
        assert len(calls) == 2 * (1 + 1) + 1  # one unmeasured and one measured call per count (+1 for 2 threads)
    finally:
        torch.set_num_threads(before)
