"""What `mixclf-eval bag` reports per alpha, accumulated shard by shard as the frames stream by: frames read
and refused by reason, the safe rate at the configured thresholds, quantiles of the radii, the mixture's
class histogram, how often g and h disagree and whom the mixture follows, frames per second, and with
labels accuracy and safe-but-wrong.

Memory: counters, plus the radii of classified frames (two float32 per frame and alpha) for exact
quantiles; never frames.
"""

from __future__ import annotations

import csv
from array import array
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from mixclf_ros.evaluation.settings import EvaluationError
from mixclf_ros.runtime.frame_result import Status

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
MAX_REASONS = 20
"""Distinct refusal reasons listed; the rest are counted under 'other'."""


@dataclass
class FrameLabels:
    """Ground-truth classes from a CSV: by frame index (0-based, log-time order) or by header stamp
    (ns); the first column's header says which ('index' or 'stamp')."""

    by: str
    classes: dict[int, int]

    def label(self, index: int, stamp_ns: int) -> int | None:
        return self.classes.get(index if self.by == "index" else stamp_ns)


def _stamp_ns(text: str) -> int:
    """'1712345678.000000123' (seconds) or '1712345678000000123' (ns) -> ns, exactly."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation as error:
        raise ValueError(f"not a stamp: {text!r}") from error
    return int(value * 10**9) if "." in text else int(value)


def read_labels(path: str | Path, class_names: list[str]) -> FrameLabels:
    """`--labels CSV`: a header line `index,class` or `stamp,class`, then one frame a line; the class an
    index of the model or one of its class names; stamps in seconds (decimal) or integer nanoseconds."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except OSError as error:
        raise EvaluationError(f"--labels {path}: {error}") from error
    if not rows or len(rows[0]) < 2 or rows[0][0].strip().lower() not in ("index", "stamp"):
        raise EvaluationError(f"--labels {path}: the first line must be 'index,class' or 'stamp,class'")
    by = rows[0][0].strip().lower()
    classes: dict[int, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        try:
            key = int(row[0]) if by == "index" else _stamp_ns(row[0])
            name = row[1].strip()
            label = class_names.index(name) if name in class_names else int(name)
        except (ValueError, IndexError) as error:
            raise EvaluationError(f"--labels {path}:{number}: {error} (a class index or name expected: "
                                  f"{', '.join(class_names)})") from error
        classes[key] = label
    return FrameLabels(by, classes)


@dataclass
class AlphaSummary:
    """The counters of one alpha."""

    alpha: float
    frames: int = 0
    refused: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    safe: int = 0
    classes: Counter = field(default_factory=Counter)
    disagree: int = 0
    follows_g: int = 0
    follows_h: int = 0
    labelled: int = 0
    correct: int = 0
    safe_labelled: int = 0
    safe_but_wrong: int = 0
    seconds: float = 0.0
    certified_radii: array = field(default_factory=lambda: array("f"))
    image_radii: array = field(default_factory=lambda: array("f"))

    def add(self, row: dict[str, Any], label: int | None) -> None:
        """One frame's row (`bag_command.frame_rows`)."""
        self.frames += 1
        if row["refused"]:
            self.refused[row["refused"] if len(self.refused) < MAX_REASONS or row["refused"] in self.refused
                         else "other"] += 1
            return
        status = Status(row["status"])
        self.statuses[status.name] += 1
        if status != Status.OK:
            reason = f"{status.name}: {row['status_message']}"
            self.refused[reason if len(self.refused) < MAX_REASONS or reason in self.refused else "other"] += 1
            return
        self.safe += bool(row["safe"])
        self.classes[row["class_id"]] += 1
        g, h, mixed = row["standard_class_id"], row["robust_class_id"], row["class_id"]
        if g != h:
            self.disagree += 1
            self.follows_g += mixed == g
            self.follows_h += mixed == h
        self.certified_radii.append(row["certified_radius"])
        self.image_radii.append(row["image_radius"])
        if label is not None:
            self.labelled += 1
            self.correct += mixed == label
            if row["safe"]:
                self.safe_labelled += 1
                self.safe_but_wrong += mixed != label

    def report(self, class_names: list[str], labels: bool) -> dict[str, Any]:
        """JSON-ready: rates are fractions in [0, 1] (None when undefined); radii in [0,1] pixels,
        certified at the model input, image in the source frame."""
        classified = self.statuses.get("OK", 0)

        def rate(part: int, whole: int) -> float | None:
            return part / whole if whole else None

        def quantiles(values: array) -> dict[str, float | None]:
            data = np.frombuffer(values, dtype=np.float32) if len(values) else None
            return {f"q{round(100 * q):02d}": (float(np.quantile(data, q, method="inverted_cdf"))
                                               if data is not None else None) for q in QUANTILES}

        report: dict[str, Any] = {
            "alpha": self.alpha, "frames_read": self.frames, "frames_classified": classified,
            "frames_refused": self.frames - classified, "refused_by_reason": dict(self.refused.most_common()),
            "safe_frames": self.safe, "safe_rate": rate(self.safe, self.frames),
            "safe_rate_of_classified": rate(self.safe, classified),
            "certified_radius": quantiles(self.certified_radii), "image_radius": quantiles(self.image_radii),
            "class_histogram": {(class_names[c] if 0 <= c < len(class_names) else str(c)): n
                                for c, n in sorted(self.classes.items())},
            "disagreement_rate": rate(self.disagree, classified),
            "follows_g_when_disagreeing": rate(self.follows_g, self.disagree),
            "follows_h_when_disagreeing": rate(self.follows_h, self.disagree),
            "frames_per_second": rate(self.frames, self.seconds) if self.seconds > 0 else None,
        }
        if labels:
            report.update(labelled_frames=self.labelled, accuracy=rate(self.correct, self.labelled),
                          safe_but_wrong=self.safe_but_wrong, safe_but_wrong_rate=rate(self.safe_but_wrong,
                                                                                       self.labelled),
                          wrong_among_safe=rate(self.safe_but_wrong, self.safe_labelled))
        return report


def summary_row(report: dict[str, Any]) -> dict[str, Any]:
    """The flat CSV / table row of one alpha's report."""
    row = {key: value for key, value in report.items() if not isinstance(value, dict)}
    for radius in ("certified_radius", "image_radius"):
        row.update({f"{radius}_{name}": value for name, value in report[radius].items()})
    return row
