"""Resilience: fuzzed frames, misbehaving models, bursts, quiet cameras, parameter storms.

Everything runs against the real installed node over DDS, except the fuzzing of the decode and
classify path, which calls the node's own decode function and the pipeline in-process so that
hypothesis can try thousands of messages.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rosutil import RosClient, camera_counters, image_message, node_with_client, rss_mb

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

ENCODINGS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "32FC1", "8UC1", "8UC3", "16UC1",
             "yuv422", "bayer_rggb8", "64FC1", "", "RGB8", "rgb16"]


@pytest.fixture(scope="module")
def classifier():
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.classifier import CertifiedClassifier
    from mixclf_ros.vision.preprocess import PreprocessConfig

    standard, robust = load_model(zoo_config("standard")), load_model(zoo_config("robust_lipschitz"))
    config = PreprocessConfig(output_channels=1, output_height=28, output_width=28)
    return CertifiedClassifier(standard, robust, config, torch.device("cpu"))


@st.composite
def image_messages(draw):
    from sensor_msgs.msg import Image

    height, width = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    step = draw(st.one_of(st.integers(0, 200), st.just(width * 3), st.just(width)))
    length = draw(st.one_of(st.just(step * height), st.integers(0, 6000)))
    data = draw(st.binary(min_size=min(length, 6000), max_size=min(length, 6000)))
    return Image(height=height, width=width, step=step, encoding=draw(st.sampled_from(ENCODINGS)),
                 is_bigendian=draw(st.integers(0, 1)), data=data)


@st.composite
def compressed_messages(draw):
    import cv2
    from sensor_msgs.msg import CompressedImage

    if draw(st.booleans()):
        data = draw(st.binary(max_size=2000))
    else:  # a real PNG/JPEG, possibly truncated
        pixels = np.frombuffer(draw(st.binary(min_size=48, max_size=48)), np.uint8).reshape(4, 4, 3)
        extension = draw(st.sampled_from([".png", ".jpg"]))
        data = cv2.imencode(extension, pixels)[1].tobytes()
        data = data[: draw(st.integers(0, len(data)))]
    return CompressedImage(format=draw(st.sampled_from(["png", "jpeg", "rgb8; png", ""])), data=data)


def check_decode_and_classify(classifier, message) -> None:
    from mixclf_ros.ros.messages import decode_message
    from mixclf_ros.runtime.classifier import LiveSettings, Status
    from mixclf_ros.vision.decode import BadImageError

    try:
        decoded = decode_message(message)
    except BadImageError as error:
        assert str(error)
        return
    [result] = classifier.classify([decoded], LiveSettings(alpha=0.6, safe_radius=0.0))
    assert result.status in (Status.OK, Status.BAD_INPUT), result.status_message
    if result.status == Status.OK:
        assert 0 <= result.class_id < 10 and 0.0 <= result.probability <= 1.0
        assert math.isfinite(result.certified_radius) and result.certified_radius >= 0
    else:
        assert not result.safe and result.status_message


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(message=image_messages())
def test_fuzzed_images_never_raise(classifier, message):
    check_decode_and_classify(classifier, message)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(message=compressed_messages())
def test_fuzzed_compressed_images_never_raise(classifier, message):
    check_decode_and_classify(classifier, message)


# ------------------------------------------------------------------------------ over DDS
def grey_frame(value: int) -> np.ndarray:
    return np.full((56, 56, 3), value, np.uint8)


def wait_until(condition, timeout: float) -> None:
    """Polls `condition` (an event a process outside this one makes) until it holds, or fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.02)


def send(client: RosClient, frames: dict[str, np.ndarray], period: float = 0.05, timeout: float = 20.0) -> dict:
    for frame_id, pixels in frames.items():
        client.image_publisher.publish(image_message(pixels, frame_id, client.node))
        time.sleep(period)
    return client.wait_for(set(frames), timeout=timeout)


@contextlib.contextmanager
def tripwire_node(directory: Path, reliable: bool = False, domain_id: int | None = None, **extra_overrides):
    """The node with the zoo's standard model and a robust model that misbehaves on cue; yields
    (client, process, log path)."""
    import faulty_models

    torch.manual_seed(0)
    weights = directory / "tripwire.pt"
    torch.save(faulty_models.tripwire().state_dict(), weights)
    log = directory / "mixclf_node.log"
    overrides = {
        "robust_model.architecture": "faulty_models:tripwire", "robust_model.weights": str(weights),
        "robust_model.sha256": "''", "robust_model.kind": "lipschitz", "robust_model.lipschitz_constant": 0.05,
        "robust_model.mean": "[0.0]", "robust_model.std": "[1.0]", "camera_timeout": 1.0,
        "diagnostics_period": 0.25, "max_image_age": 5.0,
        **{f"{model}.{key}": 0 for model in ("standard_model", "robust_model")
           for key in ("crop_height", "crop_width")},
        **extra_overrides,
    }
    args = ["--params-file", str(REPO_ROOT / "config" / "mixclf.yaml")]
    for name, value in overrides.items():
        args += ["-p", f"{name}:={value}"]
    env = {"PYTHONPATH": f"{REPO_ROOT / 'test'}:" + os.environ.get("PYTHONPATH", ""),
           "MIXCLF_TEST_STALL_FILE": str(directory / "stalling")}
    with node_with_client(*args, log_path=log, env=env, client_name="fault_client", reliable=reliable,
                          domain_id=domain_id) as (client, process):
        yield client, process, log


@pytest.fixture(scope="module")
def faulty_node(tmp_path_factory, installed_prefix):
    with tripwire_node(tmp_path_factory.mktemp("faulty")) as node:
        yield node


def test_best_effort_publisher_is_received(faulty_node):
    """The node's default subscription (sensor-data QoS) takes best-effort frames."""
    client, _, _ = faulty_node
    for index in range(5):  # one frame at a time: none is replaced by a newer one
        frame_id = f"best-effort-{index}"
        got = send(client, {frame_id: grey_frame(60)}, period=0.0, timeout=20.0)
        assert frame_id in got, f"best-effort frame {index} got no result"


def test_model_exception_and_nan_give_model_error_and_node_recovers(faulty_node):
    from mixclf_ros.msg import CertifiedClassification as Msg

    client, process, _ = faulty_node
    got = send(client, {"raise": grey_frame(255), "nan": grey_frame(217), "fine": grey_frame(60)}, period=0.3)
    assert got["raise"].status == Msg.STATUS_MODEL_ERROR and "tripwire" in got["raise"].status_message
    assert got["nan"].status == Msg.STATUS_MODEL_ERROR and "non-finite" in got["nan"].status_message
    assert not got["raise"].safe and not got["nan"].safe and got["raise"].class_id == -1
    assert got["fine"].status == Msg.STATUS_OK
    assert process.poll() is None


def test_stalling_model_then_latency_recovers(faulty_node):
    from mixclf_ros.msg import CertifiedClassification as Msg

    client, _, log = faulty_node
    stalling = log.parent / "stalling"
    stalling.unlink(missing_ok=True)
    client.image_publisher.publish(image_message(grey_frame(191), "stall", client.node))
    wait_until(stalling.exists, timeout=20.0)  # the model has the frame and stalls
    during = {f"during-{i}": grey_frame(60) for i in range(10)}  # arrive while the model stalls
    send(client, during, period=0.1, timeout=5.0)
    stalled = client.wait_for({"stall"}, timeout=10)
    assert stalled["stall"].status == Msg.STATUS_OK
    processed_during = client.results_for(set(during))
    assert len(processed_during) < len(during), "frames queued behind a stalled model instead of being dropped"
    # the node serves again (how fast is `make bench`'s matter, not a test's)
    after = send(client, {"after-stall": grey_frame(60)}, period=0.0, timeout=20.0)
    assert after["after-stall"].status == Msg.STATUS_OK


def test_frame_policy_every_classifies_each_frame_in_order_through_a_stall(tmp_path, installed_prefix):
    """With `frame_policy: every` (and a deeper reliable subscription, as the demo runs it) frames
    arriving while the model stalls are queued, not dropped: each gets a result, in order."""
    from mixclf_ros.msg import CertifiedClassification as Msg

    # a domain of its own: the module's faulty_node (frame_policy newest) may still be running
    with tripwire_node(tmp_path, reliable=True, domain_id=int(os.environ["ROS_DOMAIN_ID"]) + 100,
                       frame_policy="every",
                       **{"qos_overrides./image.subscription.reliability": "reliable",
                          "qos_overrides./image.subscription.depth": 10}) as (client, _, log):
        client.clear()
        client.image_publisher.publish(image_message(grey_frame(191), "stall", client.node))
        wait_until((log.parent / "stalling").exists, timeout=20.0)  # the model has the frame and stalls
        during = {f"during-{i}": grey_frame(60) for i in range(8)}  # arrive while the model stalls
        got = send(client, during, period=0.05, timeout=30.0)
        assert set(got) == set(during), f"frames lost behind the stall: {sorted(set(during) - set(got))}"
        assert all(result.status == Msg.STATUS_OK for result in got.values())
        with client.lock:
            order = [r.header.frame_id for r in client.results if r.header.frame_id.startswith("during-")]
        assert order == list(during), order


def test_burst_of_200_frames(faulty_node):
    from mixclf_ros.msg import CertifiedClassification as Msg

    client, process, _ = faulty_node
    rss_before = rss_mb(process.pid)
    before = camera_counters(client)
    burst = {f"burst-{i}": grey_frame(40 + i % 20) for i in range(200)}
    for frame_id, pixels in burst.items():
        client.image_publisher.publish(image_message(pixels, frame_id, client.node))
    after = send(client, {"after-burst": grey_frame(60)}, period=0.0, timeout=20.0)
    assert "after-burst" in after, "the node stopped serving after a burst"
    got = client.results_for(set(burst))
    counted = {key: value - before[key] for key, value in camera_counters(client).items() if key in before}
    # every frame the node received got a result or was counted as replaced by a newer one
    assert counted["frames_received"] == counted["frames_processed"] + counted["frames_dropped_newer_arrived"]
    assert len(got) + 1 == counted["frames_processed"], (len(got), counted)
    for result in got.values():  # the message contract's safe rule, from the published fields
        assert result.safe == (result.status == Msg.STATUS_OK and result.certified_radius > 0
                               and result.certified_radius >= result.safe_radius
                               and result.class_id == result.robust_class_id), result
    assert rss_mb(process.pid) - rss_before < 50


def test_quiet_camera_is_reported_in_diagnostics(faulty_node):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    client, _, _ = faulty_node
    arrays: list[DiagnosticArray] = []
    subscription = client.node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    try:
        def quiet() -> bool:  # no frames for longer than camera_timeout (1 s)
            return any("camera" in s.name and "quiet" in s.message for a in list(arrays) for s in a.status)

        wait_until(quiet, timeout=20.0)
        statuses = [s for a in arrays for s in a.status if "camera" in s.name]
        assert statuses, "no camera diagnostics"
        # named by the fully qualified node name: instances in other namespaces do not collide
        assert {s.name for s in statuses} == {"/mixclf: camera image"}
        latest = statuses[-1]
        assert latest.level == DiagnosticStatus.WARN and "quiet" in latest.message
        values = {kv.key: kv.value for kv in latest.values}
        assert int(values["frames_received"]) > 0 and "frames_dropped_newer_arrived" in values
    finally:
        client.node.destroy_subscription(subscription)


def test_parameter_storm_while_streaming(faulty_node):
    from mixclf_ros.msg import CertifiedClassification as Msg

    client, process, _ = faulty_node
    stop = threading.Event()

    def stream():
        index = 0
        while not stop.is_set():
            client.image_publisher.publish(image_message(grey_frame(60), f"storm-{index}", client.node))
            index += 1
            time.sleep(1 / 30)

    streamer = threading.Thread(target=stream)
    streamer.start()
    rng = random.Random(0)
    answers = []
    try:
        futures = []
        for _ in range(60):
            value = rng.choice([rng.uniform(0.5, 1.0), rng.uniform(-2, 3), math.nan, math.inf])
            futures.append((value, client.parameters.set_parameters(
                [__import__("rclpy").parameter.Parameter("alpha", value=value)])))
        deadline = time.monotonic() + 30
        while not all(f.done() for _, f in futures) and time.monotonic() < deadline:
            time.sleep(0.02)
        answers = [(value, f.result().results[0]) for value, f in futures if f.done()]
    finally:
        stop.set()
        streamer.join()
    assert len(answers) == 60, "some SetParameters calls were never answered"
    for value, result in answers:
        assert result.successful == (0.0 <= value <= 1.0), (value, result.reason)
    assert client.set_parameters(alpha=0.6)[0].successful
    got = send(client, {"post-storm": grey_frame(60)}, period=0.0, timeout=5.0)
    assert got["post-storm"].status == Msg.STATUS_OK and got["post-storm"].alpha == pytest.approx(0.6)
    assert process.poll() is None


def test_parameter_fuzzing_every_declared_parameter(faulty_node):
    from rcl_interfaces.msg import ParameterType, ParameterValue

    client, process, _ = faulty_node
    names = [n for n in client.list_parameters() if not n.startswith("qos_overrides")]
    rng = random.Random(1)
    candidates = [
        ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=True),
        ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=-7),
        ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=float("nan")),
        ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=0.75),
        ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=1e30),
        ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="\x00garbage"),
        ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=["a", "b"]),
        ParameterValue(type=ParameterType.PARAMETER_DOUBLE_ARRAY, double_array_value=[1.0, -1.0]),
        ParameterValue(type=ParameterType.PARAMETER_NOT_SET),
    ]
    live = ("alpha", "safe_radius", "max_image_age", "confidence", "camera_timeout")
    saved = dict(zip(live, (value.double_value for value in client.get_parameters(*live))))
    try:
        for name in names:
            for value in rng.sample(candidates, 4):
                result = client.set_raw_parameter(name, value)
                # the node is active: only a live parameter takes a value, and only a valid one
                # (every live parameter's range holds 0.75 and none holds -7, 1e30 or NaN); and
                # rclpy's use_sim_time takes a bool
                valid = ((name in live and value.type == ParameterType.PARAMETER_DOUBLE
                          and value.double_value == 0.75)
                         or (name == "use_sim_time" and value.type == ParameterType.PARAMETER_BOOL))
                assert result.successful == valid, (name, value, result.reason)
                assert result.successful or result.reason, (name, value)
        assert process.poll() is None
        for name, value in zip(live, client.get_parameters(*live)):
            assert value.double_value in (saved[name], 0.75), name
    finally:
        assert all(result.successful for result in client.set_parameters(**saved, use_sim_time=False))
