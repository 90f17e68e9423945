"""The five subcommands of `mixclf-eval`: each runs its experiment on the loaded models and data,
writes `<stem>.csv`, `.json` and `.png` under the output folder, and prints a compact table."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mixclf_ros.evaluation.bag_command import command_bag
from mixclf_ros.evaluation.certification import certify_mixture
from mixclf_ros.evaluation.datasets import EvaluationData, subset_indices
from mixclf_ros.evaluation.design_grid import design_comparison
from mixclf_ros.evaluation.margins import MARGIN_COLUMNS, margins_table
from mixclf_ros.evaluation.model_pair import ModelPair, describe_model, load_zoo_model
from mixclf_ros.evaluation.plots import plot_certify, plot_design, plot_margins, plot_sweep
from mixclf_ros.evaluation.report import format_table, json_ready, write_csv, write_json
from mixclf_ros.evaluation.settings import (
    DEFAULT_EPS,
    AutoAttackSettings,
    CertifySettings,
    DesignSettings,
    EvaluationError,
    PGDSettings,
    Runtime,
    SmoothingOverrides,
    SweepSettings,
)
from mixclf_ros.evaluation.sweep import run_sweep


def _attack_settings(args: argparse.Namespace, default_steps: int) -> PGDSettings:
    eps = args.eps if args.eps is not None else DEFAULT_EPS[args.norm]
    steps = args.steps if args.steps is not None else default_steps
    return PGDSettings(args.norm, eps, steps, args.step_size, args.restarts)


def run_header(args: argparse.Namespace, argv: Sequence[str], pair: ModelPair, data: EvaluationData | None,
               runtime: Runtime) -> dict[str, Any]:
    header = {
        "command": "mixclf-eval " + " ".join(argv),
        "arguments": {key: value for key, value in vars(args).items()},
        "device": str(runtime.device),
        "torch": torch.__version__,
        "seed": runtime.seed,
        "models": {"standard": describe_model(pair.standard, pair.standard_label),
                   "robust": describe_model(pair.robust, pair.robust_label)},
        "execution": runtime.execution,  # its report (units, per-worker throughput) is written at the end
    }
    if data is not None:  # bag: the recording, described by the command
        header["preprocessing"] = data.preprocessing
        header["data"] = {"source": data.source, "available": data.total_available,
                          "evaluated": int(data.labels.shape[0]),
                          "subset": "all" if data.labels.shape[0] == data.total_available
                          else f"seeded random subset (seed {runtime.seed})"}
        if data.warnings:
            header["data"]["warnings"] = data.warnings
    return header


def _command_sweep(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    attack = _attack_settings(args, 20)
    attacked = subset_indices(data.labels.shape[0], args.attack_limit, args.seed)
    autoattack = (AutoAttackSettings(args.autoattack_iterations, args.autoattack_targets,
                                     None if args.autoattack_alphas is None else tuple(args.autoattack_alphas))
                  if args.autoattack else None)
    settings = SweepSettings(tuple(args.alphas), attack, autoattack)
    result = run_sweep(pair.standard, pair.robust, data.images[attacked], data.labels[attacked], settings, runtime,
                       clean_images=data.images, clean_labels=data.labels)
    write_csv(out / f"{stem}.csv", result.rows)
    attacked_subset = ("all evaluated images" if attacked.numel() == data.labels.shape[0] else
                       f"data.evaluation_subset({attacked.numel()}, seed={args.seed}) of the evaluated images")
    write_json(out / f"{stem}.json", {**header, "attack": attack, "num_clean": result.num_clean,
                                      "num_attacked": result.num_attacked, "attacked_subset": attacked_subset,
                                      "reference": result.reference,
                                      "throughput_images_per_second": result.throughput, "rows": result.rows})
    title = f"g={pair.standard_label}, h={pair.robust_label}\n{attack.describe()}"
    plot_sweep(result, out / f"{stem}.png", title)
    columns = ["alpha", "clean_accuracy_all", "clean_accuracy", "std_accuracy", "rob_accuracy", "mix_pgd_accuracy"]
    if result.autoattack:
        columns.append("mix_worst_accuracy")
    columns.append("worst_accuracy")
    print(f"{attack.describe()}; clean on {result.num_clean} images, attacks on {result.num_attacked}")
    headers = ["alpha", "clean(all)", "clean", "STD", "ROB", "MIX"]
    headers += ["MIX+AA", "worst"] if result.autoattack else ["worst"]
    print(format_table(headers, [[row[column] for column in columns] for row in result.rows]))
    print("reference: " + ", ".join(f"{key}={value:.4f}" for key, value in result.reference.items()))
    print("images/s: " + ", ".join(f"{key}={value:.1f}" for key, value in result.throughput.items()))


def _command_margins(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    attack = _attack_settings(args, 20)
    table = margins_table(pair.standard, pair.robust, data.images, data.labels, attack, runtime)
    write_csv(out / f"{stem}.csv", table)
    write_json(out / f"{stem}.json", {**header, "attack": attack, "table": table})
    plot_margins(table, out / f"{stem}.png",
                 f"g={pair.standard_label}, h={pair.robust_label}\n{attack.describe()} aimed at each model")
    print(f"mean top-1 minus top-2 probability; attacked = {attack.describe()} aimed at the model itself")
    print(format_table(["model", "clean correct", "clean incorrect", "PGD correct", "PGD incorrect",
                        "clean acc", "PGD acc"],
                       [[row["model"], *(row[column] for column in MARGIN_COLUMNS), row["accuracy_clean"],
                         row["accuracy_attacked"]] for row in table]))


def _command_certify(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    baseline = load_zoo_model(args.baseline, runtime.device) if args.baseline else None
    settings = CertifySettings(tuple(args.alphas), None if args.radii is None else tuple(args.radii), args.num_radii,
                               SmoothingOverrides(args.sigma, args.n0, args.n, args.beta), args.baseline_sigma)
    result = certify_mixture(pair.standard, pair.robust, data.images, data.labels, settings, runtime,
                             baseline=baseline, baseline_label=args.baseline or "")
    long_rows = [{"model": curve["model"], "theorem": curve["theorem"], "alpha": curve["alpha"],
                  "radius": radius, "certified_accuracy": accuracy}
                 for curve in result.curves for radius, accuracy in zip(result.radii, curve["accuracy"])]
    write_csv(out / f"{stem}.csv", long_rows)
    estimated = result.certificate_settings.get("rounding_error") == "estimated"
    rounding = {"rounding_error": CERTIFY_ROUNDING} if estimated else {}
    write_json(out / f"{stem}.json", {**header, "certificate": result.certificate_settings, **rounding,
                                      "baseline": result.baseline, "radii": result.radii,
                                      "warnings": result.warnings, "curves": result.curves})
    sigma = result.certificate_settings.get("sigma")
    noise = f" smoothed with sigma={sigma:g}" if sigma is not None else ""
    plot_certify(result, out / f"{stem}.png", f"g={pair.standard_label}, h={pair.robust_label}{noise}")
    print(f"certificate: {result.certificate_settings}")
    print(f"baseline: {result.baseline}")
    probe = _probe_radii(result.radii)
    print("certified accuracy at radius r (r>0: any positive certificate):")
    print(format_table(["model", "theorem", "alpha", "clean", *[("r>0" if r == 0 else f"r>={r:.3g}") for r in probe]],
                       [[curve["model"], curve["theorem"], curve["alpha"], curve["clean_accuracy"],
                         *(_accuracy_at(result.radii, curve["accuracy"], r) for r in probe)]
                        for curve in result.curves]))
    for warning in result.warnings:
        print(f"mixclf-eval: warning: {warning}", file=sys.stderr)
    if estimated:
        print(f"mixclf-eval: note: {CERTIFY_ROUNDING}", file=sys.stderr)


CERTIFY_ROUNDING = ("the Theorem 1 radii are computed from the robust model's float32 probabilities with no "
                    "rounding-error bound (the bound engine cannot bound this model's rounding error, or its constant "
                    "is declared): an estimate of the certified accuracy")
"""What `certify` says of Lipschitz radii without a rounding-error bound (with one, the radii
subtract it, as the node's do, and the JSON's certificate says `rounding_error: bounded`)."""


def _probe_radii(grid: Sequence[float], count: int = 5) -> list[float]:
    """A few radii of the grid for the printed table (grid points, so the values are exact)."""
    if len(grid) <= count:
        return list(grid)
    return [grid[round(i * (len(grid) - 1) / (count - 1))] for i in range(count)]


def _accuracy_at(grid: Sequence[float], accuracy: Sequence[float], radius: float) -> float:
    return accuracy[list(grid).index(radius)]


def _command_design(args, header, pair, data, runtime, out: Path, stem: str) -> None:
    attack = _attack_settings(args, 10)
    known_rows = _resumable_rows(out / f"{stem}.json", header, attack) if args.resume else []
    settings = DesignSettings(tuple(args.gammas), attack, None if args.trusts is None else tuple(args.trusts),
                              None if args.spaces is None else tuple(args.spaces))
    rows = design_comparison(pair.standard, pair.robust, data.images, data.labels, settings, runtime,
                             known_rows=known_rows)
    write_csv(out / f"{stem}.csv", rows)
    write_json(out / f"{stem}.json", {**header, "attack": attack, "rows": rows})
    plot_design(rows, out / f"{stem}.png",
                f"g={pair.standard_label}, h={pair.robust_label}\neq. 3, end-to-end {attack.describe()}")
    print(f"eq. 3 scores; end-to-end {attack.describe()}")
    print(format_table(["trust", "space", "gamma", "clean", "attacked"],
                       [[row["trust"], row["space"], row["gamma"], row["clean_accuracy"],
                         row["attacked_accuracy"]] for row in rows]))


def _resumable_rows(path: Path, header: dict[str, Any], attack: PGDSettings) -> list[dict[str, Any]]:
    """Rows of an earlier design run in `path`, if it used the same models, data, seed and attack."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = (earlier.get("attack") == json_ready(attack)
            and all(earlier["models"][role].get("sha256") == header["models"][role].get("sha256")
                    for role in ("standard", "robust"))
            and earlier.get("data") == header["data"] and earlier.get("seed") == header["seed"])
    if not same:
        raise EvaluationError(f"--resume: {path} comes from other models, data, seed or attack settings")
    return earlier["rows"]


COMMANDS = {"sweep": _command_sweep, "margins": _command_margins, "certify": _command_certify,
            "design": _command_design, "bag": command_bag}
