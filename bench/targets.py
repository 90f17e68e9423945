"""The speed targets of `make bench`, each read off one run's report and printed as met or missed.

Every target compares figures measured side by side in the same run (this machine is shared and
noisy); a target whose section did not run in this report is listed as "not run".
"""

from __future__ import annotations

import math

OVERHEAD_TARGET = 1.15
"""node p50 / (relay p50 + bare forward passes of both models under the node's thread settings)"""
NAIVE_LATENCY_TARGET = 1.2
"""naive node p50 / our p50, 30 Hz input"""
TAIL_TARGET = 2.0
"""our p99 / our p50, 30 Hz input"""
CAMERA_COUNTS = (2, 4, 8)
"""one node batching N cameras >= N separate nodes, results/s"""
EIGHT_CAMERA_RATE_TARGET = 200.0
"""certified results/s of one node with 8 cameras at 30 Hz each"""
RADIUS_LOSS_TARGET = 1e-3
"""relative radius the cheap rounding-error bound gives up against the componentwise one, median, zoo"""
CONFIGURE_TARGET = 10.0
"""seconds to build resnet18's bound at 224, cold and on a restart (norms on disk)"""
SMOOTHING_TARGET = 0.9
"""noisy samples/s of certification at n = 1,000 over the bare batched forward pass's samples/s"""


def _target(name: str, value: float, target: str, met: bool | None, detail: str = "") -> dict:
    return {"target": name, "value": value, "goal": target,
            "status": "not run" if met is None else ("met" if met else "missed"), "detail": detail}


def evaluate(report: dict) -> list[dict]:
    """One row per target: target, value, goal, status ("met", "missed", "not run"), detail."""
    rows = []
    naive = report.get("naive") or {}
    ours, theirs = naive.get("mixclf_node"), naive.get("naive_node")
    if ours and theirs:
        ratio = theirs["latency_ms"]["p50"] / ours["latency_ms"]["p50"]
        rows.append(_target("naive/ours latency p50 at 30 Hz", ratio, f">= {NAIVE_LATENCY_TARGET}",
                            ratio >= NAIVE_LATENCY_TARGET,
                            f"naive {theirs['latency_ms']['p50']:.1f} ms, ours {ours['latency_ms']['p50']:.1f} ms"))
        answered = ours["received"] / max(ours["sent"], 1)
        rows.append(_target("every frame answered at 30 Hz", answered, "1.00 (all)", ours["received"] == ours["sent"],
                            f"{ours['received']} / {ours['sent']} (naive {theirs['received']} / {theirs['sent']})"))
        tail = ours["latency_ms"]["p99"] / ours["latency_ms"]["p50"]
        rows.append(_target("our p99 / p50 at 30 Hz", tail, f"<= {TAIL_TARGET}", tail <= TAIL_TARGET,
                            f"p99 {ours['latency_ms']['p99']:.1f} ms, p50 {ours['latency_ms']['p50']:.1f} ms"))
    else:
        for name in ("naive/ours latency p50 at 30 Hz", "every frame answered at 30 Hz", "our p99 / p50 at 30 Hz"):
            rows.append(_target(name, math.nan, "", None))
    latency = report.get("latency") or {}
    for key, label in (("demo_models_640x480_rgb8", "overhead p50, demo models"),
                       ("resnet18_224_640x480_rgb8", "overhead p50, resnet18 at 224")):
        entry = latency.get(key)
        if entry:
            ratio = entry["overhead_ratio_p50"]
            threads = entry.get("node_torch_threads", "?")
            rows.append(_target(label, ratio, f"<= {OVERHEAD_TARGET}", ratio <= OVERHEAD_TARGET,
                                f"node {entry['node_latency_ms']['p50']:.1f} ms, relay "
                                f"{entry['relay_latency_ms']['p50']:.1f} ms, forward "
                                f"{entry['bare_forward_both_models_ms']:.1f} ms at {threads} thread(s)"))
        else:
            rows.append(_target(label, math.nan, f"<= {OVERHEAD_TARGET}", None, latency.get(f"{key}_error", "")))
    cameras = report.get("cameras") or {}
    for count in CAMERA_COUNTS:
        entry = cameras.get(str(count))
        label = f"one node >= {count} nodes, results/s"
        if entry:
            ratio = entry["ratio_one_node_over_separate"]
            rows.append(_target(label, ratio, ">= 1.00", ratio >= 1.0,
                                f"{entry['one_node']['results_per_s']:.1f} against "
                                f"{entry['separate_nodes']['results_per_s']:.1f}"))
        else:
            rows.append(_target(label, math.nan, ">= 1.00", None))
    entry = cameras.get("8")
    if entry:
        rate = entry["one_node"]["results_per_s"]
        rows.append(_target("certified results/s, 8 cameras at 30 Hz", rate, f">= {EIGHT_CAMERA_RATE_TARGET:.0f}",
                            rate >= EIGHT_CAMERA_RATE_TARGET, f"of {8 * 30} sent per second"))
    else:
        rows.append(_target("certified results/s, 8 cameras at 30 Hz", math.nan,
                            f">= {EIGHT_CAMERA_RATE_TARGET:.0f}", None))
    smoothing = report.get("smoothing") or {}
    if smoothing:
        frames = smoothing["certified_frames_per_s_n1000"]
        bare_frames = smoothing["bare_forward_samples_per_s"] / 1000.0
        ratio = smoothing["smoothing_over_bare_ratio"]
        rows.append(_target("smoothing n = 1,000: samples/s over the bare batched forward", ratio,
                            f">= {SMOOTHING_TARGET}", ratio >= SMOOTHING_TARGET,
                            f"{frames:.2f} certified frames/s; the bare forward pass does "
                            f"{smoothing['bare_forward_samples_per_s']:.0f} samples/s = {bare_frames:.2f} "
                            f"frames of 1,000"))
    else:
        rows.append(_target("smoothing n = 1,000: samples/s over the bare batched forward", math.nan,
                            f">= {SMOOTHING_TARGET}", None))
    rows += _onepass_rows(report.get("onepass") or {})
    return rows


def _onepass_rows(onepass: dict) -> list[dict]:
    loss = (onepass.get("zoo") or {}).get("radius_loss_relative")
    rows = [_target("radius given up by the cheap rounding bound, median, zoo", loss["median"] if loss else math.nan,
                    f"<= {RADIUS_LOSS_TARGET:g}", None if not loss else loss["median"] <= RADIUS_LOSS_TARGET,
                    f"median {loss['median']:.3g}, worst {loss['worst']:.3g} over {loss['certified']} certified images"
                    if loss else "")]
    route = (onepass.get("zoo") or {}).get("float32_route", {}).get("alpha_0.6")
    rows.append(_target("radius given up by the float32 rounding bound, median, zoo, alpha 0.6",
                        route["radius_loss_median"] if route else math.nan, f"<= {RADIUS_LOSS_TARGET:g}",
                        None if not route else route["radius_loss_median"] <= RADIUS_LOSS_TARGET,
                        f"worst {route['radius_loss_worst']:.3g} over {route['certified']} certified images; frames "
                        f"by route {route['frames_by_route']}" if route else ""))
    configure = (onepass.get("resnet18_224") or {}).get("configure") or {}
    for run in ("cold", "restart"):
        seconds = configure.get(f"{run}_s")
        rows.append(_target(f"configure resnet18 at 224 ({run}), s", math.nan if seconds is None else seconds,
                            f"<= {CONFIGURE_TARGET:g}", None if seconds is None else seconds <= CONFIGURE_TARGET))
    return rows


def table(rows: list[dict]) -> list[str]:
    """Markdown lines of the targets table."""
    lines = ["| target | value | goal | status | figures |", "|---|---|---|---|---|"]
    for row in rows:
        number = row["value"]
        value = "" if math.isnan(number) else (f"{number:.3g}" if 0 < number < 0.01 else
                                               f"{number:.3f}" if number < 10 else f"{number:.1f}")
        lines.append(f"| {row['target']} | {value} | {row['goal']} | **{row['status']}** | {row['detail']} |")
    return lines
