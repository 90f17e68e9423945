"""Two models, two input sizes, one camera frame: a torchvision resnet18 (224x224 RGB) as g mixed with
the zoo's Lipschitz model (28x28 grey) as h, in the library, over real DDS, and in mixclf-eval; and a
node that cannot configure, which says why on every frame."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from rosutil import RosClient, image_message, node_process, node_with_client

CONFIG = REPO_ROOT / "config" / "mixclf.yaml"
RESNET_KEYS = {"architecture": "torchvision:resnet18", "input_channels": 3, "input_height": 224, "input_width": 224,
               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "kind": "standard"}


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    """Random resnet18 weights, 10 classes (an equality test needs no trained g)."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Demo camera frames (640x480 RGB, the article at 17x in the centre)."""
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article

    images, _ = load_fashion_mnist("test")
    return [embed_article(images[index]) for index in (0, 1, 2, 3, 5, 8)]


def resnet_config(weights: Path) -> dict:
    return {**RESNET_KEYS, "weights": str(weights), "crop_height": 476, "crop_width": 476}


def robust_config() -> dict:
    from mixclf_ros.models import zoo_config
    from mixclf_ros.runtime.node_parameters import MODELS

    return {**zoo_config(MODELS["robust_model"]), "crop_height": 476, "crop_width": 476}  # the shipped h


def offline_classifier(standard_config: dict):
    from mixclf_ros.models import load_model
    from mixclf_ros.runtime.classifier import CertifiedClassifier

    return CertifiedClassifier(load_model(standard_config), load_model(robust_config()), None, torch.device("cpu"),
                               seed=0)


@pytest.mark.slow
def test_each_model_gets_its_own_input_and_the_certificate_only_the_robust_ones(resnet_weights, frames):
    """g sees 3x224x224, h 1x28x28, from the same frame; certified radius and image radius are those
    of the same h mixed with the zoo's 28x28 grey g (Lemma 1: g's input does not enter them)."""
    from mixclf_ros.models import zoo_config
    from mixclf_ros.runtime.classifier import LiveSettings, Status
    from mixclf_ros.vision.decode import DecodedImage

    decoded = [DecodedImage(frame, "rgb", 1 / 255) for frame in frames]
    settings = LiveSettings(alpha=0.6, safe_radius=0.0)
    mixed = offline_classifier(resnet_config(resnet_weights))
    seen = []
    mixed.standard.register_forward_hook(lambda module, inputs, output: seen.append(tuple(inputs[0].shape)))
    results = mixed.classify(decoded, settings)
    assert seen == [(len(frames), 3, 224, 224)]
    reference = offline_classifier({**zoo_config("standard"), "crop_height": 476, "crop_width": 476})
    expected = reference.classify(decoded, settings)
    assert all(result.status == Status.OK for result in results), [r.status_message for r in results]
    assert any(result.certified_radius > 0 for result in results)
    for result, other in zip(results, expected):
        assert (result.certified_radius, result.image_radius, result.robust_class_id) == \
            (other.certified_radius, other.image_radius, other.robust_class_id)
        if result.certified_radius > 0:  # a positive radius: the mixture predicts h's class
            assert result.class_id == result.robust_class_id


@pytest.mark.ros
def test_node_results_equal_the_offline_classifier(tmp_path, resnet_weights, frames):
    """Over real DDS: the node with resnet18 (224 RGB) as g and the zoo's Lipschitz model (28 grey) as h
    publishes, frame by frame, what `CertifiedClassifier` computes offline on the same messages."""
    import yaml

    from mixclf_ros.models import sha256_of
    from mixclf_ros.msg import CertifiedClassification as Msg
    from mixclf_ros.ros.messages import decode_message
    from mixclf_ros.runtime.classifier import LiveSettings

    # the user's own weights with no sha256 (the shipped file's standard_model section replaced):
    # the zoo model's hash must not follow them
    shipped = yaml.safe_load(CONFIG.read_text())
    shipped["/**"]["ros__parameters"]["standard_model"] = {**resnet_config(resnet_weights),
                                                           "weights": str(resnet_weights)}
    params = tmp_path / "resnet.yaml"
    params.write_text(yaml.safe_dump(shipped))
    overrides = ["-p", "seed:=0", "-p", "max_image_age:=0.0", "-p", "torch_threads:=1",
                 "-p", "qos_overrides./image.subscription.reliability:=reliable"]
    offline = offline_classifier(resnet_config(resnet_weights))
    settings = LiveSettings(alpha=0.6, safe_radius=0.0)
    log = tmp_path / "mixclf_node.log"
    with node_with_client("--params-file", str(params), *overrides, log_path=log,
                          reliable=True, domain_id=int(os.environ["ROS_DOMAIN_ID"]) + 102) as (client, _):
        compared = 0
        for index, frame in enumerate(frames):
            message = image_message(frame, f"frame-{index}", client.node)
            client.image_publisher.publish(message)  # one at a time: batches of one, as offline
            published = client.wait_for({message.header.frame_id}, timeout=120)[message.header.frame_id]
            [expected] = offline.classify([decode_message(message)], settings)
            assert published.status == Msg.STATUS_OK, published.status_message
            assert published.class_id == expected.class_id
            assert published.probability == np.float32(expected.probability)
            assert published.certified_radius == expected.certified_radius
            assert published.image_radius == expected.image_radius
            assert published.standard_class_id == expected.standard_class_id
            compared += expected.certified_radius > 0
        assert compared >= 1  # some frames are certified, so the radii compared are not all zero
    assert f'pin it: standard_model.sha256: "{sha256_of(resnet_weights)}"' in log.read_text()


def diagnostics_status(client: RosClient, suffix: str, timeout: float = 30.0):
    """The node's status whose name ends with `suffix`, from the next /diagnostics message."""
    from diagnostic_msgs.msg import DiagnosticArray

    arrays: list[DiagnosticArray] = []
    subscription = client.node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    try:
        deadline = time.monotonic() + timeout
        while not arrays and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.node.destroy_subscription(subscription)
    assert arrays, "no /diagnostics message"
    [status] = [status for status in arrays[-1].status if status.name.endswith(suffix)]
    return status


def assert_unconfigured_with(tmp_path: Path, ros_args: list[str], reasons: list[str], domain_offset: int) -> None:
    """Starts the node with `ros_args`: every frame gets NOT_READY with each of `reasons` in its
    status message, /diagnostics an ERROR with them; the node stays up, unconfigured, and exits 0."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticStatus

    from mixclf_ros.msg import CertifiedClassification as Msg

    domain = int(os.environ["ROS_DOMAIN_ID"]) + domain_offset
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        with node_process("mixclf_node", *ros_args, "-p", "qos_overrides./image.subscription.reliability:=reliable",
                          log_path=tmp_path / "mixclf_node.log", env={"ROS_DOMAIN_ID": str(domain)}) as process:
            client = RosClient(context, reliable=True)
            try:
                results = {}
                deadline = time.monotonic() + 90
                index = 0
                while len(results) < 3 and time.monotonic() < deadline:
                    frame_id = f"frame-{index}"
                    client.image_publisher.publish(image_message(np.zeros((480, 640, 3), np.uint8), frame_id,
                                                                 client.node))
                    results.update(client.wait_for({frame_id}, timeout=1.0))
                    index += 1
                assert len(results) == 3, "no results from a node that failed to configure"
                for result in results.values():
                    assert result.status == Msg.STATUS_NOT_READY and not result.safe
                    assert "configure failed" in result.status_message
                    for reason in reasons:
                        assert reason in result.status_message, (reason, result.status_message)
                status = diagnostics_status(client, ": classifier")
                assert status.level == DiagnosticStatus.ERROR
                for reason in reasons:
                    assert reason in status.message, (reason, status.message)
                assert client.lifecycle_state() == "unconfigured"
                assert process.poll() is None
            finally:
                client.close()
    finally:
        rclpy.try_shutdown(context=context)
    assert process.returncode == 0


@pytest.mark.ros
@pytest.mark.parametrize("override, reason", [
    ("crop_height:=476", "robust_model.crop_height"),  # a parameters file from before the per-model preprocessing
    ("robust_model.weights:=/nonexistent/robust.pt", "robust_model: model config key 'weights'"),
], ids=["former-node-parameter", "missing-weights"])
def test_a_node_that_cannot_configure_says_why_on_every_frame(tmp_path, override, reason):
    """Configure fails: every frame gets NOT_READY with the reason, /diagnostics an ERROR with it; the
    node stays up, unconfigured."""
    assert_unconfigured_with(tmp_path, ["--params-file", str(CONFIG), "-p", override], [reason], 103)


@pytest.mark.ros
def test_a_misspelled_key_or_section_in_a_parameters_file_leaves_the_node_unconfigured(tmp_path):
    """A typo never runs another model: a misspelled section (the zoo model would have run instead of
    the user's), misspelled keys and a misspelled top-level parameter each make configure fail, named
    with the nearest known name, for the same reasons `mixclf-eval --params` gives (one check).
    rclpy's own parameters (use_sim_time, qos_overrides.*) stay allowed."""
    import yaml

    from mixclf_ros.evaluation.params_file import read_ros_parameters
    from mixclf_ros.runtime.node_parameters import refused_parameters

    shipped = yaml.safe_load(CONFIG.read_text())
    section = shipped["/**"]["ros__parameters"]
    section["standard_modle"] = section.pop("standard_model")
    section["robust_model"]["input_heigth"] = 64
    section["robust_model"]["lipschitz_constnat"] = 0.5
    section["alhpa"] = 0.9
    section["use_sim_time"] = False
    path = tmp_path / "misspelled.yaml"
    path.write_text(yaml.safe_dump(shipped))
    eval_reasons = refused_parameters(read_ros_parameters(path))
    assert len(eval_reasons) == 4, eval_reasons
    named = ["standard_modle.* (", "(nearest known: standard_model.*)",
             "robust_model.input_heigth: not a model config key (nearest known: robust_model.input_height)",
             "robust_model.lipschitz_constnat: not a model config key (nearest known: robust_model.lipschitz_constant)",
             "alhpa: not a parameter of the node (nearest known: alpha)"]
    assert_unconfigured_with(tmp_path, ["--params-file", str(path), "-p", "torch_threads:=1"],
                             [*named, *eval_reasons], 103)


@pytest.mark.slow
def test_eval_cli_takes_a_pair_with_different_inputs(tmp_path, resnet_weights):
    """mixclf-eval on resnet18 (224 RGB) and the zoo's Lipschitz model (28 grey): attacks and the
    mixture on the 28x28 source image; h takes it as it is, so its certificates and accuracy are
    those of the equal-size pair; alpha = 0 is g alone, on the upsampled RGB image."""
    import json

    import yaml

    from mixclf_ros.evaluation import cli

    params = {"/**": {"ros__parameters": {"standard_model": {**RESNET_KEYS, "weights": str(resnet_weights)},
                                          "robust_model": {"architecture": "fmnist_lipschitz_cnn",
                                                           "weights": "zoo:robust_lipschitz.pt", "kind": "lipschitz"}}}}
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump(params))
    common = ["--limit", "12", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(["certify", "--params", str(tmp_path / "pair.yaml"), "--alphas", "0.6,1",
                     "--radii", "0,0.1,0.3", "--name", "pair", *common]) == 0
    assert cli.main(["certify", "--robust", "robust_lipschitz", "--alphas", "1", "--radii", "0,0.1,0.3",
                     "--name", "zoo", *common]) == 0
    pair = json.loads((tmp_path / "pair.json").read_text())
    zoo = json.loads((tmp_path / "zoo.json").read_text())
    assert pair["preprocessing"]["input_space"] == "source image"
    assert pair["preprocessing"]["standard"]["output"] == [3, 224, 224]
    assert pair["preprocessing"]["robust"]["identity"] is True
    alone = next(curve for curve in pair["curves"] if curve["model"] == "baseline")
    zoo_alone = next(curve for curve in zoo["curves"] if curve["model"] == "baseline")
    assert alone["accuracy"] == zoo_alone["accuracy"] and alone["accuracy"][1] > 0
    assert cli.main(["sweep", "--params", str(tmp_path / "pair.yaml"), "--norm", "l2", "--eps", "0.5",
                     "--steps", "2", "--alphas", "0,1", "--name", "sweep", *common]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert rows[-1]["clean_accuracy"] == zoo_alone["clean_accuracy"]
    assert all(row["worst_accuracy"] <= row["clean_accuracy"] for row in rows)
    assert not math.isnan(rows[0]["std_accuracy"])
