"""`mixclf-eval`: the paper's experiments on the mixed classifier of eq. 4 (no ROS needed).

    mixclf-eval sweep    clean / STD / ROB / MIX-attacked accuracy over an alpha grid (paper Fig. 2)
    mixclf-eval margins  mean top-1 minus top-2 probability gap of g and h (paper Table I)
    mixclf-eval certify  certified accuracy vs radius of the mixture (paper Fig. 3, Theorems 1 and 2)
    mixclf-eval design   R_i(x) choices, logits vs probabilities (paper Fig. 1, eq. 3)
    mixclf-eval bag      a robot's rosbag2 recording through the node's own path, per alpha (`bag_command`)

Also `python -m mixclf_ros.evaluation ...` (or `python -m mixclf_ros.evaluation.cli ...`). Each subcommand
writes a CSV and a JSON file with every number, and a PNG plot, under `--out` (default `eval_out/`), and
prints a compact table.

Every experiment runs as work units (alpha x image shard x attack, `evaluation.units`), one after the other
in this process, or with `--ray [ADDRESS]` as Ray tasks on a local instance or a cluster
(`evaluation.cluster`); finished units are checkpointed under `--out`, so a rerun resumes.

Units and conventions:
- images are [0,1] pixel tensors (N, C, H, W) at the model input; attack budgets `eps` and
  certified radii are in the named norm ("linf" or "l2") in those units;
- accuracies are fractions in [0, 1];
- an attacked sample counts as correct only if the classifier is correct on the clean image AND on
  the adversarial one (the zero perturbation is in every ball), so attacked accuracy never exceeds
  clean accuracy;
- `alpha` is the weight of the robust model h (alpha = 0: standard g, alpha = 1: h);
- STD and ROB attacks are classic PGD aimed at g or h alone, returning the final iterate of
  highest loss (the adversarial data a transfer attack hands to the mixture); MIX attacks are
  end-to-end PGD on the mixture's log-probabilities (`MixedClassifier`, no gradient masking) that
  keep any iterate that fools it, optionally followed by APGD-CE, APGD-T and Square (torchattacks)
  on the samples that survive PGD (worst case over attacks per sample).

This module is the command line only. The experiments take plain modules, tensors and settings
dataclasses, for benchmarks and tests: `evaluation.sweep.run_sweep`, `evaluation.margins.margins_table`,
`evaluation.certification.certify_mixture`, `evaluation.design_grid.design_comparison`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mixclf_ros.evaluation.bag_command import add_bag_arguments, check_output_free
from mixclf_ros.evaluation.commands import COMMANDS, run_header
from mixclf_ros.evaluation.datasets import DataSettings
from mixclf_ros.evaluation.execution_options import add_execution_arguments, execution_from_arguments
from mixclf_ros.evaluation.input_space import evaluation_inputs
from mixclf_ros.evaluation.model_pair import load_model_pair
from mixclf_ros.evaluation.output_names import choose_stem
from mixclf_ros.evaluation.settings import (
    DEFAULT_CERTIFY_ALPHAS,
    DEFAULT_EPS,
    DEFAULT_GAMMAS,
    DEFAULT_ROBUST,
    DEFAULT_SWEEP_ALPHAS,
    NORMS,
    EvaluationError,
    Runtime,
)
from mixclf_ros.runtime.classifier import select_device
from mixclf_ros.runtime.node_parameters import MODELS


def resolve_device(requested: str) -> torch.device:
    """`auto` (first CUDA device, else CPU), `cpu`, `cuda` or `cuda:N` (`runtime.select_device`)."""
    try:
        return select_device(requested)
    except (RuntimeError, ValueError) as error:
        raise EvaluationError(f"--device {requested}: {error}") from error


def parse_floats(text: str) -> list[float]:
    """'0,0.1,0.5' -> [0.0, 0.1, 0.5]."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error
    if not values or not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"expected finite comma-separated numbers, got {text!r}")
    return values


def parse_alphas(text: str) -> list[float]:
    values = parse_floats(text)
    if not all(0.0 <= value <= 1.0 for value in values):
        raise argparse.ArgumentTypeError(f"alphas must be in [0, 1], got {text!r}")
    return values


def parse_names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    models_group = common.add_argument_group("models (zoo names win over --params)")
    models_group.add_argument("--standard", metavar="NAME", help="zoo name of g (default: standard)")
    models_group.add_argument("--robust", metavar="NAME",
                              help=f"zoo name of h (default: robust_at; certify and bag: {MODELS['robust_model']})")
    models_group.add_argument("--params", metavar="YAML",
                              help="ROS parameters file with standard_model.* / robust_model.* keys")
    run_group = common.add_argument_group("run")
    run_group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run_group.add_argument("--batch-size", type=int, default=256, help="images per batch")
    run_group.add_argument("--seed", type=int, default=0, help="seed of subsets, noise and random starts")
    run_group.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run_group.add_argument("--out", default="eval_out", metavar="DIR", help="output folder")
    run_group.add_argument("--name", default=None,
                           help="stem of the output files (default: <command>_<UTC start time>, e.g. "
                           "certify_20250314T101500Z, suffixed _2, _3 if taken); a --name with results in --out is "
                           "refused unless --overwrite; rerun an interrupted run with its --name to resume it")
    run_group.add_argument("--overwrite", action="store_true", help="replace the results of an existing --name")
    run_group.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    add_execution_arguments(common)

    data_options = argparse.ArgumentParser(add_help=False)
    data_group = data_options.add_argument_group("data")
    data_group.add_argument("--image-folder", metavar="DIR",
                            help="one sub-folder per class, named by a class name or index of the model "
                            "(default: Fashion-MNIST test set)")
    data_group.add_argument("--class-map", metavar="FILE",
                            help="YAML/JSON {folder name: class name or index} for --image-folder")
    data_group.add_argument("--crop-height", type=int, default=None,
                            help="centre crop of --image-folder images for both models, source pixels "
                            "(default: each model's crop_height, from --params, else 0 = none)")
    data_group.add_argument("--crop-width", type=int, default=None,
                            help="as --crop-height, for the width")
    data_group.add_argument("--resize", choices=("area", "bilinear"), default=None,
                            help="resize to each model's input (default: each model's resize, from --params, "
                            "else area)")
    data_group.add_argument("--limit", type=int, default=None, metavar="N",
                            help="evaluate a seeded random subset of N images (default: all)")

    attack_options = argparse.ArgumentParser(add_help=False)
    attack_group = attack_options.add_argument_group("PGD attack")
    attack_group.add_argument("--norm", choices=NORMS, default="linf")
    attack_group.add_argument("--eps", type=float, default=None,
                              help=f"budget in [0,1] pixels (default {DEFAULT_EPS})")
    attack_group.add_argument("--steps", type=int, default=None, help="PGD steps (default 20; design: 10)")
    attack_group.add_argument("--step-size", type=float, default=None, help="default 2.5 eps / steps")
    attack_group.add_argument("--restarts", type=int, default=1, help="random starts per attack")

    parser = argparse.ArgumentParser(
        prog="mixclf-eval", description="Evaluate the mixed classifier log((1-alpha) g + alpha h) "
        "(Bai, Anderson, Sojoudi): accuracy under attack, margins, certified accuracy, design space.")
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", parents=[common, data_options, attack_options],
                                help="clean / STD / ROB / MIX-attacked accuracy over alpha (Fig. 2)")
    sweep.add_argument("--alphas", type=parse_alphas, default=list(DEFAULT_SWEEP_ALPHAS),
                       help="comma-separated weights of h in [0, 1]")
    sweep.add_argument("--attack-limit", type=int, default=None, metavar="N",
                       help="attack a seeded random subset of N of the evaluated images "
                       "(clean accuracy is also reported on all of them)")
    sweep.add_argument("--autoattack", action="store_true",
                       help="MIX: also APGD-CE, APGD-T and Square (torchattacks), worst case per sample")
    sweep.add_argument("--autoattack-iterations", type=int, default=100,
                       help="iterations of APGD-CE / APGD-T, queries of Square")
    sweep.add_argument("--autoattack-targets", type=int, default=None,
                       help="APGD-T target classes (default: all other classes)")
    sweep.add_argument("--autoattack-alphas", type=parse_alphas, default=None,
                       help="run AutoAttack only at these alphas (default: all of --alphas)")

    commands.add_parser("margins", parents=[common, data_options, attack_options],
                        help="mean top-1 minus top-2 probability gap of g and h (Table I)")

    certify_parser = commands.add_parser("certify", parents=[common, data_options],
                                         help="certified accuracy vs radius of the mixture (Fig. 3)")
    certify_parser.add_argument("--alphas", type=parse_alphas, default=list(DEFAULT_CERTIFY_ALPHAS),
                                help="comma-separated weights of h (below 1/2 nothing is certified)")
    certify_parser.add_argument("--radii", type=parse_floats, default=None,
                                help="radius grid (default: --num-radii points up to the largest radius)")
    certify_parser.add_argument("--num-radii", type=int, default=101, help="points of the default grid")
    certify_parser.add_argument("--baseline", metavar="NAME", help="zoo name of a baseline robust model")
    certify_parser.add_argument("--baseline-sigma", type=float, default=None,
                                help="smoothing: baseline = the robust base network smoothed with this sigma")
    certify_parser.add_argument("--sigma", type=float, default=None,
                                help="smoothing: noise level of the robust model (default: its config)")
    certify_parser.add_argument("--n0", type=int, default=None, help="smoothing selection samples")
    certify_parser.add_argument("--n", type=int, default=None, help="smoothing estimation samples")
    certify_parser.add_argument("--beta", type=float, default=None,
                                help="smoothing: 1 - joint confidence of the Monte Carlo bounds")

    design_parser = commands.add_parser("design", parents=[common, data_options, attack_options],
                                        help="R_i(x) choices and logits vs probabilities (Fig. 1)")
    design_parser.add_argument("--gammas", type=parse_floats, default=list(DEFAULT_GAMMAS),
                               help="comma-separated gamma >= 0 of eq. 3 (R=1 softmax: alpha = gamma/(1+gamma))")
    design_parser.add_argument("--trusts", type=parse_names, default=None,
                               help="comma-separated R_i(x) names (default: all of design.TRUST_TERMS)")
    design_parser.add_argument("--spaces", type=parse_names, default=None,
                               help="logits,probabilities (default: both)")
    design_parser.add_argument("--resume", action="store_true",
                               help="keep the points of an earlier run with the same output name, models, "
                               "data and attack, and compute only the missing ones")

    bag_parser = commands.add_parser("bag", parents=[common],
                                     help="a rosbag2 recording (sqlite3 / MCAP) through the node's own path, per alpha",
                                     description="Each frame of TOPIC through the node's decoding, preprocessing and "
                                     "CertifiedClassifier at the settings of --params (the node's file), per alpha: "
                                     "safe rate, radii, classes, g/h disagreement, frames per second.")
    add_bag_arguments(bag_parser, parse_alphas, list(DEFAULT_CERTIFY_ALPHAS))
    return parser


def data_settings(args: argparse.Namespace) -> DataSettings:
    """The data options; crop and resize not given stay None: each model's own, from its config (a
    crop there is for camera frames: the Fashion-MNIST images are not cropped)."""
    if args.image_folder is None and (args.crop_height or args.crop_width):
        raise EvaluationError("--crop-height / --crop-width apply to --image-folder images only")
    return DataSettings(args.image_folder, args.class_map, args.crop_height, args.crop_width, args.resize,
                        args.limit, args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mixclf-eval`; returns the process exit status (0 ok, 2 usage/config error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.batch_size < 1:
            raise EvaluationError("--batch-size must be >= 1")
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        runtime = Runtime(resolve_device(args.device), args.batch_size, args.seed, not args.no_progress)
        torch.manual_seed(args.seed)
        if args.command == "bag":
            check_output_free(args)
        out = Path(args.out)
        stem, note = choose_stem(args.command, out, args.name, args.overwrite, getattr(args, "resume", False))
        if note:
            print(f"mixclf-eval: note: {note}", file=sys.stderr)
        pair = load_model_pair(args.standard, args.robust, args.params, DEFAULT_ROBUST[args.command],
                               runtime.device)
        if args.command not in ("certify", "bag") and getattr(pair.robust, "kind", None) == "smoothing":
            print("mixclf-eval: note: the robust model is a smoothing model; this command uses its base "
                  "network without noise", file=sys.stderr)
        data = None
        if args.command != "bag":  # the frames are the recording's, each model preprocessing its own way
            data, pair = evaluation_inputs(pair, data_settings(args), runtime.device)
        if data is not None and data.skipped:
            print(f"mixclf-eval: warning: {len(data.skipped)} file(s) in --image-folder are not images and were "
                  f"skipped: {', '.join(data.skipped[:5])}{' ...' if len(data.skipped) > 5 else ''}",
                  file=sys.stderr)
        for warning in data.warnings if data is not None else []:
            print(f"mixclf-eval: warning: {warning}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        runtime.execution = execution_from_arguments(args, runtime, out, stem)
        header = run_header(args, argv, pair, data, runtime)
        try:
            COMMANDS[args.command](args, header, pair, data, runtime, out, stem)
        finally:
            if runtime.execution.backend is not None:
                runtime.execution.backend.close()
    except (EvaluationError, FileNotFoundError) as error:
        print(f"mixclf-eval: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__name__ != "ModelConfigError":
            raise
        print(f"mixclf-eval: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out / stem}.csv, .json, .png in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
