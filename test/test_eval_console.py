"""What `mixclf-eval` says on the console (not only in its JSON), and how it names its outputs: empty
class folders, a camera crop not applied, an estimated certificate, runs that never overwrite each other."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_evaluate import robust, standard, workspace  # noqa: F401  (fixtures)

from mixclf_ros.evaluation import cli


def margins(workspace, out, *extra: str) -> list[str]:  # noqa: F811
    return ["margins", "--params", str(workspace["params"]), "--steps", "1", "--limit", "8", "--out", str(out),
            "--device", "cpu", "--no-progress", *extra]


def test_an_empty_class_folder_is_a_console_warning(workspace, tmp_path, capsys):  # noqa: F811
    images = tmp_path / "images"
    shutil.copytree(workspace["images"], images)
    shutil.rmtree(images / "3")
    (images / "3").mkdir()
    assert cli.main(margins(workspace, tmp_path, "--image-folder", str(images), "--name", "run")) == 0
    assert "class folder 3 has no image; class 3 is not evaluated" in capsys.readouterr().err
    assert json.loads((tmp_path / "run.json").read_text())["data"]["warnings"] == [
        f"--image-folder {images}: class folder 3 has no image; class 3 is not evaluated"]


def test_a_camera_crop_not_applied_to_fashion_mnist_is_said_on_the_console(workspace, tmp_path, capsys):  # noqa: F811
    from mixclf_ros import data

    try:
        data.load_fashion_mnist("test")
    except data.DatasetMissingError:
        pytest.skip("Fashion-MNIST not installed")
    params = yaml.safe_load(workspace["params"].read_text())
    params["/**"]["ros__parameters"].update({"robust_model.crop_height": 64, "robust_model.crop_width": 48})
    cropped = tmp_path / "cropped.yaml"
    cropped.write_text(yaml.safe_dump(params))
    arguments = margins(workspace, tmp_path, "--name", "run")
    arguments[arguments.index("--params") + 1] = str(cropped)
    assert cli.main(arguments) == 0
    error = capsys.readouterr().err
    assert ("the robust model's crop_height/crop_width 64x48 (source pixels of a camera frame) is not applied to the "
            "28x28 Fashion-MNIST images (the images are smaller than the crop)") in error
    assert "standard model's crop" not in error


def test_default_output_names_come_from_the_command_and_a_run_id_and_never_overwrite(workspace, tmp_path,  # noqa: F811
                                                                                  capsys):
    folder = ["--image-folder", str(workspace["images"])]
    assert cli.main(margins(workspace, tmp_path, *folder)) == 0
    first = capsys.readouterr()
    [stem] = [path.stem for path in tmp_path.glob("*.json")]
    assert re.fullmatch(r"margins_\d{8}T\d{6}Z", stem), stem
    assert f"writing {tmp_path / stem}.*" in first.err and f"--name {stem}" in first.err
    written = (tmp_path / f"{stem}.json").read_bytes()
    assert cli.main(margins(workspace, tmp_path, *folder)) == 0  # a second run, maybe within the same second
    assert len(list(tmp_path.glob("*.json"))) == 2 and (tmp_path / f"{stem}.json").read_bytes() == written
    # A given name is refused when its results exist, replaced with --overwrite.
    assert cli.main(margins(workspace, tmp_path, *folder, "--name", stem)) == 2
    refused = capsys.readouterr().err
    assert f"--name {stem}: " in refused and "--overwrite" in refused
    assert (tmp_path / f"{stem}.json").read_bytes() == written
    assert cli.main(margins(workspace, tmp_path, *folder, "--name", stem, "--overwrite")) == 0
    assert f"--overwrite: replacing {tmp_path / stem}.csv" in capsys.readouterr().err


def test_a_run_id_taken_already_gets_a_suffix_and_says_so(workspace, tmp_path, capsys, monkeypatch):  # noqa: F811
    from mixclf_ros.evaluation import output_names

    monkeypatch.setattr(output_names, "run_id", lambda: "20250101T000000Z")
    (tmp_path / "margins_20250101T000000Z.json").write_text("{}")
    assert cli.main(margins(workspace, tmp_path, "--image-folder", str(workspace["images"]))) == 0
    assert (tmp_path / "margins_20250101T000000Z.json").read_text() == "{}"
    assert (tmp_path / "margins_20250101T000000Z_2.json").exists()
    assert (f"{tmp_path / 'margins_20250101T000000Z'}.* exist(s) already, so writing "
            f"{tmp_path / 'margins_20250101T000000Z_2'}.*") in capsys.readouterr().err


def test_certify_subtracts_the_rounding_error_bound_or_says_its_radii_are_an_estimate(workspace, tmp_path,  # noqa: F811
                                                                                     capsys):
    """A computed constant: the plan bounds the forward's rounding error and certify subtracts it, as
    the node does. A declared constant (no plan): the radii are an estimate, and certify says so."""
    import yaml

    def certify_run(params: Path, name: str) -> tuple[dict, str]:
        assert cli.main(["certify", "--params", str(params), "--alphas", "1", "--num-radii", "3", "--limit", "8",
                         "--image-folder", str(workspace["images"]), "--out", str(tmp_path), "--device", "cpu",
                         "--no-progress", "--name", name]) == 0
        return json.loads((tmp_path / f"{name}.json").read_text()), capsys.readouterr().err

    bounded, console = certify_run(workspace["params"], "bounded")
    assert bounded["certificate"]["rounding_error"] == "bounded" and "rounding_error" not in bounded
    assert "no rounding-error bound" not in console
    declared = yaml.safe_load(workspace["params"].read_text())
    declared["/**"]["ros__parameters"]["robust_model.lipschitz_constant"] = 50.0
    (tmp_path / "declared.yaml").write_text(yaml.safe_dump(declared))
    estimated, console = certify_run(tmp_path / "declared.yaml", "declared")
    assert estimated["certificate"]["rounding_error"] == "estimated"
    assert "no rounding-error bound" in console and "no rounding-error bound" in estimated["rounding_error"]
