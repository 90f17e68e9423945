"""The installed node over real DDS: what `safe` needs (both thresholds, live), the warnings when no
frame can be safe, the smoothing seed, and certificates resting on a declared Lipschitz constant."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from rosutil import RosClient, image_message, node_with_client

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

CONFIG = REPO_ROOT / "config" / "mixclf.yaml"
# every frame gets a result, in order, whatever the load
EVERY_FRAME = ["-p", "frame_policy:=every", "-p", "max_image_age:=30.0",
               "-p", "qos_overrides./image.subscription.reliability:=reliable",
               "-p", "qos_overrides./image.subscription.depth:=10"]


@pytest.fixture(scope="module")
def articles():
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article

    images, _ = load_fashion_mnist("test")
    return [embed_article(image) for image in images[:8]]


def classify(client: RosClient, frames: dict[str, np.ndarray]) -> dict:
    """Publishes the frames one at a time, each after the previous one's result (so that batches,
    and the noise each frame draws, are the same in every run)."""
    results = {}
    for frame_id, pixels in frames.items():
        client.image_publisher.publish(image_message(pixels, frame_id, client.node))
        results.update(client.wait_for({frame_id}, timeout=60))
        assert frame_id in results, f"no result for {frame_id}"
    return results


def certificate_status(client: RosClient, predicate=lambda status: True, timeout: float = 30.0):
    """The node's next `certificate` diagnostic status for which `predicate` holds (None if none came
    within `timeout` seconds)."""
    from diagnostic_msgs.msg import DiagnosticArray

    arrays: list[DiagnosticArray] = []
    subscription = client.node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while arrays:
                for status in arrays.pop(0).status:
                    if status.name.endswith(": certificate") and predicate(status):
                        return status
            time.sleep(0.05)
        return None
    finally:
        client.node.destroy_subscription(subscription)


def values(status) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def test_shipped_thresholds_are_one_grey_level_and_the_seed_os_entropy_in_declarations_and_yaml():
    from mixclf_ros.ros.parameters import NODE_PARAMETERS, OS_ENTROPY_SEED
    from mixclf_ros.runtime.classifier import ONE_GREY_LEVEL

    declared = {parameter.name: parameter.default for parameter in NODE_PARAMETERS}
    shipped = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]
    for name in ("safe_radius", "safe_image_radius"):
        assert declared[name] == shipped[name] == ONE_GREY_LEVEL > 0, name
    assert declared["seed"] == shipped["seed"] == OS_ENTROPY_SEED < 0


# Every node here runs on this session's own domain, one at a time (a fixed offset from it could be
# another session's domain): the shipped node lives as long as the class that uses it.
@pytest.fixture(scope="class")
def shipped_node(tmp_path_factory, installed_prefix):
    log = tmp_path_factory.mktemp("safe") / "mixclf_node.log"
    with node_with_client("--params-file", str(CONFIG), *EVERY_FRAME, log_path=log, reliable=True) as (client, _):
        yield client, log


class TestShippedNode:
    def test_live_safe_image_radius_decides_safe(self, shipped_node, articles):
        client, _ = shipped_node
        before = classify(client, {f"img-{i}": pixels for i, pixels in enumerate(articles)})
        safe = [frame_id for frame_id, result in before.items() if result.safe]
        assert safe, "no safe frame at the shipped thresholds"
        frame_id = safe[0]
        first = before[frame_id]
        assert first.safe_image_radius == pytest.approx(1 / 255) and first.safe_radius == pytest.approx(1 / 255)
        frame = articles[int(frame_id.split("-")[1])]
        try:
            # just above the frame's image radius: the model-input threshold is met, the image one is not
            above = 1.5 * first.image_radius
            assert client.set_parameters(safe_image_radius=above)[0].successful
            got = classify(client, {"above": frame})["above"]
            assert got.image_radius == pytest.approx(first.image_radius) and got.certified_radius >= got.safe_radius
            assert not got.safe and got.safe_image_radius == pytest.approx(above)
            below = 0.5 * first.image_radius
            assert client.set_parameters(safe_image_radius=below)[0].successful
            got = classify(client, {"below": frame})["below"]
            assert got.safe and got.safe_image_radius == pytest.approx(below)
            result = client.set_parameters(safe_image_radius=-1.0)[0]
            assert not result.successful and result.reason
        finally:
            assert client.set_parameters(safe_image_radius=1 / 255)[0].successful

    def test_warns_when_no_frame_can_be_safe_at_alpha_one_half_and_stops_when_raised(self, shipped_node, articles):
        from diagnostic_msgs.msg import DiagnosticStatus

        client, log = shipped_node
        classify(client, {"size": articles[0]})  # the camera's 640x480 frame size is known
        status = certificate_status(client, lambda s: any(k.startswith("max_image_radius") for k in values(s)))
        assert status is not None, "no certificate diagnostics with the image's largest radius"
        largest = float(values(status)["max_certified_radius"])
        [largest_image] = [float(v) for k, v in values(status).items() if k.startswith("max_image_radius")]
        # the shipped h's bound is computed, so the logit margin certifies: no ceiling at alpha > 1/2
        assert largest == math.inf and largest_image == math.inf
        assert status.level == DiagnosticStatus.OK and "no frame can be safe" not in status.message
        try:
            assert client.set_parameters(safe_radius=5.0, safe_image_radius=50.0)[0].successful
            quiet = certificate_status(client, lambda s: float(values(s).get("safe_radius", 0)) == 5.0)
            assert quiet is not None and "no frame can be safe" not in quiet.message
            # alpha lowered live: at 0.5 nothing can be certified, whatever the thresholds
            assert client.set_parameters(alpha=0.5, safe_radius=1 / 255, safe_image_radius=1 / 255)[0].successful
            warned = certificate_status(client, lambda s: "no frame can be safe" in s.message)
            assert warned is not None and warned.level == DiagnosticStatus.WARN and "safe_radius" in warned.message
            got = classify(client, {"half": articles[0]})["half"]
            assert not got.safe and got.certified_radius == 0.0
            assert client.set_parameters(alpha=0.6)[0].successful
            cleared = certificate_status(client, lambda s: "no frame can be safe" not in s.message)
            assert cleared is not None and cleared.level == DiagnosticStatus.OK, "warning stayed"
        finally:
            assert client.set_parameters(alpha=0.6, safe_radius=1 / 255, safe_image_radius=1 / 255)[0].successful
        assert "no frame can be safe" in log.read_text()  # the log says it too


def test_certificate_on_a_declared_constant_says_so(tmp_path, installed_prefix, articles):
    from diagnostic_msgs.msg import DiagnosticStatus

    from mixclf_ros.msg import CertifiedClassification as Msg

    # above the sound bound the node computes (2.507), so any check of declared constants accepts it
    with node_with_client("--params-file", str(CONFIG), *EVERY_FRAME, "-p", "robust_model.lipschitz_constant:=2.6",
                          log_path=tmp_path / "mixclf_node.log", reliable=True) as (client, _):
        results = classify(client, {f"declared-{i}": pixels for i, pixels in enumerate(articles[:3])})
        for result in results.values():
            assert result.status == Msg.STATUS_OK
            assert "declared Lipschitz constant" in result.status_message
        status = certificate_status(client)
        assert status is not None
        assert values(status)["lipschitz_source"] == "declared"
        assert values(status)["forward_error"] == "bounded"  # the zoo model's float64 error bound
        assert float(values(status)["forward_error_bound"]) < 1e-9
        assert status.level == DiagnosticStatus.WARN and "declared Lipschitz constant" in status.message
        # a declared constant bounds the probabilities only: Theorem 1's ceiling (2 alpha - 1) / (2 alpha L)
        largest = float(values(status)["max_certified_radius"])
        assert largest == pytest.approx(0.2 / (1.2 * 2.6), rel=1e-6)
        assert client.set_parameters(safe_radius=2 * largest)[0].successful
        warned = certificate_status(client, lambda s: "no frame can be safe" in s.message)
        assert warned is not None and "safe_radius" in warned.message and f"{2 * largest:.6g}" in warned.message


def smoothing_run(tmp_path, name: str, seed: int | None, frames: dict[str, np.ndarray]):
    """A fresh node process with the zoo's smoothing robust model (n = 200); after a reconfigure (so
    that no probe frame has drawn noise), `frames` one at a time. Returns (results, diagnostics)."""
    import yaml

    from mixclf_ros.models import zoo_config

    smoothing = zoo_config("robust_smoothing")
    # the shipped file with its robust model switched to smoothing (the lipschitz-only keys removed:
    # the node refuses keys its kind does not use)
    shipped = yaml.safe_load(CONFIG.read_text())
    robust = shipped["/**"]["ros__parameters"]["robust_model"]
    for key in ("norm", "lipschitz_constant"):
        robust.pop(key)
    robust.update({key: smoothing[key] for key in ("kind", "architecture", "weights", "sha256")},
                  mean=[0.286], std=[0.353], n=200)
    params = tmp_path / f"{name}.yaml"
    params.write_text(yaml.safe_dump(shipped))
    arguments = [] if seed is None else ["-p", f"seed:={seed}"]
    with node_with_client("--params-file", str(params), *EVERY_FRAME, *arguments, log_path=tmp_path / f"{name}.log",
                          reliable=True) as (client, _):
        for transition in ("deactivate", "cleanup", "configure", "activate"):
            assert client.change_state(transition), transition
        results = classify(client, frames)
        status = certificate_status(client, lambda s: values(s).get("frame_rate_hz", "nan") != "nan")
    assert status is not None
    return [(r.robust_class_id, r.robust_margin, r.probability, r.certified_radius) for r in results.values()], status


def test_smoothing_noise_is_fresh_in_every_process_unless_a_seed_is_fixed(tmp_path, installed_prefix, articles):
    from diagnostic_msgs.msg import DiagnosticStatus

    frames = {f"seed-{i}": pixels for i, pixels in enumerate(articles[:4])}
    # half one article, half another: the smoothed model is unsure, so its estimates vary with the noise
    frames.update({f"blend-{i}": ((articles[i].astype(np.uint16) + articles[i + 1]) // 2).astype(np.uint8)
                   for i in range(4)})
    first, first_status = smoothing_run(tmp_path, "entropy-1", None, frames)
    second, _ = smoothing_run(tmp_path, "entropy-2", None, frames)
    assert first != second, "two processes with the default seed drew the same noise"
    assert values(first_status)["smoothing_seed"].startswith("os entropy")
    assert "seed" not in first_status.message
    # beta over the stream: beta x measured frame rate x 3600
    rate = float(values(first_status)["frame_rate_hz"])
    per_hour = float(values(first_status)["smoothing_worst_case_wrong_certificates_per_hour"])
    assert per_hour == pytest.approx(0.001 * rate * 3600, rel=1e-2, abs=1e-3)

    fixed, fixed_status = smoothing_run(tmp_path, "fixed-1", 7, frames)
    again, _ = smoothing_run(tmp_path, "fixed-2", 7, frames)
    assert fixed == again, "the same fixed seed gave different results"
    assert values(fixed_status)["smoothing_seed"] == "fixed 7"
    assert fixed_status.level == DiagnosticStatus.WARN and "seed fixed" in fixed_status.message
