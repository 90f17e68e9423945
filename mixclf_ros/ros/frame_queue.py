"""Frames waiting for inference, per camera, with the counters diagnostics report.

`frame_policy` newest keeps only the newest frame of each camera (older ones are dropped and
counted: results never lag the camera); every keeps up to `max_queued` frames per camera in
arrival order. The inference thread takes one batch at a time: the oldest waiting frame of each
camera.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from mixclf_ros.runtime.frame_result import FrameResult, Status

POLICIES = ("newest", "every")


@dataclass
class CameraStats:
    """Counters of one camera topic, for diagnostics."""

    received: int = 0
    processed: int = 0
    dropped: int = 0  # replaced by a newer frame (newest) or pushed out of a full queue (every)
    bad_input: int = 0
    stale: int = 0
    not_ready: int = 0
    model_error: int = 0
    suspected_lost: int = 0  # gaps in header stamps larger than 1.5x the usual frame interval
    safe: int = 0
    last_receive: float | None = None
    last_stamp: float | None = None
    stamp_intervals: deque = field(default_factory=lambda: deque(maxlen=30))
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=300))

    def note_stamp(self, stamp_s: float) -> None:
        if self.last_stamp is not None and stamp_s > self.last_stamp:
            interval = stamp_s - self.last_stamp
            if len(self.stamp_intervals) >= 5:
                usual = sorted(self.stamp_intervals)[len(self.stamp_intervals) // 2]
                if usual > 0 and interval > 1.5 * usual:
                    self.suspected_lost += max(1, round(interval / usual) - 1)
            self.stamp_intervals.append(interval)
        self.last_stamp = stamp_s


_COUNTERS = {Status.BAD_INPUT: "bad_input", Status.STALE: "stale", Status.MODEL_ERROR: "model_error",
             Status.NOT_READY: "not_ready"}


@dataclass
class PendingFrame:
    topic: str
    message: Any
    received: float  # time.monotonic() at arrival


class FrameQueue:
    """Thread-safe per-camera queues; open (accepting frames) only while the node is active."""

    def __init__(self, max_queued: int):
        self._condition = threading.Condition()
        self._pending: dict[str, deque[PendingFrame]] = {}
        self._stats: dict[str, CameraStats] = {}
        self._open = False
        self._keep_every_frame = False
        self._max_queued = max_queued

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"frame_policy must be 'newest' or 'every', got {policy!r}")
        self._keep_every_frame = policy == "every"

    def add_camera(self, topic: str) -> None:
        with self._condition:
            self._stats.setdefault(topic, CameraStats())

    def open(self) -> None:
        with self._condition:
            self._open = True

    def close(self) -> None:
        """Stops accepting frames, drops the waiting ones and wakes the inference thread."""
        with self._condition:
            self._open = False
            self._pending.clear()
            self._condition.notify_all()

    @property
    def is_open(self) -> bool:
        return self._open

    def put(self, topic: str, message: Any, stamp_s: float, wake: bool = True) -> bool:
        """Queues a frame; False (counted as not ready) while the queue is closed. `wake` = False
        leaves the inference thread asleep (the caller takes the frame itself, `take_now`)."""
        now = time.monotonic()
        with self._condition:
            stats = self._stats[topic]
            stats.received += 1
            stats.last_receive = now
            stats.note_stamp(stamp_s)
            if not self._open:
                stats.not_ready += 1
                return False
            queue = self._pending.setdefault(topic, deque())
            if queue and (not self._keep_every_frame or len(queue) >= self._max_queued):
                queue.popleft()
                stats.dropped += 1
            queue.append(PendingFrame(topic, message, now))
            if wake:
                self._condition.notify()
            return True

    def take_now(self) -> list[PendingFrame]:
        """The oldest frame of each camera, without waiting ([] when none wait or closed)."""
        with self._condition:
            if not self._open:
                return []
            return [queue.popleft() for queue in self._pending.values() if queue]

    def wake(self) -> None:
        """Wakes the inference thread if frames wait."""
        with self._condition:
            if any(self._pending.values()):
                self._condition.notify()

    def take_batch(self, poll_s: float = 0.5) -> list[PendingFrame] | None:
        """Blocks until frames wait; returns the oldest frame of each camera, or None once closed."""
        with self._condition:
            while self._open and not any(self._pending.values()):
                self._condition.wait(timeout=poll_s)
            if not self._open:
                return None
            return [queue.popleft() for queue in self._pending.values() if queue]

    def record(self, frame: PendingFrame, result: FrameResult) -> None:
        """Counts a published result."""
        with self._condition:
            stats = self._stats[frame.topic]
            stats.processed += 1
            stats.safe += int(result.safe)
            counter = _COUNTERS.get(result.status)
            if counter:
                setattr(stats, counter, getattr(stats, counter) + 1)
            stats.latencies_ms.append(1e3 * (time.monotonic() - frame.received))

    def snapshot(self) -> dict[str, CameraStats]:
        with self._condition:
            return {topic: replace(stats, latencies_ms=list(stats.latencies_ms))
                    for topic, stats in self._stats.items()}
