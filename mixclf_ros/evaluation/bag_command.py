"""`mixclf-eval bag PATH --topic TOPIC --params FILE`: a robot's own recording through the node's own path,
per alpha, to choose alpha and the thresholds on the robot's camera.

The frames stream: the recording is cut into shards of consecutive frames (`--shard-size`, default
`BAG_SHARD_SIZE`), each shard one work unit (`bag_units.bag_unit`) run in this process or on Ray (`--ray`;
workers read the recording from the same path), and the shards' rows are written and counted as they
finish, in recording order; memory holds a few shards' rows, never the recording.

Outputs under `--out`: `<stem>.csv` and `<stem>_frames.jsonl` (one row per frame and alpha: stamp, class,
radii, safe, for audit; the JSON lines carry floats exactly), `<stem>_summary.csv` and `<stem>.json` (per
alpha, `bag_summary`), `<stem>.png` (safe rate vs alpha, radius distribution), and with
`--write-results OUT` a rosbag2 recording with the frames' topic and the `CertifiedClassification`
messages the node would have published (`bag_results`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mixclf_ros.evaluation.bag_reader import open_topic, plan_shards, recording_identity
from mixclf_ros.evaluation.bag_summary import AlphaSummary, read_labels, summary_row
from mixclf_ros.evaluation.bag_units import RESULT_FIELDS, shard_units
from mixclf_ros.evaluation.params_file import node_settings_from_parameters
from mixclf_ros.evaluation.report import format_table, json_ready, write_csv, write_json
from mixclf_ros.evaluation.settings import EvaluationError
from mixclf_ros.evaluation.units import ModelSet, execute
from mixclf_ros.runtime.result_fields import class_name

BAG_SHARD_SIZE = 256
"""Frames per work unit of `mixclf-eval bag` (its `--shard-size` default): bounds the rows in memory."""

ROW_COLUMNS = tuple(dict.fromkeys(("alpha", "index", "log_time_ns", "stamp", "frame_id", "label", "refused",
                                    "class_name", *RESULT_FIELDS)))


def add_bag_arguments(parser: argparse.ArgumentParser, parse_alphas: Any, default_alphas: list[float]) -> None:
    parser.add_argument("path", metavar="PATH", help="rosbag2 recording: its folder, or its .db3 / .mcap file")
    parser.add_argument("--topic", required=True, help="camera topic: sensor_msgs/Image or CompressedImage")
    parser.add_argument("--alphas", type=parse_alphas, default=default_alphas,
                        help="comma-separated weights of h in [0, 1] (below 1/2 nothing is certified)")
    parser.add_argument("--labels", metavar="CSV",
                        help="ground truth: a header 'index,class' (frame index from 0) or 'stamp,class' (header "
                        "stamp, seconds or ns), then one frame a line; adds accuracy and safe-but-wrong")
    parser.add_argument("--write-results", metavar="OUT",
                        help="write a rosbag2 recording (new folder) with the frames and the node's results")
    parser.set_defaults(shard_size=BAG_SHARD_SIZE)


def _stamp(sec: int, nanosec: int) -> str:
    return f"{sec}.{nanosec:09d}"


def frame_rows(result: dict[str, Any], alphas: tuple[float, ...], class_names: list[str]) -> list[list[dict[str, Any]]]:
    """Per frame of a unit's result, one row per alpha (`ROW_COLUMNS` without the label)."""
    frames, rows = result["frames"], []
    for position in range(len(frames["index"])):
        common = {"index": frames["index"][position], "log_time_ns": frames["log_time_ns"][position],
                  "stamp": _stamp(frames["stamp_sec"][position], frames["stamp_nanosec"][position]),
                  "stamp_ns": frames["stamp_sec"][position] * 10**9 + frames["stamp_nanosec"][position],
                  "frame_id": frames["frame_id"][position], "refused": frames["refused"][position]}
        rows.append([{**common, **{name: result["results"][a][name][position] for name in RESULT_FIELDS},
                      "alpha": alpha,  # also for a refused frame, which has no result
                      "class_name": _name(result["results"][a]["class_id"][position], class_names),
                      "inference_ms": result["inference_ms"][a][position]}
                     for a, alpha in enumerate(alphas)])
    return rows


def _name(class_id: int | None, class_names: list[str]) -> str:
    return "" if class_id is None else class_name(class_id, class_names)


class _RowFiles:
    """`<stem>.csv` and `<stem>_frames.jsonl`, written row by row."""

    def __init__(self, out: Path, stem: str, labels: bool):
        import csv

        self.columns = [c for c in ROW_COLUMNS if labels or c != "label"]
        self.csv_handle = (out / f"{stem}.csv").open("w", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.csv_handle, fieldnames=self.columns, extrasaction="ignore")
        self.csv.writeheader()
        self.jsonl = (out / f"{stem}_frames.jsonl").open("w", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.csv.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value)
                           for key, value in row.items()})
        self.jsonl.write(json.dumps(json_ready({key: row.get(key) for key in self.columns}), allow_nan=False)
                         + "\n")

    def close(self) -> None:
        self.csv_handle.close()
        self.jsonl.close()


def command_bag(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    """Runs `mixclf-eval bag` (see the module docstring); `data` is unused (the frames are the recording's)."""
    info = open_topic(args.path, args.topic)
    node = node_settings_from_parameters(args.params)
    class_names = list(getattr(pair.robust, "class_names", []) or [])
    labels = read_labels(args.labels, class_names) if args.labels else None
    alphas = tuple(args.alphas)
    execution = runtime.execution
    shards = plan_shards(info, execution.shard_size if execution is not None else BAG_SHARD_SIZE)
    params = {"alphas": alphas, "settings": node.live, "input_kind": node.input_kind,
              "standard_precision": node.standard_precision, "certificate_precision": node.certificate_precision,
              "seed": node.seed if node.seed >= 0 else None}
    units = shard_units(info, shards, params, recording_identity(info.path))
    header = {**header, "recording": {"path": str(info.path), "topic": info.topic, "type": info.msgtype,
                                      "storage": info.storage, "messages": info.count, "shards": len(shards)},
              "node_settings": {"alpha_configured": node.live.alpha, "safe_radius": node.live.safe_radius,
                                "safe_image_radius": node.live.safe_image_radius,
                                "confidence": node.live.confidence, "input_kind": node.input_kind,
                                "standard_precision": node.standard_precision,
                                "certificate_precision": node.certificate_precision,
                                "smoothing_seed": node.seed if node.seed >= 0 else "per unit, from --seed"},
              "path": "vision.decode.decode_frame -> runtime.classifier.CertifiedClassifier, one frame per call"}
    summaries = [AlphaSummary(alpha) for alpha in alphas]
    writer = None
    if args.write_results:
        from mixclf_ros.evaluation.bag_results import ResultsWriter

        writer = ResultsWriter(Path(args.write_results), info, alphas, class_names)
    files = _RowFiles(out, stem, labels is not None)
    models = ModelSet(pair.standard, pair.robust)
    quiet = replace(runtime, progress=False)
    group = 1 if execution is None or execution.backend is None else 16
    forward_errors: set[str] = set()
    started = time.perf_counter()
    bar = tqdm(total=info.count, desc="bag frames", unit="frame", disable=not runtime.progress)
    try:
        for first in range(0, len(units), group):
            chunk = units[first:first + group]
            results = execute(chunk, models, quiet, "bag")
            for unit in chunk:
                result = results[unit.key]
                forward_errors.add(str(result.get("forward_error", "")))
                for rows in frame_rows(result, alphas, class_names):
                    label = labels.label(rows[0]["index"], rows[0]["stamp_ns"]) if labels else None
                    for summary, row in zip(summaries, rows):
                        row["label"] = label
                        summary.add(row, label)
                        files.write(row)
                    if writer is not None:
                        writer.add(rows)
                for summary, seconds in zip(summaries, result["classify_seconds"]):
                    summary.seconds += seconds + result["decode_seconds"]
                bar.update(int(unit.labels.shape[0]))
                del results[unit.key]
    finally:
        bar.close()
        files.close()
        if writer is not None:
            writer.close()
    wall = time.perf_counter() - started
    reports = [summary.report(class_names, labels is not None) for summary in summaries]
    write_csv(out / f"{stem}_summary.csv", [summary_row(report) for report in reports])
    write_json(out / f"{stem}.json", {**header, "wall_seconds": wall, "frames_per_second_wall":
                                      info.count / wall if wall > 0 else None,
                                      "frame_rows": [f"{stem}.csv", f"{stem}_frames.jsonl"],
                                      "results_recording": args.write_results,
                                      "rounding_error": sorted(forward_errors), "alphas": reports})
    from mixclf_ros.evaluation.plots import plot_bag

    plot_bag(reports, out / f"{stem}.png", f"{info.path.name} {info.topic} (g={pair.standard_label}, "
             f"h={pair.robust_label})", node.live)
    _print_summary(info, reports, labels is not None, node.live)
    for forward_error in sorted(forward_errors):
        if forward_error.startswith("estimated"):
            print(f"mixclf-eval: warning: {ROUNDING_ESTIMATES[forward_error]}", file=sys.stderr)


ROUNDING_ESTIMATES = {
    "estimated": "the robust model's rounding error is estimated, not bounded (forward_error = estimated: it has "
                 "layers the error-bounded forward cannot bound, so the float32/float64 disagreement times a safety "
                 "factor is subtracted): its certified radii rest on an estimate, not a proof",
    "estimated-float32": "the robust model's rounding error is estimated, not bounded (forward_error = "
                         "estimated-float32: it does not run in float64, so a fixed float32 error is subtracted): "
                         "its certified radii rest on an estimate, not a proof",
}
"""What the console says of a robust model whose forward error `CertifiedClassifier` only estimates."""


def _print_summary(info, reports: list[dict[str, Any]], labels: bool, live) -> None:
    print(f"{info.path} {info.topic} ({info.msgtype}, {info.storage}): {info.count} messages; "
          f"safe needs certified_radius >= {live.safe_radius:.4g} and image_radius >= {live.safe_image_radius:.4g}")
    headers = ["alpha", "read", "refused", "safe rate", "r median", "image r median", "g!=h", "follows h", "fps"]
    rows = [[r["alpha"], r["frames_read"], r["frames_refused"], _number(r["safe_rate"]),
             _number(r["certified_radius"]["q50"]), _number(r["image_radius"]["q50"]),
             _number(r["disagreement_rate"]), _number(r["follows_h_when_disagreeing"]),
             _number(r["frames_per_second"])] for r in reports]
    if labels:
        headers += ["accuracy", "safe but wrong"]
        for row, report in zip(rows, reports):
            row += [_number(report["accuracy"]), report["safe_but_wrong"]]
    print(format_table(headers, rows))
    refused = reports[0]["refused_by_reason"] if reports else {}
    for reason, count in refused.items():
        print(f"mixclf-eval: warning: {count} frame(s) refused: {reason}", file=sys.stderr)


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def check_output_free(args: argparse.Namespace) -> None:
    """`--write-results` writes a new recording: refuse an existing folder before any work."""
    if args.write_results and Path(args.write_results).exists():
        raise EvaluationError(f"--write-results {args.write_results}: exists already (a new folder is written)")
