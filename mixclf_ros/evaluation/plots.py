"""PNG plots of the experiments (matplotlib, Agg backend): paper Figs. 1, 2, 3 and Table I."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from mixclf_ros.evaluation.certification import CertifyResult
from mixclf_ros.evaluation.margins import MARGIN_COLUMNS
from mixclf_ros.evaluation.sweep import SweepResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path)
    _pyplot().close(figure)


def plot_sweep(result: SweepResult, path: Path, title: str) -> None:
    """Paper Fig. 2: accuracy of the mixture vs alpha, clean and under STD / ROB / MIX attacks."""
    plt = _pyplot()
    alphas = [row["alpha"] for row in result.rows]
    figure, axes = plt.subplots(figsize=(6.0, 4.0), dpi=110)
    series = [("clean_accuracy", f"clean ({result.num_attacked} attacked images)", "k", "-")]
    if result.num_clean != result.num_attacked:
        series.append(("clean_accuracy_all", f"clean (all {result.num_clean} images)", "grey", ":"))
    series += [("std_accuracy", "STD attack", "tab:blue", "--"),
              ("rob_accuracy", "ROB attack", "tab:orange", "--"), ("mix_pgd_accuracy", "MIX attack (PGD)",
                                                                   "tab:red", "-")]
    if result.autoattack:
        series.append(("mix_worst_accuracy", "MIX worst case (PGD+APGD-CE/T+Square)", "tab:purple", ":"))
    series.append(("worst_accuracy", "worst case over all attacks", "tab:green", "-"))
    for key, label, color, style in series:
        points = [(alpha, row[key]) for alpha, row in zip(alphas, result.rows) if not math.isnan(row[key])]
        axes.plot([p[0] for p in points], [p[1] for p in points], style, color=color, marker="o", markersize=3,
                  label=label)
    axes.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("alpha (weight of the robust model h)")
    axes.set_ylabel("accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    _save(figure, path)


def plot_margins(table: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Table I as grouped bars: mean probability gap per cell, for g and h."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    width = 0.38
    positions = range(len(MARGIN_COLUMNS))
    for offset, row in zip((-width / 2, width / 2), table):
        values = [row[column] for column in MARGIN_COLUMNS]
        bars = axes.bar([p + offset for p in positions], [0.0 if math.isnan(v) else v for v in values], width,
                        label=row["model"])
        axes.bar_label(bars, labels=["none" if math.isnan(v) else f"{v:.3f}" for v in values], fontsize=7)
    axes.set_xticks(list(positions), [column.replace("_", "\n") for column in MARGIN_COLUMNS], fontsize=8)
    axes.set_ylabel("mean top-1 minus top-2 probability")
    axes.set_ylim(0.0, 1.1)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    _save(figure, path)


def plot_certify(result: CertifyResult, path: Path, title: str) -> None:
    """Paper Fig. 3: certified accuracy vs radius, one panel per theorem; empty circles at radius 0
    mark the clean accuracy (the curve is discontinuous there)."""
    plt = _pyplot()
    theorems = sorted({curve["theorem"] for curve in result.curves})
    figure, axes_list = plt.subplots(1, len(theorems), figsize=(5.2 * len(theorems), 4.0), dpi=110,
                                     squeeze=False)
    names = {"theorem1": "Theorem 1 (Lipschitz)", "theorem2": "Theorem 2 (randomized smoothing)"}
    colormap = plt.get_cmap("viridis")
    mixture_alphas = sorted({curve["alpha"] for curve in result.curves if curve["model"] == "mixture"})
    for axes, theorem in zip(axes_list[0], theorems):
        for curve in (c for c in result.curves if c["theorem"] == theorem):
            if curve["model"] == "mixture":
                position = mixture_alphas.index(curve["alpha"]) / max(len(mixture_alphas) - 1, 1)
                color, style, label = colormap(0.9 * position), "-", f"mixture alpha={curve['alpha']:g}"
            elif curve["model"] == "mixture_matched":
                color, style = "tab:red", "-."
                label = f"mixture alpha={curve['alpha']:g} (clean acc. of baseline)"
            else:
                color, style, label = "black", "--", f"baseline: {result.baseline.get('label', '')}"
            axes.plot(result.radii, curve["accuracy"], style, color=color, linewidth=1.4, label=label)
            axes.plot([0.0], [curve["clean_accuracy"]], "o", markerfacecolor="none", color=color, markersize=5)
        axes.set_xlabel(f"{result.norm} radius ([0,1] pixels)")
        axes.set_ylabel("certified accuracy")
        axes.set_ylim(0.0, 1.0)
        axes.set_title(f"{title}\n{names.get(theorem, theorem)}", fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6.5)
    _save(figure, path)


def plot_design(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Paper Fig. 1: attacked vs clean accuracy, one curve (over gamma) per R_i(x) and space."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.0, 4.4), dpi=110)
    names = {"one": "R=1", "grad_g_i": "R=||grad g_i||", "grad_max_g": "R=||grad max_j g_j||",
             "grad_g_i_grad_h_i": "R=||grad g_i|| ||grad h_i||"}
    keys = list(dict.fromkeys((row["trust"], row["space"]) for row in rows))
    colors = plt.get_cmap("tab10")
    trusts = list(dict.fromkeys(trust for trust, _ in keys))
    for trust, space in keys:
        points = sorted((row["gamma"], row["clean_accuracy"], row["attacked_accuracy"]) for row in rows
                        if row["trust"] == trust and row["space"] == space)
        probabilities = space == "probabilities"
        axes.plot([p[1] for p in points], [p[2] for p in points], "-" if probabilities else "--",
                  marker="o" if probabilities else "s", markersize=3.5, linewidth=1.4,
                  color=colors(trusts.index(trust)),
                  label=f"{names.get(trust, trust)}, {'softmax' if probabilities else 'logits'}")
    axes.set_xlabel("clean accuracy")
    axes.set_ylabel("PGD-attacked accuracy")
    axes.set_title(title + "\n(each curve: gamma from 0 to large; up and right is better)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, handlelength=3.5)
    _save(figure, path)


def plot_bag(reports: Sequence[dict[str, Any]], path: Path, title: str, live: Any) -> None:
    """`mixclf-eval bag`: the safe rate vs alpha (left) and the distribution of the classified frames'
    radii per alpha (right: quantiles 5-95 % as bars, median as a dot, model input and source image)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=110)
    alphas = [report["alpha"] for report in reports]
    for key, label, style in (("safe_rate", "safe rate (all frames read)", "-"),
                              ("safe_rate_of_classified", "safe rate (classified frames)", "--")):
        points = [(a, r[key]) for a, r in zip(alphas, reports) if r[key] is not None]
        left.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=label)
    left.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    left.set_xlabel("alpha (weight of the robust model h)")
    left.set_ylabel("fraction of frames with safe = true")
    left.set_ylim(0.0, 1.0)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    left.set_title(f"{title}\nsafe_radius={live.safe_radius:.4g}, safe_image_radius={live.safe_image_radius:.4g}",
                   fontsize=8)
    steps = [b - a for a, b in pairwise(sorted(set(alphas)))]
    width = 0.4 * min(steps) if steps else 0.04
    for offset, key, color in ((-width / 2, "certified_radius", "tab:blue"), (width / 2, "image_radius", "tab:orange")):
        rows = [(a, r[key]) for a, r in zip(alphas, reports) if r[key]["q50"] is not None]
        for number, (alpha, quantiles) in enumerate(rows):
            right.vlines(alpha + offset, quantiles["q05"], quantiles["q95"], color=color, linewidth=4, alpha=0.5,
                         label=(key.replace("_", " ") + " (5-95 %, median)") if number == 0 else None)
            right.plot([alpha + offset], [quantiles["q50"]], "o", color=color, markersize=3)
    right.axhline(live.safe_radius, color="tab:blue", linewidth=0.8, linestyle=":")
    right.axhline(live.safe_image_radius, color="tab:orange", linewidth=0.8, linestyle="--")
    right.set_xlabel("alpha")
    right.set_ylabel("radius ([0,1] pixels, certificate norm)")
    right.set_title("radii of the classified frames (dotted/dashed: thresholds)", fontsize=8)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    _save(figure, path)
