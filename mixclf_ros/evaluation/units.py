"""Work units of the experiments: one (alpha x image shard x attack) piece of work, its seed, and how a
list of them is executed, in this process or on a Ray cluster (`evaluation.cluster`).

Every experiment is written as units, and the in-process run executes the same units one after the
other. A unit's result depends only on its own images, parameters and seed (derived from the run's
seed and the unit's key), so the results do not depend on how many workers run or in what order: the
CSVs of an in-process run and of a Ray run are identical (same device and torch thread count, as
floating-point reductions may differ otherwise).

A unit function is a module-level function `function(context, unit, dependency) -> dict` of tensors
and numbers; `dependency` is the result of the unit named by `unit.depends_on` (or None).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mixclf_ros.evaluation.settings import Runtime

DEFAULT_SHARD_SIZE = 0
"""Images per shard. 0: one shard holding every image, each unit seeded with the run's own seed, as the
evaluation has always been seeded (so earlier results reproduce; units still split by alpha and
attack). N > 0: shards of N images, each unit seeded from the run's seed and its key. Results depend on
the shard size, never on the number of workers."""


@dataclass(frozen=True)
class ModelSet:
    """The models a unit may use: g, h and an optional baseline robust model (certify)."""

    standard: nn.Module
    robust: nn.Module
    baseline: nn.Module | None = None

    def roles(self) -> dict[str, nn.Module]:
        models = {"standard": self.standard, "robust": self.robust}
        if self.baseline is not None:
            models["baseline"] = self.baseline
        return models


@dataclass(frozen=True)
class UnitContext:
    """What a unit runs with: the models (loaded once per process) and the run's device, batch size,
    seed and torch thread count."""

    models: ModelSet
    device: torch.device
    batch_size: int
    seed: int
    derive_seeds: bool = True
    """True: each unit gets `unit_seed(seed, key)`; False (one shard of every image): the run's seed."""

    def runtime_for(self, unit: Unit) -> Runtime:
        """A runtime seeded for the unit (see `derive_seeds`), without progress bars."""
        seed = unit_seed(self.seed, unit.key) if self.derive_seeds else self.seed
        return Runtime(self.device, self.batch_size, seed, progress=False)


@dataclass(frozen=True)
class Unit:
    """One piece of work: `function(context, unit, dependency)` on `images` (n, C, H, W) in [0, 1] and
    `labels` (n,), with `params` (alphas, attack settings, ...). `key` names it uniquely and stably
    within a run ("mix/alpha=0.5/shard=3"); it also seeds it."""

    key: str
    function: Callable[[UnitContext, Unit, Any], dict[str, Any]]
    images: torch.Tensor
    labels: torch.Tensor
    params: dict[str, Any] = field(default_factory=dict)
    depends_on: str | None = None


def unit_seed(seed: int, key: str) -> int:
    """The seed of the unit `key` in a run seeded with `seed` (numpy SeedSequence: independent streams
    per unit, the same on every worker)."""
    sequence = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])
    return int(sequence.generate_state(1, np.uint32)[0])


def shard_slices(count: int, shard_size: int) -> list[slice]:
    """Consecutive slices of `range(count)` of at most `shard_size` items (0: one slice of all)."""
    if int(shard_size) <= 0:
        return [slice(0, count)]
    size = int(shard_size)
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def shards(images: torch.Tensor, labels: torch.Tensor, runtime: Runtime) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each shard of `shard_size_of(runtime)` consecutive samples, copied once (a view
    would carry the whole set when sent to a worker); every unit of a shard shares them."""
    return [(images[part].clone(), labels[part].clone())
            for part in shard_slices(int(labels.shape[0]), shard_size_of(runtime))]


def shard_size_of(runtime: Runtime) -> int:
    """Images per shard of a run: `runtime.execution.shard_size`, else `DEFAULT_SHARD_SIZE`."""
    return runtime.execution.shard_size if runtime.execution is not None else DEFAULT_SHARD_SIZE


def run_unit(context: UnitContext, unit: Unit, dependency: Any = None) -> dict[str, Any]:
    """Runs one unit and adds what the throughput report needs under "_meta" (worker, node, seconds,
    images); timing never enters the experiment's results."""
    started = time.perf_counter()
    result = unit.function(context, unit, dependency)
    result["_meta"] = {"worker": worker_name(), "node": socket.gethostname(),
                       "seconds": time.perf_counter() - started, "images": int(unit.labels.shape[0])}
    return result


def worker_name() -> str:
    """"ray:<worker id>:pid<pid>" in a Ray worker, else "local:pid<pid>" (Ray is never imported here)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return f"ray:{ray.get_runtime_context().get_worker_id()[:12]}:pid{os.getpid()}"
    return f"local:pid{os.getpid()}"


def _model_fingerprint(model: nn.Module) -> str:
    """The weights' sha256 (else a digest of the state dict), with the preprocessing in front of the
    model where it has one (`input_space.PreprocessedModel`: the same weights take other images)."""
    preprocess = getattr(model, "preprocess_config", None)
    behind = "" if preprocess is None else f"|{preprocess!r}|{tuple(model.input_shape)}"
    sha = getattr(model, "sha256", None)
    if sha:
        return str(sha) + behind
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest() + behind


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the package's Python sources and the torch version: a checkpoint made by other code is
    not reused."""
    digest = hashlib.sha256(torch.__version__.encode())
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def unit_fingerprint(unit: Unit, models: ModelSet, runtime: Runtime) -> str:
    """What a unit's result depends on: its key, images, labels, parameters, the models' weights, the
    seed and how units are seeded, batch size, device type and the code (`code_fingerprint`). A
    checkpoint is reused only under the same fingerprint."""
    digest = hashlib.sha256()
    for part in (code_fingerprint(), unit.key, repr(sorted(unit.params.items())), str(unit.depends_on),
                 str(runtime.seed), f"derive_seeds={shard_size_of(runtime) > 0}",
                 str(runtime.batch_size), runtime.device.type,
                 *(f"{role}={_model_fingerprint(model)}" for role, model in models.roles().items())):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    digest.update(unit.images.contiguous().numpy().tobytes())
    digest.update(unit.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Execution:
    """How units run: `backend` None (this process) or a `cluster.RayBackend`; `checkpoints` a folder
    for one file per finished unit (None: no checkpoints); `shard_size` images per shard.

    The counts and the per-unit timing accumulate over the experiment's `execute` calls; `report`
    summarises them for the JSON."""

    backend: Any = None
    checkpoints: Path | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    executed: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    total: int = 0

    def report(self) -> dict[str, Any]:
        """JSON-ready: units total / executed / resumed, and per worker units, images, seconds,
        units/s and images/s (timing: differs between runs)."""
        workers: dict[tuple[str, str], dict[str, Any]] = {}
        for meta in self.executed:
            entry = workers.setdefault((meta["worker"], meta["node"]),
                                       {"worker": meta["worker"], "node": meta["node"], "units": 0, "images": 0,
                                        "seconds": 0.0})
            entry["units"] += 1
            entry["images"] += meta["images"]
            entry["seconds"] += meta["seconds"]
        for entry in workers.values():
            busy = entry["seconds"]
            entry["units_per_second"] = entry["units"] / busy if busy > 0 else None
            entry["images_per_second"] = entry["images"] / busy if busy > 0 else None
        backend = "in-process" if self.backend is None else self.backend.describe()
        return {"backend": backend, "shard_size": self.shard_size,
                "units": {"total": self.total, "executed": len(self.executed), "resumed": self.resumed},
                "workers": sorted(workers.values(), key=lambda entry: (entry["node"], entry["worker"]))}


def execute(units: Sequence[Unit], models: ModelSet, runtime: Runtime, description: str) -> dict[str, dict]:
    """Results of `units` by key: from checkpoints of an earlier run where they match, the rest
    executed (in this process, in order, or on the Ray backend of `runtime.execution`), each one
    checkpointed as soon as it finishes. A unit's dependency must come before it in `units`."""
    from mixclf_ros.evaluation import checkpoints

    execution = runtime.execution if runtime.execution is not None else Execution()
    keys = [unit.key for unit in units]
    if len(set(keys)) != len(keys):
        raise ValueError("unit keys must be unique")
    store = (checkpoints.UnitStore(execution.checkpoints) if execution.checkpoints is not None else None)
    fingerprints = ({unit.key: unit_fingerprint(unit, models, runtime) for unit in units} if store else {})
    results: dict[str, dict] = {}
    if store is not None:
        for unit in units:
            found = store.load(unit.key, fingerprints[unit.key])
            if found is not None:
                results[unit.key] = found
    execution.total += len(units)
    execution.resumed += len(results)
    if results and runtime.progress:
        tqdm.write(f"{description}: {len(results)} of {len(units)} read back from {execution.checkpoints}")
    pending = [unit for unit in units if unit.key not in results]
    bar = tqdm(total=len(units), initial=len(results), desc=description, unit="unit",
               disable=not runtime.progress or not units)

    def finished(key: str, result: dict) -> None:
        execution.executed.append(result.pop("_meta"))
        if store is not None:
            store.save(key, fingerprints[key], result)
        results[key] = result
        bar.update(1)

    try:
        if execution.backend is None:
            context = UnitContext(models, runtime.device, runtime.batch_size, runtime.seed,
                                  derive_seeds=shard_size_of(runtime) > 0)
            for unit in pending:
                dependency = results[unit.depends_on] if unit.depends_on else None
                finished(unit.key, run_unit(context, unit, dependency))
        else:
            execution.backend.run(pending, results, models, runtime, finished)
    finally:
        bar.close()
    return results


def concatenated(results: dict[str, dict], keys: Sequence[str], name: str, dim: int = 0) -> torch.Tensor:
    """`results[key][name]` of `keys`, concatenated in that order along `dim`."""
    return torch.cat([results[key][name] for key in keys], dim=dim)


def seconds_and_images(results: dict[str, dict], keys: Sequence[str]) -> tuple[float, int]:
    """Attack seconds and attacked images summed over units (their "seconds" and "attacked")."""
    return (sum(float(results[key]["seconds"]) for key in keys),
            sum(int(results[key]["attacked"]) for key in keys))
