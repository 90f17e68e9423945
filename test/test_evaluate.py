"""Tests of the evaluation CLI `mixclf-eval` (`mixclf_ros.evaluation`) on tiny models and tiny data.

Models are small MLPs trained for a second on a synthetic 10-class problem (class prototypes plus
noise, 1x12x12 images), so the tests neither need the shipped zoo nor the Fashion-MNIST files.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mixclf_ros.core import lipschitz
from mixclf_ros.evaluation import cli
from mixclf_ros.evaluation.attack_runs import final_iterate_pgd
from mixclf_ros.evaluation.certification import CertifyResult, certified_accuracy_curve, certify_mixture
from mixclf_ros.evaluation.margins import MARGIN_COLUMNS
from mixclf_ros.evaluation.params_file import model_configs_from_parameters
from mixclf_ros.evaluation.settings import (
    AutoAttackSettings,
    CertifySettings,
    EvaluationError,
    PGDSettings,
    Runtime,
    SweepSettings,
)
from mixclf_ros.evaluation.sweep import run_sweep

CLASSES = 10
SIDE = 12
INPUT_SHAPE = (1, SIDE, SIDE)


def prototypes() -> torch.Tensor:
    return torch.rand(CLASSES, *INPUT_SHAPE, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2


def synthetic_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 1, 12, 12) images in [0,1]: the class prototype plus Gaussian noise (std 0.15)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    noise = 0.15 * torch.randn(count, *INPUT_SHAPE, generator=generator)
    return (prototypes()[labels] + noise).clamp(0.0, 1.0), labels


def mlp(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # initial weights independent of what ran before
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, CLASSES))


def train(model: nn.Module, steps: int = 150, seed: int = 0, noise_std: float = 0.0) -> nn.Module:
    """A second of Adam on fresh synthetic batches (optionally with Gaussian input noise)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x, y = synthetic_data(128, int(torch.randint(0, 10**6, (1,), generator=generator)))
        if noise_std:
            x = x + noise_std * torch.randn_like(x)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class Described(nn.Module):
    """A model carrying the attributes of `models.LoadedModel` the evaluation reads."""

    def __init__(self, body: nn.Module, **attributes):
        super().__init__()
        self.body = body
        self.num_classes = CLASSES
        self.input_shape = INPUT_SHAPE
        for key, value in attributes.items():
            setattr(self, key, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def standard() -> nn.Module:
    return train(mlp(), seed=0)


@pytest.fixture(scope="module")
def robust() -> nn.Module:
    return train(linear(), seed=1)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic_data(64, seed=99)


RUNTIME = Runtime(batch_size=64, seed=0)


# ----------------------------------------------------------------------------- sweep


def test_mix_attack_breaks_an_undefended_model(standard, data):
    """g = h = the same undefended network: the end-to-end attack drives every mixture to ~0."""
    x, y = data
    result = run_sweep(standard, standard, x, y, SweepSettings((0.0, 0.3, 0.5, 1.0), PGDSettings("linf", 0.3, 10)),
                       RUNTIME)
    for row in result.rows:
        assert row["clean_accuracy"] >= 0.9
        assert row["mix_pgd_accuracy"] <= 0.05, row


@pytest.mark.parametrize("attack, autoattack", [(PGDSettings("linf", 0.15, 5), True),
                                                 (PGDSettings("l2", 1.5, 5), False)])
def test_attacked_accuracy_never_exceeds_clean_accuracy(standard, robust, data, attack, autoattack):
    x, y = data
    settings = SweepSettings((0.0, 0.25, 0.5, 0.75, 1.0), attack,
                             AutoAttackSettings(iterations=5, target_classes=2) if autoattack else None)
    result = run_sweep(standard, robust, x, y, settings, RUNTIME)
    attacked = ["std_accuracy", "rob_accuracy", "mix_pgd_accuracy"]
    if autoattack:
        attacked += ["mix_apgd_ce_accuracy", "mix_apgd_t_accuracy", "mix_square_accuracy", "mix_worst_accuracy"]
    for row in result.rows:
        for key in attacked:
            assert 0.0 <= row[key] <= row["clean_accuracy"], (key, row)
        if autoattack:
            assert row["mix_worst_accuracy"] <= min(row[key] for key in attacked[2:6])
        assert row["worst_accuracy"] <= min(row[key] for key in attacked)
    assert any(0.0 < row[key] < row["clean_accuracy"] for row in result.rows for key in attacked)
    expected = {"pgd_std", "pgd_rob", "pgd_mix"} | ({"autoattack_apgd_ce_apgd_t_square"} if autoattack else set())
    assert set(result.throughput) == expected


def test_std_attack_at_alpha_zero_equals_the_attack_on_the_standard_model(standard, robust, data):
    x, y = data
    attack = PGDSettings("linf", 0.15, 10)
    result = run_sweep(standard, robust, x, y, SweepSettings((0.0, 1.0), attack), RUNTIME)
    by_alpha = {row["alpha"]: row for row in result.rows}
    # Independently: the same seeded attack on g alone (one shard of every image: the run's seed), scored on g.
    x_adv, _ = final_iterate_pgd(standard, x, y, attack, RUNTIME, "reference")
    with torch.no_grad():
        alone = ((standard(x).argmax(1) == y) & (standard(x_adv).argmax(1) == y)).float().mean().item()
    assert by_alpha[0.0]["std_accuracy"] == pytest.approx(alone, abs=0)
    assert by_alpha[0.0]["std_accuracy"] == result.reference["standard_std_attacked_accuracy"]
    assert by_alpha[1.0]["rob_accuracy"] == result.reference["robust_rob_attacked_accuracy"]
    assert 0.0 < alone < 1.0  # the comparison is not vacuous


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_final_iterate_pgd_stays_in_the_ball_and_the_box(standard, data, norm, eps):
    x, y = data
    x_adv, seconds = final_iterate_pgd(standard, x, y, PGDSettings(norm, eps, 5, restarts=2), RUNTIME, "ball")
    delta = (x_adv - x).flatten(1)
    sizes = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(sizes.max()) <= eps * (1 + 1e-5) and x_adv.min() >= 0 and x_adv.max() <= 1
    assert float(sizes.max()) > 0.5 * eps and seconds > 0


# ----------------------------------------------------------------------------- certify


def test_certified_accuracy_curve_by_hand():
    radii = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0])
    certified_class = torch.tensor([0, 1, 2, -1, 4])
    labels = torch.tensor([0, 1, 9, 3, 4])
    curve = certified_accuracy_curve(radii, certified_class, labels, [0.0, 0.5, 0.75, 3.0, 3.5])
    # sample 0: radius 0 (no certificate); 2: wrong class; 3: abstained. Samples 1 (r=0.5) and 4 (r=3).
    assert curve.tolist() == [0.4, 0.4, 0.2, 0.2, 0.0]


def check_curves(result: CertifyResult) -> None:
    assert result.radii == sorted(result.radii)
    for curve in result.curves:
        accuracy = curve["accuracy"]
        assert all(later <= earlier for earlier, later in itertools.pairwise(accuracy)), curve["model"]
        assert all(0.0 <= value <= curve["clean_accuracy"] + 1e-12 for value in accuracy)
        if curve["alpha"] < 0.5:
            assert max(accuracy) == 0.0 and curve["certified_fraction"] == 0.0


def test_certify_lipschitz_mixture(standard, robust, data):
    x, y = data
    constant = lipschitz.probability_lipschitz_bound(robust, "l2", INPUT_SHAPE)
    described = Described(robust, kind="lipschitz", norm="l2", lipschitz_constant=constant)
    result = certify_mixture(standard, described, x, y, CertifySettings((0.3, 0.5, 0.75, 1.0), num_radii=21), RUNTIME)
    check_curves(result)
    by_alpha = {curve["alpha"]: curve for curve in result.curves if curve["model"] == "mixture"}
    assert by_alpha[1.0]["certified_fraction"] > 0.5  # the test exercises real certificates
    # A larger weight on h certifies at least as much (Theorem 1's radius grows with alpha).
    assert all(a <= b for a, b in zip(by_alpha[0.75]["accuracy"], by_alpha[1.0]["accuracy"]))
    assert result.baseline["label"] == "robust model"


def test_certify_smoothing_mixture_with_matched_baseline(standard, data):
    x, y = data
    base = train(linear(), seed=2, noise_std=0.25)
    described = Described(base, kind="smoothing", sigma=0.25, n0=8, n=64, beta=0.01)
    settings = CertifySettings((0.4, 0.6, 1.0), num_radii=11, baseline_sigma=0.12)
    result = certify_mixture(standard, described, x[:32], y[:32], settings, RUNTIME)
    check_curves(result)
    theorems = {(curve["model"], curve["theorem"]) for curve in result.curves}
    assert {("mixture", "theorem1"), ("mixture", "theorem2"), ("baseline", "theorem2"),
            ("mixture_matched", "theorem1")} <= theorems
    assert 0.5 <= result.baseline["matched_alpha"] <= 1.0
    # Theorem 2 certifies at least what Theorem 1 certifies from the same bounds, alpha = 1.
    one = {curve["theorem"]: curve for curve in result.curves if curve["model"] == "mixture"
           and curve["alpha"] == 1.0}
    assert all(a <= b for a, b in zip(one["theorem1"]["accuracy"], one["theorem2"]["accuracy"]))


def test_certify_warns_when_every_radius_is_below_one_grey_level(standard, robust, data):
    x, y = data
    constant = lipschitz.probability_lipschitz_bound(robust, "l2", INPUT_SHAPE)
    sound = Described(robust, kind="lipschitz", norm="l2", lipschitz_constant=constant)
    assert certify_mixture(standard, sound, x, y, CertifySettings((0.6, 1.0), num_radii=5), RUNTIME).warnings == []
    # The same network with a constant 1000x larger: some radii stay positive, all below 1/255.
    loose = Described(robust, kind="lipschitz", norm="l2", lipschitz_constant=1000 * constant)
    result = certify_mixture(standard, loose, x, y, CertifySettings((0.6, 1.0), num_radii=5), RUNTIME)
    mixture = [curve for curve in result.curves if curve["model"] == "mixture"]
    assert max(curve["certified_fraction"] for curve in mixture) > 0.5  # r > 0 for most samples ...
    assert max(curve["median_radius"] for curve in mixture) < 1 / 255  # ... but tiny
    assert sum("below one grey level" in warning for warning in result.warnings) == 1


def test_certify_warns_when_no_sample_can_reach_one_grey_level_whatever_the_data(standard, robust, data):
    """As the node does: the largest radius the model can ever certify (Theorem 1 at a one-hot robust
    output), against the node's default safe_radius of one grey level, with both numbers."""
    from mixclf_ros.core.certify import max_lipschitz_radius

    x, y = data
    constant = lipschitz.probability_lipschitz_bound(robust, "l2", INPUT_SHAPE)
    sound = Described(robust, kind="lipschitz", norm="l2", lipschitz_constant=constant)
    assert max_lipschitz_radius(constant, 0.6, 10) > 1 / 255
    assert certify_mixture(standard, sound, x, y, CertifySettings((0.3, 0.6, 1.0), num_radii=5), RUNTIME).warnings == []
    loose = Described(robust, kind="lipschitz", norm="l2", lipschitz_constant=1000 * constant)
    result = certify_mixture(standard, loose, x, y, CertifySettings((0.3, 0.6, 1.0), num_radii=5), RUNTIME)
    unreachable = [warning for warning in result.warnings if warning.startswith("no frame can be safe")]
    assert len(unreachable) == 2  # alpha 0.6 and 1; none for 0.3, where no certificate is meant
    for alpha, warning in zip((0.6, 1.0), unreachable):
        largest = max_lipschitz_radius(1000 * constant, alpha, 10)
        assert largest < 1 / 255
        assert f"alpha {alpha:g}" in warning and f"{largest:.6g}" in warning and f"{1 / 255:.6g}" in warning


# ----------------------------------------------------------------------------- command line

TINY_MODULE = "mixclf_eval_tiny_models"
TINY_SOURCE = f'''"""Tiny architectures for test_evaluate (loaded through 'package.module:Callable')."""
from torch import nn


def tiny_mlp(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear({SIDE * SIDE}, 32), nn.ReLU(), nn.Linear(32, num_classes))


def tiny_linear(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear({SIDE * SIDE}, num_classes))
'''


def model_keys(architecture: str, weights: Path, kind: str, **extra) -> dict:
    return {"architecture": f"{TINY_MODULE}:{architecture}", "weights": str(weights), "num_classes": CLASSES,
            "input_channels": 1, "input_height": SIDE, "input_width": SIDE, "mean": [0.0], "std": [1.0],
            "kind": kind, **extra}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, standard, robust) -> dict[str, Path]:
    """Weights, a tiny-architecture module on sys.path, ROS parameters files and an image folder."""
    import cv2
    import yaml

    root = tmp_path_factory.mktemp("evaluate")
    (root / f"{TINY_MODULE}.py").write_text(TINY_SOURCE)
    sys.path.insert(0, str(root))
    torch.save(standard.state_dict(), root / "standard.pt")
    torch.save(robust.state_dict(), root / "robust.pt")
    torch.save(train(linear(), seed=2, noise_std=0.25).state_dict(), root / "smooth.pt")

    # Nested keys for g, dotted keys for h, a node-specific section overriding the wildcard one.
    lipschitz_robust = model_keys("tiny_linear", root / "robust.pt", "lipschitz", norm="l2")
    params = {"/**": {"ros__parameters": {
        "alpha": 0.6,
        "standard_model": model_keys("tiny_mlp", root / "standard.pt", "standard"),
        **{f"robust_model.{key}": value for key, value in lipschitz_robust.items()},
        "robust_model.input_width": 99}},
        "mixclf": {"ros__parameters": {"robust_model": {"input_width": SIDE}}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    smoothing_robust = model_keys("tiny_linear", root / "smooth.pt", "smoothing", sigma=0.25, n0=8, n=48)
    (root / "smoothing.yaml").write_text(yaml.safe_dump({"/**": {"ros__parameters": {
        "confidence": 0.99, "standard_model": params["/**"]["ros__parameters"]["standard_model"],
        "robust_model": smoothing_robust}}}))

    images, labels = synthetic_data(64, seed=7)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / "images" / str(int(label))  # class index (the tiny models have no class names)
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{index:03d}.png"), (image[0] * 255).round().byte().numpy())
    yield {"root": root, "params": root / "params.yaml", "smoothing": root / "smoothing.yaml",
           "images": root / "images"}
    sys.path.remove(str(root))
    sys.modules.pop(TINY_MODULE, None)


def run_cli(workspace, out: Path, *arguments: str) -> None:
    common = ["--image-folder", str(workspace["images"]), "--out", str(out), "--device", "cpu",
              "--no-progress", "--batch-size", "64"]
    assert cli.main([*arguments, *common]) == 0


def test_read_ros_parameters_nested_dotted_and_node_overrides(workspace):
    configs = model_configs_from_parameters(workspace["params"])
    assert configs["standard_model"]["architecture"] == f"{TINY_MODULE}:tiny_mlp"
    assert configs["robust_model"]["kind"] == "lipschitz"
    assert configs["robust_model"]["input_width"] == SIDE  # the 'mixclf' section wins over '/**'
    smoothing = model_configs_from_parameters(workspace["smoothing"])["robust_model"]
    assert smoothing["beta"] == pytest.approx(0.01)  # 1 - confidence, as the node does


def test_parameters_file_is_read_with_the_model_schema(workspace, tmp_path, capsys):
    """beta comes from the node's confidence; what the node refuses is refused here, by name, with the
    same reasons (one check): keys the model's kind does not use, beta itself, unknown keys and
    misspelled sections (named, not reported as a missing section)."""
    import yaml

    from mixclf_ros.evaluation.params_file import read_ros_parameters
    from mixclf_ros.runtime.node_parameters import refused_parameters

    params = yaml.safe_load(workspace["params"].read_text())
    section = params["/**"]["ros__parameters"]
    section.update({"confidence": 0.9, "use_sim_time": False, "qos_overrides./image.subscription.depth": 5})
    (tmp_path / "allowed.yaml").write_text(yaml.safe_dump(params))
    assert model_configs_from_parameters(tmp_path / "allowed.yaml")["robust_model"]["kind"] == "lipschitz"
    for name, value, reason in [
            ("robust_model.sigma", 0.5, "robust_model.sigma: not used by a model of kind 'lipschitz'"),
            ("robust_model.beta", 0.2, "robust_model.beta: the node takes it from its parameter confidence"),
            ("robust_model.input_heigth", 9, "(nearest known: robust_model.input_height)"),
            ("alhpa", 0.9, "alhpa: not a parameter of the node (nearest known: alpha)")]:
        wrong = yaml.safe_load(workspace["params"].read_text())
        wrong["/**"]["ros__parameters"][name] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(wrong))
        with pytest.raises(EvaluationError) as refused:
            model_configs_from_parameters(path)
        assert reason in str(refused.value)
        assert str(refused.value).endswith("\n  ".join(refused_parameters(read_ros_parameters(path))))
    smoothing = yaml.safe_load(workspace["smoothing"].read_text())
    smoothing["/**"]["ros__parameters"]["standard_modle"] = smoothing["/**"]["ros__parameters"].pop("standard_model")
    (tmp_path / "section.yaml").write_text(yaml.safe_dump(smoothing))
    assert cli.main(["margins", "--params", str(tmp_path / "section.yaml"), "--out", str(tmp_path),
                     "--image-folder", str(workspace["images"]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "standard_modle.* (" in err and "(nearest known: standard_model.*)" in err, err
    assert "no 'standard_model.*' parameters" not in err


def test_cli_sweep(workspace, tmp_path, capsys):
    run_cli(workspace, tmp_path, "sweep", "--params", str(workspace["params"]), "--alphas", "0,0.5,1",
            "--eps", "0.15", "--steps", "3", "--attack-limit", "32", "--name", "sweep_linf")
    rows = (tmp_path / "sweep_linf.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("alpha,clean_accuracy_all,clean_accuracy")
    report = json.loads((tmp_path / "sweep_linf.json").read_text())
    assert report["num_clean"] == 64 and report["num_attacked"] == 32
    assert report["attack"] == {"norm": "linf", "eps": 0.15, "steps": 3, "step_size": 0.125, "restarts": 1}
    assert set(report["throughput_images_per_second"]) == {"pgd_std", "pgd_rob", "pgd_mix"}
    assert (tmp_path / "sweep_linf.png").stat().st_size > 10_000
    assert "MIX" in capsys.readouterr().out


def test_cli_margins(workspace, tmp_path):
    run_cli(workspace, tmp_path, "margins", "--params", str(workspace["params"]), "--norm", "l2",
            "--eps", "1.5", "--steps", "3", "--limit", "32", "--name", "margins_l2")
    table = json.loads((tmp_path / "margins_l2.json").read_text())["table"]
    assert [row["model"] for row in table] == ["g", "h"]
    for row in table:
        assert row["count_clean_correct"] + row["count_clean_incorrect"] == 32
        assert all(value is None or 0.0 <= value <= 1.0 for key, value in row.items()
                   if key in MARGIN_COLUMNS)
    assert (tmp_path / "margins_l2.png").exists() and (tmp_path / "margins_l2.csv").exists()


@pytest.mark.parametrize("params, extra", [("params", []),
                                           ("smoothing", ["--sigma", "0.3", "--baseline-sigma", "0.12"])])
def test_cli_certify(workspace, tmp_path, params, extra):
    run_cli(workspace, tmp_path, "certify", "--params", str(workspace[params]), "--alphas", "0.3,0.6,1",
            "--num-radii", "11", "--limit", "32", "--name", "cert", *extra)
    report = json.loads((tmp_path / "cert.json").read_text())
    assert len(report["radii"]) == 11
    for curve in report["curves"]:
        accuracy = curve["accuracy"]
        assert all(later <= earlier for earlier, later in itertools.pairwise(accuracy))
        if curve["alpha"] < 0.5:
            assert max(accuracy) == 0.0
    theorems = {curve["theorem"] for curve in report["curves"]}
    assert theorems == ({"theorem1"} if params == "params" else {"theorem1", "theorem2"})
    if params == "smoothing":
        assert report["certificate"]["sigma"] == 0.3 and report["certificate"]["beta"] == pytest.approx(0.01)
    lines = (tmp_path / "cert.csv").read_text().splitlines()
    assert lines[0] == "model,theorem,alpha,radius,certified_accuracy"
    assert len(lines) == 1 + 11 * len(report["curves"])
    assert (tmp_path / "cert.png").exists()


def test_cli_design(workspace, tmp_path):
    run_cli(workspace, tmp_path, "design", "--params", str(workspace["params"]), "--trusts", "one,grad_g_i",
            "--gammas", "0,1", "--steps", "2", "--eps", "0.15", "--limit", "16", "--name", "design_linf")
    rows = json.loads((tmp_path / "design_linf.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        assert 0.0 <= row["attacked_accuracy"] <= row["clean_accuracy"] <= 1.0
    # gamma = 0 is g alone whatever the trust term and space.
    at_zero = {row["clean_accuracy"] for row in rows if row["gamma"] == 0.0}
    assert len(at_zero) == 1
    assert (tmp_path / "design_linf.png").exists() and (tmp_path / "design_linf.csv").exists()
    # --resume keeps those 8 points and computes only the new trust term's.
    run_cli(workspace, tmp_path, "design", "--params", str(workspace["params"]), "--trusts", "grad_max_g",
            "--gammas", "0,1", "--steps", "2", "--eps", "0.15", "--limit", "16", "--resume", "--name",
            "design_linf")
    resumed = json.loads((tmp_path / "design_linf.json").read_text())["rows"]
    assert resumed[:8] == rows and {row["trust"] for row in resumed[8:]} == {"grad_max_g"}
    assert len(resumed) == 12
    assert cli.main(["design", "--params", str(workspace["params"]), "--image-folder", str(workspace["images"]),
                          "--out", str(tmp_path), "--no-progress", "--steps", "3", "--eps", "0.15",
                          "--limit", "16", "--resume", "--name", "design_linf"]) == 2  # other attack settings


def test_cli_image_folder_labels_come_from_the_folder_names(workspace, tmp_path, capsys):
    """Folders zero..nine name no class of a model without class names: a clear error (exit 2), not
    a silently relabelled data set; an 11th folder too; a class map makes them usable."""
    import shutil

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    renamed = tmp_path / "words"
    for index, word in enumerate(words):
        shutil.copytree(workspace["images"] / str(index), renamed / word)
    arguments = ["margins", "--params", str(workspace["params"]), "--image-folder", str(renamed), "--steps", "1",
                 "--out", str(tmp_path), "--no-progress", "--device", "cpu", "--name", "margins_linf"]
    assert cli.main(arguments) == 2
    assert "name no class of the model" in capsys.readouterr().err
    (tmp_path / "map.yaml").write_text("".join(f"{word}: {index}\n" for index, word in enumerate(words)))
    assert cli.main([*arguments, "--class-map", str(tmp_path / "map.yaml")]) == 0
    mapped = json.loads((tmp_path / "margins_linf.json").read_text())
    assert mapped["preprocessing"]["folders"] == {word: str(index) for index, word in enumerate(words)}
    shutil.copytree(workspace["images"] / "0", renamed / "ten")
    assert cli.main([*arguments, "--class-map", str(tmp_path / "map.yaml"), "--overwrite"]) == 2
    assert "ten" in capsys.readouterr().err


def test_cli_image_folder_uses_the_models_crop_and_resize(workspace, tmp_path):
    """--params' <model>.crop_height / crop_width / resize (as the node reads them) preprocess --image-folder."""
    import yaml

    params = yaml.safe_load(workspace["params"].read_text())
    for prefix in ("standard_model", "robust_model"):
        params["/**"]["ros__parameters"].update({f"{prefix}.crop_height": 8, f"{prefix}.crop_width": 10,
                                                 f"{prefix}.resize": "bilinear"})
    (tmp_path / "cropped.yaml").write_text(yaml.safe_dump(params))
    run_cli(workspace, tmp_path, "margins", "--params", str(tmp_path / "cropped.yaml"), "--steps", "1",
            "--limit", "8", "--name", "margins_linf")
    report = json.loads((tmp_path / "margins_linf.json").read_text())
    assert {key: report["preprocessing"][key] for key in ("crop_height", "crop_width", "resize", "path")} == {
        "crop_height": 8, "crop_width": 10, "resize": "bilinear", "path": "vision.preprocess.Preprocessor"}


def test_cli_default_data_is_fashion_mnist(workspace, tmp_path):
    """Without --image-folder: the Fashion-MNIST test set (28x28, resized to the tiny models' 12x12)."""
    from mixclf_ros import data

    try:
        data.load_fashion_mnist("test")
    except data.DatasetMissingError:
        pytest.skip("Fashion-MNIST not installed")
    assert cli.main(["margins", "--params", str(workspace["params"]), "--limit", "16", "--steps", "1",
                          "--out", str(tmp_path), "--no-progress", "--device", "cpu", "--name", "margins_linf"]) == 0
    report = json.loads((tmp_path / "margins_linf.json").read_text())
    assert report["data"] == {"source": "Fashion-MNIST test set", "available": 10_000, "evaluated": 16,
                              "subset": "seeded random subset (seed 0)"}


def test_cli_reports_configuration_errors(tmp_path, capsys):
    assert cli.main(["margins", "--standard", "no_such_model", "--out", str(tmp_path)]) == 2
    assert "no_such_model" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_does_not_import_ros():
    import subprocess

    code = ("import sys, mixclf_ros.evaluation.cli, mixclf_ros.evaluation.commands; "
            "assert not any(m.startswith('rclpy') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
def test_mixclf_eval_is_on_path_after_sourcing_env_sh(tmp_path):
    """The documented commands start with `source env.sh; mixclf-eval ...`, from any directory."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    commands = f"source '{repo}/env.sh' && mixclf-eval --help && mixclf-eval certify --help"
    result = subprocess.run(["bash", "-c", commands], capture_output=True, text=True, cwd=tmp_path, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage: mixclf-eval" in result.stdout and "--radii" in result.stdout
