"""`mixclf-eval --ray`: the work units on a local Ray instance (2 CPUs, shared by the tests of this module)
give the same CSVs as the in-process run, also when a worker is killed mid-run; a rerun after an
interruption resumes from the checkpointed units. Real zoo models, real Fashion-MNIST images, real PGD."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from mixclf_ros.evaluation import cli, sweep

pytestmark = pytest.mark.slow  # Ray instances and full evaluation runs

SWEEP = ["sweep", "--limit", "24", "--alphas", "0,0.5,1", "--steps", "3", "--shard-size", "8", "--threads", "1",
         "--device", "cpu", "--no-progress"]
CERTIFY = ["certify", "--robust", "robust_smoothing", "--limit", "12", "--n0", "8", "--n", "64",
           "--alphas", "0.5,1", "--shard-size", "4", "--threads", "1", "--device", "cpu", "--no-progress"]
UNITS = 3 + 3 * 3 + 3 * 3  # clean (all, attacked), STD, ROB per shard; MIX per (alpha, shard): 3 shards
TIMING = ("command", "arguments", "execution", "throughput_images_per_second")
"""JSON keys that differ between runs by design: the command line, and what ran where, how fast."""


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for the whole module (starting Ray takes a while)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-cluster.txt)")
    from mixclf_ros.evaluation.cluster import RayBackend

    backend = RayBackend("local", num_cpus=2)
    yield backend
    backend.close()


def run(arguments: list[str], out: Path) -> tuple[bytes, dict]:
    assert cli.main([*arguments, "--out", str(out)]) == 0
    stem = next(out.glob("*.csv")).stem
    return (out / f"{stem}.csv").read_bytes(), json.loads((out / f"{stem}.json").read_text())


def comparable(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in TIMING}


@pytest.fixture(scope="module")
def in_process_sweep(tmp_path_factory) -> tuple[bytes, dict]:
    return run(SWEEP, tmp_path_factory.mktemp("in_process"))


@pytest.mark.parametrize("command", ["sweep", "certify"])
def test_local_ray_gives_the_in_process_results(local_ray, in_process_sweep, tmp_path, command):
    expected = in_process_sweep if command == "sweep" else run(CERTIFY, tmp_path / "in_process")
    arguments = SWEEP if command == "sweep" else CERTIFY
    csv, report = run([*arguments, "--ray", "local"], tmp_path / "ray")
    assert csv == expected[0]
    assert comparable(report) == comparable(expected[1])
    execution = report["execution"]
    assert execution["backend"] == "ray local"
    assert execution["units"]["executed"] == execution["units"]["total"] > 0
    assert execution["units"]["resumed"] == 0
    for worker in execution["workers"]:
        assert worker["worker"].startswith("ray:") and worker["node"]
        assert worker["units"] > 0 and worker["units_per_second"] > 0 and worker["images_per_second"] > 0
    assert sum(worker["units"] for worker in execution["workers"]) == execution["units"]["total"]


def test_a_killed_worker_changes_nothing(local_ray, in_process_sweep, tmp_path, monkeypatch):
    """The first attempt of one MIX unit kills its own worker process (SIGKILL); Ray retries it."""
    marker = tmp_path / "killed"
    original = sweep._mix_unit

    def mix_unit_killing_its_worker_once(context, unit, dependency):
        if unit.key == "mix/alpha=0.5/shard=1" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(context, unit, dependency)

    monkeypatch.setattr(sweep, "_mix_unit", mix_unit_killing_its_worker_once)
    csv, report = run([*SWEEP, "--ray", "local"], tmp_path / "ray")
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died, not this process
    assert csv == in_process_sweep[0]
    assert comparable(report) == comparable(in_process_sweep[1])
    assert report["execution"]["units"] == {"total": UNITS, "executed": UNITS, "resumed": 0}


def test_a_rerun_after_an_interruption_runs_only_the_missing_units(in_process_sweep, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = sweep._mix_unit

    def interrupted(context, unit, dependency):
        if unit.key == "mix/alpha=0.5/shard=1":
            raise KeyboardInterrupt
        return original(context, unit, dependency)

    monkeypatch.setattr(sweep, "_mix_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*SWEEP, "--out", str(out), "--name", "sweep_linf"])
    finished = len(list((out / "sweep_linf.units").glob("*.pt")))
    assert 0 < finished < UNITS
    assert not (out / "sweep_linf.csv").exists()

    monkeypatch.setattr(sweep, "_mix_unit", original)
    csv, report = run([*SWEEP, "--name", "sweep_linf"], out)  # its name resumes it
    assert report["execution"]["units"] == {"total": UNITS, "executed": UNITS - finished, "resumed": finished}
    assert csv == in_process_sweep[0]
    assert comparable(report) == comparable(in_process_sweep[1])
    # A third run has nothing left to do, and changes nothing.
    csv, report = run([*SWEEP, "--name", "sweep_linf", "--overwrite"], out)
    assert report["execution"]["units"] == {"total": UNITS, "executed": 0, "resumed": UNITS}
    assert csv == in_process_sweep[0]


def test_ray_option_without_ray_installed_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert cli.main([*SWEEP, "--ray", "local", "--out", str(tmp_path)]) == 2
    assert "pip install 'mixclf_ros[cluster]'" in capsys.readouterr().err


def test_workers_refuse_weights_that_differ_from_the_drivers(local_ray, tmp_path, monkeypatch, capsys):
    """The weights file changes between the driver's load and the workers' (as on a host with other files):
    the workers refuse it by sha256, and the run ends with a clear error."""
    import shutil

    import yaml

    from mixclf_ros.evaluation import cluster
    from mixclf_ros.models.loading import ZOO_DIR

    weights = tmp_path / "robust.pt"
    shutil.copy(ZOO_DIR / "robust_at.pt", weights)
    robust = {"architecture": "fmnist_small_cnn", "weights": str(weights), "mean": [0.2860], "std": [0.3530],
              "kind": "empirical", "norm": "linf"}
    params = tmp_path / "params.yaml"
    standard = {"architecture": "fmnist_cnn", "weights": "zoo:standard.pt", "mean": [0.2860], "std": [0.3530],
                "kind": "standard"}
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"standard_model": standard,
                                                                   "robust_model": robust}}}))
    original = cluster.model_spec

    def spec_then_replace_the_weights(model, role):
        spec = original(model, role)
        if role == "robust":
            shutil.copy(ZOO_DIR / "robust_smoothing.pt", weights)  # same architecture, other weights
        return spec

    monkeypatch.setattr(cluster, "model_spec", spec_then_replace_the_weights)
    arguments = [*SWEEP, "--params", str(params), "--ray", "local", "--out", str(tmp_path)]
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert "robust model on Ray worker host" in error and "sha256" in error


def test_local_ray_takes_a_pair_with_different_inputs(local_ray, tmp_path):
    """A random resnet18 (224x224 RGB) as g with the zoo's Lipschitz model (28x28 grey): the workers put g
    behind the driver's preprocessing, so the Ray run equals the in-process one on the source image."""
    import torch
    import torchvision
    import yaml

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    standard = {"architecture": "torchvision:resnet18", "input_channels": 3, "input_height": 224,
                "input_width": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                "kind": "standard", "weights": str(weights)}
    robust = {"architecture": "fmnist_lipschitz_cnn", "weights": "zoo:robust_lipschitz.pt", "kind": "lipschitz"}
    params = tmp_path / "pair.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"standard_model": standard,
                                                                   "robust_model": robust}}}))
    arguments = ["certify", "--params", str(params), "--limit", "8", "--alphas", "0.6,1", "--radii", "0,0.1,0.3",
                 "--shard-size", "4", "--threads", "1", "--device", "cpu", "--no-progress"]
    expected = run(arguments, tmp_path / "in_process")
    assert expected[1]["preprocessing"]["input_space"] == "source image"
    csv, report = run([*arguments, "--ray", "local"], tmp_path / "ray")
    assert csv == expected[0]
    assert comparable(report) == comparable(expected[1])
    assert report["execution"]["backend"] == "ray local"


def test_smoothing_units_keep_the_radius_scale_of_a_model_behind_its_preprocessing():
    """The certificates of a smoothing model behind its preprocessing, joined from shard units, keep the
    preprocessing's operator norm: their radii are in source pixels, as the in-process certificates'."""
    import torch

    from mixclf_ros.evaluation import certification
    from mixclf_ros.evaluation.input_space import PreprocessedModel
    from mixclf_ros.evaluation.model_pair import load_zoo_model
    from mixclf_ros.evaluation.settings import SmoothingOverrides
    from mixclf_ros.evaluation.units import ModelSet, Unit, UnitContext
    from mixclf_ros.vision.preprocess import PreprocessConfig

    cpu = torch.device("cpu")
    smoothing = load_zoo_model("robust_smoothing", cpu)
    wrapped = PreprocessedModel(smoothing, PreprocessConfig(1, 28, 28), (1, 56, 56), cpu).eval()
    assert wrapped.operator_norm != 1.0
    images, labels = torch.rand(4, 1, 56, 56), torch.zeros(4, dtype=torch.long)
    context = UnitContext(ModelSet(smoothing, wrapped), cpu, 4, 0)
    parts = [certification._certificates_unit(context, Unit(f"certify/robust/shard={i}", None, images[i::2],
                                                            labels[i::2],
                                                            {"role": "robust",
                                                             "overrides": SmoothingOverrides(None, 8, 32, 0.01)}),
                                              None) for i in range(2)]
    joined = certification._joined_certificates(parts)
    assert joined.radius_scale == wrapped.operator_norm
    unscaled = certification.Certificates(**{**{name: getattr(joined, name) for name in
                                                certification.CERTIFICATE_FIELDS}, "radius_scale": 1.0})
    assert torch.equal(joined.radius("theorem1", 1.0), unscaled.radius("theorem1", 1.0) / wrapped.operator_norm)


def test_a_checkpoint_is_not_reused_for_another_preprocessing():
    """The same weights behind another preprocessing take other images: the units' fingerprints differ,
    so a rerun with another --resize does not read back the first run's units."""
    import torch

    from mixclf_ros.evaluation.input_space import PreprocessedModel
    from mixclf_ros.evaluation.model_pair import load_zoo_model
    from mixclf_ros.evaluation.settings import Runtime
    from mixclf_ros.evaluation.units import ModelSet, Unit, unit_fingerprint
    from mixclf_ros.vision.preprocess import PreprocessConfig

    cpu = torch.device("cpu")
    standard, robust = load_zoo_model("standard", cpu), load_zoo_model("robust_lipschitz", cpu)
    unit = Unit("certify/robust/shard=0", None, torch.rand(2, 1, 56, 56), torch.zeros(2, dtype=torch.long))
    fingerprints = {resize: unit_fingerprint(unit, ModelSet(standard, PreprocessedModel(
        robust, PreprocessConfig(1, 28, 28, resize=resize), (1, 56, 56), cpu)), Runtime())
        for resize in ("area", "bilinear")}
    assert fingerprints["area"] != fingerprints["bilinear"]


def test_one_shard_is_seeded_as_the_evaluation_always_was():
    """The default (--shard-size 0) keeps every image in one shard seeded with the run's own seed, so
    results recorded before work units existed reproduce; shards of N images derive their seeds."""
    import torch

    from mixclf_ros.evaluation.units import DEFAULT_SHARD_SIZE, Unit, UnitContext, shard_slices, unit_seed

    assert DEFAULT_SHARD_SIZE == 0 and shard_slices(10, 0) == [slice(0, 10)]
    assert shard_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    unit = Unit("std/shard=0", lambda *args: {}, torch.zeros(1), torch.zeros(1))
    cpu = torch.device("cpu")
    assert UnitContext(None, cpu, 4, 123, derive_seeds=False).runtime_for(unit).seed == 123
    assert UnitContext(None, cpu, 4, 123).runtime_for(unit).seed == unit_seed(123, "std/shard=0") != 123
