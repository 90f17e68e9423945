"""Demo monitor (`mixclf_monitor`): one line per certified result, rolling figures, a summary.

Matches each `CertifiedClassification` with the simulator's ground truth (by header stamp) and
prints: frame, true class, standard / robust / mixed prediction, mixed probability, certified
radius (model input, l2) and the safe flag. Every `summary_every` results it prints rolling
accuracies and the safe rate. It changes `alpha` of the classifier node live through the
SetParameters service (what `ros2 param set` does): on a schedule (`alpha_schedule`, e.g.
"0:0.6,20:0.3,40:0.8" = from result 0 use 0.6, from result 20 use 0.3 ...) and, on a terminal,
with the keys + and - (steps of 0.1).
"""

from __future__ import annotations

import json
import os
import select
import sys
import termios
import threading
import tty
from collections import deque
from dataclasses import dataclass, field

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from std_msgs.msg import String

from mixclf_ros.data import FASHION_MNIST_CLASSES
from mixclf_ros.interrupts import ignore_repeated_interrupts
from mixclf_ros.msg import CertifiedClassification


def parse_schedule(text: str) -> list[tuple[int, float]]:
    """'0:0.6,20:0.3' -> [(0, 0.6), (20, 0.3)], sorted by result index."""
    schedule = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        index, alpha = item.split(":")
        schedule.append((int(index), float(alpha)))
    return sorted(schedule)


@dataclass
class Tally:
    """Counts over the results that have a ground truth."""

    results: int = 0
    ok: int = 0
    correct: dict[str, int] = field(default_factory=lambda: {"standard": 0, "robust": 0, "mixed": 0})
    safe: int = 0
    safe_and_wrong: int = 0

    def add(self, result: CertifiedClassification, label: int) -> None:
        self.results += 1
        if result.status != CertifiedClassification.STATUS_OK:
            return
        self.ok += 1
        self.correct["standard"] += int(result.standard_class_id == label)
        self.correct["robust"] += int(result.robust_class_id == label)
        self.correct["mixed"] += int(result.class_id == label)
        self.safe += int(result.safe)
        self.safe_and_wrong += int(result.safe and result.class_id != label)

    def line(self) -> str:
        if not self.results:
            return "no results"
        accuracy = {name: f"{100 * count / self.results:5.1f}%" for name, count in self.correct.items()}
        return (f"n={self.results}  accuracy standard {accuracy['standard']}  robust {accuracy['robust']}  "
                f"mixed {accuracy['mixed']}  safe {100 * self.safe / self.results:5.1f}%  "
                f"safe-but-wrong {self.safe_and_wrong}")

    def as_dict(self) -> dict:
        return {"results": self.results, "ok": self.ok, "correct": dict(self.correct), "safe": self.safe,
                "safe_and_wrong": self.safe_and_wrong}


STATUS_NAMES = {getattr(CertifiedClassification, name): name[len("STATUS_"):]
                for name in dir(CertifiedClassification) if name.startswith("STATUS_")}


class Monitor(Node):
    def __init__(self):
        super().__init__("mixclf_monitor")
        self.frames = self.declare_parameter("frames", 0).value
        self.target = self.declare_parameter("target_node", "mixclf").value
        self.schedule = parse_schedule(self.declare_parameter("alpha_schedule", "").value)
        self.summary_every = self.declare_parameter("summary_every", 10).value
        self.summary_file = self.declare_parameter("summary_file", "").value
        self.truth: dict[tuple[int, int], dict] = {}
        self.pending: deque = deque()
        self.total = Tally()
        self.rolling: deque = deque(maxlen=20)
        self.by_alpha: dict[float, Tally] = {}
        self.records: list[dict] = []
        self.alpha_requested: float | None = None
        self.results_received = 0
        self.parameters = AsyncParameterClient(self, self.target)
        if not self.parameters.wait_for_services(timeout_sec=15.0):
            self.get_logger().warning(f"parameter services of /{self.target} not found: alpha cannot be changed")
        self.create_subscription(String, "ground_truth", self._on_truth, 100)
        self.create_subscription(CertifiedClassification, "certified_classification", self._on_result, 100)
        self.names = FASHION_MNIST_CLASSES
        print(f"{'frame':>5} {'truth':<11} {'standard':<11} {'robust':<11} {'mixed':<11} "
              f"{'prob':>5} {'alpha':>5} {'radius':>7} {'safe':<5} status", flush=True)

    @property
    def done(self) -> bool:
        return 0 < self.frames <= self.total.results

    def set_alpha(self, alpha: float) -> None:
        alpha = min(1.0, max(0.0, round(alpha, 3)))
        self.alpha_requested = alpha
        self.parameters.set_parameters([Parameter("alpha", value=alpha)]).add_done_callback(
            lambda future: print(f"      -- alpha -> {alpha}: "
                                 f"{'accepted' if future.result().results[0].successful else 'REJECTED'}",
                                 flush=True))

    def _on_truth(self, message: String) -> None:
        truth = json.loads(message.data)
        self.truth[(truth["sec"], truth["nanosec"])] = truth
        self._drain()

    def _on_result(self, message: CertifiedClassification) -> None:
        if message.header.frame_id.startswith("probe"):
            return  # readiness probes have no ground truth
        # the schedule counts results as they arrive: matching them with the ground truth can lag
        # (a reliable message recovered late), and the change must not lag with it
        for index, alpha in self.schedule:
            if index == self.results_received and alpha != self.alpha_requested:
                self.set_alpha(alpha)
        self.results_received += 1
        self.pending.append(message)
        self._drain()

    def _name(self, class_id: int) -> str:
        return self.names[class_id] if 0 <= class_id < len(self.names) else "-"

    def _drain(self) -> None:
        while self.pending:
            result = self.pending[0]
            key = (result.header.stamp.sec, result.header.stamp.nanosec)
            if key not in self.truth:
                if len(self.pending) > 50:  # a result without ground truth (another publisher): skip it
                    self.pending.popleft()
                    continue
                return
            self.pending.popleft()
            self._record(result, self.truth.pop(key))

    def _record(self, result: CertifiedClassification, truth: dict) -> None:
        label = truth["label"]
        self.total.add(result, label)
        self.by_alpha.setdefault(round(result.alpha, 3), Tally()).add(result, label)
        self.rolling.append((result, label))
        self.records.append({"index": truth["index"], "label": label, "status": result.status,
                             "standard": result.standard_class_id, "robust": result.robust_class_id,
                             "mixed": result.class_id, "alpha": result.alpha, "safe": result.safe,
                             "certified_radius": result.certified_radius})
        status = STATUS_NAMES.get(result.status, str(result.status))
        mark = lambda class_id: ("" if class_id == label else "✗") + self._name(class_id)  # noqa: E731
        print(f"{self.total.results:>5} {self._name(label):<11} {mark(result.standard_class_id):<11} "
              f"{mark(result.robust_class_id):<11} {mark(result.class_id):<11} {result.probability:5.2f} "
              f"{result.alpha:5.2f} {result.certified_radius:7.3f} {'SAFE' if result.safe else '-':<5} "
              f"{status}", flush=True)
        if self.total.results % self.summary_every == 0:
            rolling = Tally()
            for past, past_label in self.rolling:
                rolling.add(past, past_label)
            print(f"      -- last {len(self.rolling)}: {rolling.line()}", flush=True)

    def summary(self) -> str:
        lines = ["", "== summary", f"all: {self.total.line()}"]
        for alpha, tally in sorted(self.by_alpha.items()):
            lines.append(f"alpha {alpha:.2f}: {tally.line()}")
        return "\n".join(lines)

    def write_summary(self) -> None:
        if self.summary_file:
            with open(self.summary_file, "w") as handle:
                json.dump({"total": self.total.as_dict(),
                           "by_alpha": {str(a): t.as_dict() for a, t in self.by_alpha.items()},
                           "records": self.records}, handle, indent=1)


def _keyboard(monitor: Monitor, stop: threading.Event) -> None:
    """+ / - change alpha by 0.1 while the monitor runs on a terminal."""
    if not sys.stdin.isatty():
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        while not stop.is_set():
            if select.select([sys.stdin], [], [], 0.2)[0]:
                key = os.read(fd, 1).decode(errors="ignore")
                current = monitor.alpha_requested if monitor.alpha_requested is not None else 0.6
                if key in "+=":
                    monitor.set_alpha(current + 0.1)
                elif key in "-_":
                    monitor.set_alpha(current - 0.1)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(args: list[str] | None = None) -> int:
    ignore_repeated_interrupts()  # before rclpy.init, whose handler chains to it
    rclpy.init(args=args)
    monitor = None
    stop = threading.Event()
    try:
        monitor = Monitor()
        threading.Thread(target=_keyboard, args=(monitor, stop), daemon=True).start()
        while rclpy.ok() and not monitor.done:
            rclpy.spin_once(monitor, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop.set()
        if monitor is not None:
            print(monitor.summary(), flush=True)
            monitor.write_summary()
            monitor.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
