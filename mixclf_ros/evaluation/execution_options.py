"""Command-line options for where the work units of `mixclf-eval` run: in this process (default) or on a
Ray cluster (`--ray [ADDRESS]`), the shard size, and the checkpoint folder of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixclf_ros.evaluation.settings import EvaluationError, Runtime
from mixclf_ros.evaluation.units import DEFAULT_SHARD_SIZE, Execution


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution (work units: alpha x image shard x attack)")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run the units as Ray tasks: 'local' (the default with no ADDRESS) starts a local "
                       "Ray instance, an address (e.g. 10.0.0.1:6379, or 'auto') joins a running cluster "
                       "(needs pip install 'mixclf_ros[cluster]')")
    group.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                       help="CPUs of the local Ray instance (default: all)")
    group.add_argument("--ray-retries", type=int, default=3, metavar="N",
                       help="Ray retries of a unit whose worker died (default 3)")
    group.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                       help=f"images per work unit (default {DEFAULT_SHARD_SIZE}: one shard of every image, "
                       "seeded as the evaluation always was); results depend on it, not on the number of "
                       "workers")


def checkpoint_folder(out: Path, stem: str) -> Path:
    """Where the finished units of the run `<out>/<stem>` are kept (one file per unit)."""
    return out / f"{stem}.units"


def execution_from_arguments(args: argparse.Namespace, runtime: Runtime, out: Path, stem: str) -> Execution:
    """The `Execution` of a command line: a Ray backend for `--ray`, checkpoints under `out`."""
    if args.shard_size < 0:
        raise EvaluationError("--shard-size must be >= 0 (0: one shard of every image)")
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise EvaluationError("--ray-cpus must be >= 1")
    backend = None
    if args.ray is not None:
        from mixclf_ros.evaluation.cluster import RayBackend

        if args.ray_cpus is not None and args.ray != "local":
            raise EvaluationError("--ray-cpus applies to a local Ray instance (--ray local) only")
        backend = RayBackend(args.ray, threads=args.threads or 1,
                             gpus=1.0 if runtime.device.type == "cuda" else 0.0,
                             max_retries=max(0, args.ray_retries), num_cpus=args.ray_cpus)
    return Execution(backend, checkpoint_folder(out, stem), args.shard_size)
