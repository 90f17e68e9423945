"""The three examples of docs/BRING_YOUR_OWN.md, run as written on stand-in weights: each example's
parameters file (weights and sha256 switched to the stand-ins) in the installed node over real DDS,
and the guide's mixclf-eval command; the certificates behave as the guide says."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from rosutil import RosClient, image_message, node_process

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

GUIDE = REPO_ROOT / "docs" / "BRING_YOUR_OWN.md"
EXAMPLES = {"a": "torchvision_lipschitz", "b": "smoothing", "c": "empirical"}
STANDIN_CLASS = 3  # examples/standin_weights.py: the robust stand-ins favour this class


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        from standin_weights import write_standins

        yield write_standins(tmp_path_factory.mktemp("my_models"))
    finally:
        sys.path.remove(str(REPO_ROOT / "examples"))


def guide_commands(letter: str) -> tuple[str, str]:
    """(node command, mixclf-eval command) of example `letter` in the guide's bash blocks."""
    text = GUIDE.read_text()
    section = text[text.index(f"## ({letter})"):]
    section = section[:section.index("\n## ", 1)]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    [node] = [line for line in lines if "mixclf_node" in line]
    [evaluation] = [line for line in lines if "mixclf-eval" in line]
    return node, evaluation


def standin_parameters(name: str, standins: dict[str, Path], directory: Path) -> Path:
    """The example's parameters file as written, with the weights and sha256 of the stand-ins."""
    document = yaml.safe_load((REPO_ROOT / "config" / "examples" / f"{name}.yaml").read_text())
    parameters = document["/**"]["ros__parameters"]
    for prefix in ("standard_model", "robust_model"):
        weights = standins[Path(parameters[prefix]["weights"]).stem]
        parameters[prefix].update(weights=str(weights), sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def python_path(command: str) -> str:
    """PYTHONPATH as the guide's command sets it, expanded from the repository root."""
    match = re.match(r"PYTHONPATH=(\S+) ", command)
    current = os.environ.get("PYTHONPATH", "")
    if not match:
        return current
    return match.group(1).replace("$PWD", str(REPO_ROOT)).replace("$PYTHONPATH", current)




@pytest.mark.parametrize("letter", sorted(EXAMPLES))
def test_guide_example_in_the_node(letter, standins, tmp_path):
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article
    from mixclf_ros.msg import CertifiedClassification as Msg

    name = EXAMPLES[letter]
    node_command, _ = guide_commands(letter)
    assert re.fullmatch(r"(PYTHONPATH=\S+ )?install/mixclf_ros/lib/mixclf_ros/mixclf_node --ros-args "
                        rf"--params-file config/examples/{name}\.yaml", node_command), node_command
    params = standin_parameters(name, standins, tmp_path)
    env = {"PYTHONPATH": python_path(node_command)}
    images, _ = load_fashion_mnist("test")
    import rclpy

    domain = int(os.environ["ROS_DOMAIN_ID"]) + 110 + ord(letter) - ord("a")
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        with node_process("mixclf_node", "--params-file", str(params), "-p", "max_image_age:=0.0", "-p",
                          "safe_radius:=0.0", "-p", "qos_overrides./image.subscription.reliability:=reliable",
                          log_path=tmp_path / "mixclf_node.log", env={**env, "ROS_DOMAIN_ID": str(domain)}):
            client = RosClient(context, reliable=True)
            try:
                client.wait_until_ready(timeout=180.0, probe_timeout=10.0)
                results = []
                for index in (0, 1, 2):
                    message = image_message(embed_article(images[index]), f"frame-{index}", client.node)
                    client.image_publisher.publish(message)
                    results.append(client.wait_for({message.header.frame_id}, timeout=120)[message.header.frame_id])
            finally:
                client.close()
    finally:
        rclpy.try_shutdown(context=context)
    for result in results:
        assert result.status == Msg.STATUS_OK, result.status_message
        if letter == "c":  # no certificate, never safe
            assert result.certificate_method == Msg.CERTIFICATE_NONE
            assert (result.certified_radius, result.image_radius, result.confidence, result.safe) == (0, 0, 0, False)
            continue
        method = Msg.CERTIFICATE_LIPSCHITZ if letter == "a" else Msg.CERTIFICATE_RANDOMIZED_SMOOTHING
        assert result.certificate_method == method and result.norm == Msg.NORM_L2
        assert result.certified_radius > 0 and result.class_id == result.robust_class_id == STANDIN_CLASS
        assert result.confidence == pytest.approx(1.0 if letter == "a" else 0.999)
        # 480x480 crop, area resize to 32x32: ||P||_2 = 1/15, so the frame radius is 15 times larger, less the
        # float rounding of P (under 1e-4 at 32x32x3)
        # (and the rounding of both radii to float32 towards zero)
        low = 15 * (result.certified_radius - 1e-4) * (1 - 1e-6)
        assert low <= result.image_radius <= 15 * result.certified_radius


@pytest.mark.parametrize("letter", sorted(EXAMPLES))
def test_guide_example_evaluation(letter, standins, tmp_path):
    name = EXAMPLES[letter]
    _, command = guide_commands(letter)
    params = standin_parameters(name, standins, tmp_path)
    assert f"--params config/examples/{name}.yaml" in command
    command = command.replace(f"config/examples/{name}.yaml", shlex.quote(str(params)))
    command += f" --device cpu --threads 1 --no-progress --out {shlex.quote(str(tmp_path))} --name run"
    result = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run.json").read_text())
    if letter == "c":  # both models preprocess alike: evaluated at their common input
        assert "input_space" not in report["preprocessing"] and report["preprocessing"]["output"] == [3, 224, 224]
        rows = report["rows"]
        assert [row["alpha"] for row in rows] == [0.0, 0.6, 1.0]
        assert all(row["worst_accuracy"] <= row["clean_accuracy"] for row in rows)
        return
    assert report["preprocessing"]["input_space"] == "source image"  # g at 224 RGB, h at 32x32
    assert report["preprocessing"]["standard"]["output"] == [3, 224, 224]
    curves = {(curve["model"], curve["theorem"], curve["alpha"]): curve for curve in report["curves"]}
    theorem = "theorem1" if letter == "a" else "theorem2"
    # every image of the favoured class is certified from alpha 0.6 on; nothing at alpha 0.5 for Theorem 1
    for alpha in (0.6, 1.0):
        assert curves[("mixture", theorem, alpha)]["accuracy"][0] > 0
    if letter == "a":
        assert curves[("mixture", "theorem1", 0.5)]["accuracy"][0] == 0
