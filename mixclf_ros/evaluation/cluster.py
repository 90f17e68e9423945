"""Running the experiments' work units on a Ray cluster (`mixclf-eval ... --ray [ADDRESS]`).

Ray is an optional dependency (`pip install .[cluster]`), imported only here and only when asked for.
Units travel as Ray tasks; models never do: each task carries the models' configs and the sha256 of
their weights, and each worker process loads every model once (`_worker_models`, keyed by config and
sha256) and checks the sha256 of what it loaded. A task whose worker dies is retried by Ray
(`max_retries`); finished units come back to the driver, which checkpoints them (`units.execute`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixclf_ros.evaluation.settings import EvaluationError, Runtime
from mixclf_ros.evaluation.units import ModelSet, Unit, UnitContext, run_unit, shard_size_of

DEFAULT_RETRIES = 3


def import_ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise EvaluationError("--ray needs Ray: pip install 'mixclf_ros[cluster]' (or pip install -r "
                              "requirements-cluster.txt)") from error
    return ray


def model_spec(model: nn.Module, role: str) -> dict[str, Any]:
    """What a worker needs to load `model` itself: its config and the sha256 of its weights, and for a
    model behind its preprocessing (`input_space.PreprocessedModel`) that preprocessing and the source
    shape, so that the worker's model takes the same images as the driver's."""
    config, sha256 = getattr(model, "config", None), getattr(model, "sha256", None)
    if not config or not sha256:
        raise EvaluationError(f"--ray: the {role} model must be loaded from a model config (zoo name or "
                              "parameters file), so that workers can load it themselves")
    config = dict(config)
    weights_path = getattr(model, "weights_path", None)
    if weights_path is not None and not str(config.get("weights", "")).startswith("zoo:"):
        config["weights"] = str(Path(weights_path).resolve())  # workers need not share the driver's cwd
    spec: dict[str, Any] = {"config": config, "sha256": str(sha256)}
    preprocess_config = getattr(model, "preprocess_config", None)
    if preprocess_config is not None:
        spec["preprocess"] = {"config": {key: value for key, value in asdict(preprocess_config).items()
                                         if key != "device"},
                              "source_shape": [int(size) for size in model.input_shape]}
    return spec


_WORKER_MODELS: dict[str, nn.Module] = {}
_EMPTY = torch.zeros(0)


def _worker_models(specs: dict[str, dict[str, Any]], device: str) -> ModelSet:
    """The models of `specs` in this worker process, loaded once per (config, sha256, preprocessing,
    device), with their weights' sha256 checked against the driver's, and put behind the driver's
    preprocessing where the spec has one."""
    from mixclf_ros.evaluation.input_space import PreprocessedModel
    from mixclf_ros.evaluation.model_pair import load_config
    from mixclf_ros.vision.preprocess import PreprocessConfig

    loaded = {}
    for role, spec in specs.items():
        key = json.dumps([spec["config"], spec["sha256"], spec.get("preprocess"), device], sort_keys=True,
                         default=str)
        if key not in _WORKER_MODELS:
            try:  # load_model checks the weights' sha256 against the driver's
                model = load_config({**spec["config"], "sha256": spec["sha256"]}, torch.device(device))
            except (ValueError, OSError, RuntimeError) as error:
                raise EvaluationError(f"{role} model on Ray worker host {socket.gethostname()}: {error}") from error
            if getattr(model, "sha256", None) != spec["sha256"]:
                raise EvaluationError(f"{role} model on Ray worker host {socket.gethostname()}: weights have "
                                      f"sha256 {getattr(model, 'sha256', None)}, the driver's have {spec['sha256']}")
            if spec.get("preprocess") is not None:
                preprocess = spec["preprocess"]
                model = PreprocessedModel(model, PreprocessConfig(**preprocess["config"]),
                                          tuple(preprocess["source_shape"]), torch.device(device)).to(device).eval()
            _WORKER_MODELS[key] = model
        loaded[role] = _WORKER_MODELS[key]
    return ModelSet(loaded["standard"], loaded["robust"], loaded.get("baseline"))


def _remote_unit(specs: dict[str, dict[str, Any]], settings: dict[str, Any], unit: Unit, images: torch.Tensor,
                 labels: torch.Tensor, dependency: Any) -> dict[str, Any]:
    """A unit on a Ray worker (the body of the Ray task); its shard travels separately, stored once."""
    unit = replace(unit, images=images, labels=labels)
    torch.set_num_threads(settings["threads"])
    models = _worker_models(specs, settings["device"])
    context = UnitContext(models, torch.device(settings["device"]), settings["batch_size"], settings["seed"],
                          derive_seeds=settings["derive_seeds"])
    return run_unit(context, unit, dependency)


def _start_local_ray(ray: Any, num_cpus: int | None) -> None:
    """`ray.init` of a local instance whose workers import this package from where the driver does (the
    raylet passes its environment on to the workers; this process's environment is left as it was)."""
    previous = os.environ.get("PYTHONPATH")
    package_parent = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join([package_parent, *filter(None, [previous])])
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


class RayBackend:
    """Executes units as Ray tasks on a local Ray instance (`address` "local") or a running cluster.

    threads: torch threads per task (and CPUs reserved per task); gpus: GPUs per task (device cuda);
    max_retries: Ray retries of a task whose worker died; num_cpus: CPUs of a local instance."""

    def __init__(self, address: str = "local", threads: int = 1, gpus: float = 0.0,
                 max_retries: int = DEFAULT_RETRIES, num_cpus: int | None = None):
        ray = import_ray()
        self.address, self.threads, self.gpus, self.max_retries = address, max(1, threads), gpus, max_retries
        self.started = False
        if not ray.is_initialized():
            if address == "local":
                _start_local_ray(ray, num_cpus)
            else:
                package = str(Path(__file__).resolve().parents[1])
                try:  # the driver's package travels to every node (py_modules): all run the same code
                    ray.init(address=address, log_to_driver=False,
                             runtime_env={"py_modules": [package], "excludes": ["__pycache__", "*.pyc"]})
                except (ConnectionError, RuntimeError, ValueError) as error:
                    raise EvaluationError(f"--ray {address}: cannot join the cluster ({error})") from error
            self.started = True

    def describe(self) -> str:
        return f"ray {self.address}" + (f" ({self.threads} threads per unit)" if self.threads > 1 else "")

    def run(self, units: Sequence[Unit], done: dict[str, dict], models: ModelSet, runtime: Runtime,
            finished: Callable[[str, dict], None]) -> None:
        """Submits `units` (dependencies first) and calls `finished(key, result)` as each one ends;
        `done` holds results already known (checkpoints), which dependencies may name."""
        ray = import_ray()
        specs = {role: model_spec(model, role) for role, model in models.roles().items()}
        device = "cuda" if runtime.device.type == "cuda" else str(runtime.device)
        settings = {"threads": self.threads, "device": device, "batch_size": runtime.batch_size,
                    "seed": runtime.seed, "derive_seeds": shard_size_of(runtime) > 0}
        task = ray.remote(_remote_unit).options(num_cpus=self.threads, num_gpus=self.gpus,
                                                max_retries=self.max_retries, retry_exceptions=False)
        specs_ref = ray.put(specs)
        stored: dict[int, tuple[Any, torch.Tensor]] = {}  # id -> (object ref, the tensor, kept alive)

        def put(tensor: torch.Tensor) -> Any:
            if id(tensor) not in stored:  # the units of a shard share its tensors: one copy in the object store
                stored[id(tensor)] = (ray.put(tensor), tensor)
            return stored[id(tensor)][0]

        references: dict[str, Any] = {}
        for unit in units:
            dependency = None
            if unit.depends_on:
                dependency = references.get(unit.depends_on, done.get(unit.depends_on))
            bare = replace(unit, images=_EMPTY, labels=_EMPTY)
            references[unit.key] = task.remote(specs_ref, settings, bare, put(unit.images), put(unit.labels),
                                               dependency)
        keys = {reference: key for key, reference in references.items()}
        pending = list(references.values())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for reference in ready:
                finished(keys[reference], ray.get(reference))

    def close(self) -> None:
        """Shuts down the Ray instance if this backend started it (joined clusters keep running)."""
        if self.started:
            import_ray().shutdown()
            self.started = False
