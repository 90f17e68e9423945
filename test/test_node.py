"""The installed node over real DDS, started with the shipped parameters file."""

from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from rosutil import TEST_TORCH_THREADS, RosClient, camera_counters, image_message, node_with_client, rss_mb

from mixclf_ros.demo.render import ARTICLE_SCALE

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

CONFIG = REPO_ROOT / "config" / "mixclf.yaml"


def demo_frame(article: np.ndarray) -> np.ndarray:
    from mixclf_ros.demo.render import embed_article

    return embed_article(article)


@pytest.fixture(scope="module")
def fashion_test():
    from mixclf_ros.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return images[:40], labels[:40]


@pytest.fixture(scope="module")
def running_node(tmp_path_factory, installed_prefix):

    log = tmp_path_factory.mktemp("node") / "mixclf_node.log"
    # These tests check every frame's result, however loaded the machine: reliable, deep frame
    # subscriptions (Fast DDS loses best-effort 900 KB frames between processes here, see docs/FAST_DDS.md) and
    # frame_policy every (no frame is replaced by a newer one). Best-effort delivery and the newest
    # policy are tested in test_resilience and below. Queued frames may wait: max_image_age 10 s.
    every_frame = ["-p", "frame_policy:=every", "-p", "max_image_age:=10.0"]
    for topic in ("/image", "/image/compressed"):
        every_frame += ["-p", f"qos_overrides.{topic}.subscription.reliability:=reliable",
                        "-p", f"qos_overrides.{topic}.subscription.depth:=10"]
    with node_with_client("--params-file", str(CONFIG), *every_frame,
                          log_path=log, reliable=True) as (client, process):
        yield client, process, log


@pytest.fixture(scope="module")
def newest_frame_node(tmp_path_factory, installed_prefix):
    """The node as shipped (frame_policy newest), in a domain of its own."""
    import os

    log = tmp_path_factory.mktemp("newest") / "mixclf_node.log"
    # reliable depth 1: the newest frame is never lost in transport, older ones may be replaced
    reliable = ["-p", "qos_overrides./image.subscription.reliability:=reliable"]
    integer_for_double = ["-p", "max_image_age:=5"]
    with node_with_client("--params-file", str(CONFIG), *reliable, *integer_for_double, log_path=log, reliable=True,
                          domain_id=int(os.environ["ROS_DOMAIN_ID"]) + 100) as (client, process):
        yield client, process, log


def publish_and_collect(client: RosClient, frames: dict[str, np.ndarray], period: float = 0.05, **kwargs) -> dict:
    for frame_id, pixels in frames.items():
        client.image_publisher.publish(image_message(pixels, frame_id, client.node, **kwargs))
        time.sleep(period)
    return client.wait_for(set(frames))


def test_classifies_real_frames_with_certificates(running_node, fashion_test):
    from mixclf_ros.msg import CertifiedClassification as Msg

    client, _, _ = running_node
    images, labels = fashion_test
    frames = {f"cam-{i}": demo_frame(images[i]) for i in range(20)}
    stamps = {}
    for frame_id, pixels in frames.items():
        message = image_message(pixels, frame_id, client.node)
        stamps[frame_id] = (message.header.stamp.sec, message.header.stamp.nanosec)
        client.image_publisher.publish(message)
        time.sleep(0.1)
    results = client.wait_for(set(frames))
    assert len(results) == 20, f"only {len(results)} of 20 results"
    correct = 0
    for frame_id, result in results.items():
        assert (result.header.stamp.sec, result.header.stamp.nanosec) == stamps[frame_id]  # never restamped
        assert result.status == Msg.STATUS_OK, result.status_message
        assert result.certificate_method == (Msg.CERTIFICATE_LIPSCHITZ if result.certified_radius > 0
                                             else Msg.CERTIFICATE_NONE)
        assert result.norm == Msg.NORM_L2
        assert result.alpha == pytest.approx(0.6)
        assert 0.0 <= result.probability <= 1.0 and result.class_name
        assert result.confidence == (1.0 if result.certified_radius > 0 else 0.0)
        if result.certified_radius > 0:
            assert result.class_id == result.robust_class_id  # Lemma 1
            # the preprocessing (crop, grey, 17x area resize) shrinks perturbations: l2 gain 0.6686/17
            assert result.image_radius == pytest.approx(result.certified_radius * ARTICLE_SCALE / 0.66863, rel=1e-3)
        assert result.safe == (result.certified_radius > 0 and result.certified_radius >= result.safe_radius
                               and result.image_radius >= result.safe_image_radius)
        correct += int(result.class_id == labels[int(frame_id.split("-")[1])])
    assert correct >= 15, f"{correct}/20 correct"


def test_alpha_set_live_and_invalid_values_rejected(running_node, fashion_test):
    from rcl_interfaces.msg import ParameterType, ParameterValue

    client, _, _ = running_node
    images, _ = fashion_test
    results = client.set_parameters(alpha=0.8)
    assert results[0].successful, results[0].reason
    got = publish_and_collect(client, {"alpha-0": demo_frame(images[0])})
    assert got["alpha-0"].alpha == pytest.approx(0.8)

    for bad in (1.5, -0.1, math.nan):
        result = client.set_parameters(alpha=bad)[0]
        assert not result.successful and result.reason, bad
    wrong_type = client.set_raw_parameter(
        "alpha", ParameterValue(type=ParameterType.PARAMETER_STRING, string_value="high"))
    assert not wrong_type.successful and wrong_type.reason
    read_only = client.set_parameters(device="cpu")[0]
    assert not read_only.successful
    assert client.get_parameters("alpha")[0].double_value == pytest.approx(0.8)
    got = publish_and_collect(client, {"alpha-1": demo_frame(images[1])})
    assert got["alpha-1"].alpha == pytest.approx(0.8)

    # below 1/2 nothing can be certified: every frame unsafe
    assert client.set_parameters(alpha=0.3)[0].successful
    got = publish_and_collect(client, {f"low-{i}": demo_frame(images[i]) for i in range(8)})
    assert len(got) == 8
    assert all(not r.safe and r.certified_radius == 0.0 and r.alpha == pytest.approx(0.3) for r in got.values())
    assert client.set_parameters(alpha=0.6)[0].successful


def test_bad_inputs_get_bad_input_and_node_keeps_serving(running_node, fashion_test):
    from sensor_msgs.msg import Image

    from mixclf_ros.msg import CertifiedClassification as Msg

    client, process, _ = running_node
    now = client.node.get_clock().now().to_msg()

    def raw(frame_id, encoding, height, width, step, data):
        message = Image(encoding=encoding, height=height, width=width, step=step, data=data)
        message.header.frame_id, message.header.stamp = frame_id, now
        return message

    bad = {
        "bad-encoding": raw("bad-encoding", "yuv422_weird", 4, 4, 8, bytes(32)),
        "bad-step": raw("bad-step", "rgb8", 4, 4, 5, bytes(20)),
        "bad-length": raw("bad-length", "rgb8", 4, 4, 12, bytes(47)),
        "bad-empty": raw("bad-empty", "rgb8", 0, 0, 0, b""),
        "bad-nan": raw("bad-nan", "32FC1", 4, 4, 16, np.full((4, 4), np.nan, np.float32).tobytes()),
        "bad-depth": raw("bad-depth", "16UC1", 2, 2, 4, bytes(8)),  # REP-118 depth, for an intensity model
    }
    for message in bad.values():
        client.image_publisher.publish(message)
        time.sleep(0.05)
    results = client.wait_for(set(bad))
    assert set(results) == set(bad)
    for frame_id, result in results.items():
        assert result.status == Msg.STATUS_BAD_INPUT and not result.safe and result.class_id == -1, frame_id
        assert result.status_message, frame_id
    images, _ = fashion_test
    good = publish_and_collect(client, {"after-bad": demo_frame(images[2])})
    assert good["after-bad"].status == Msg.STATUS_OK
    assert process.poll() is None


def test_stale_frame_is_stale(running_node, fashion_test):
    from builtin_interfaces.msg import Time

    from mixclf_ros.msg import CertifiedClassification as Msg

    client, _, _ = running_node
    images, _ = fashion_test
    old = client.node.get_clock().now().nanoseconds - int(60e9)  # max_image_age is 10 s
    stamp = Time(sec=old // 10**9, nanosec=old % 10**9)
    got = publish_and_collect(client, {"stale-0": demo_frame(images[3])}, stamp=stamp)
    assert got["stale-0"].status == Msg.STATUS_STALE and not got["stale-0"].safe
    assert (got["stale-0"].header.stamp.sec, got["stale-0"].header.stamp.nanosec) == (stamp.sec, stamp.nanosec)


def test_30hz_input_drops_older_frames_and_keeps_memory_bounded(newest_frame_node, fashion_test):
    """frame_policy newest at 30 Hz: no queue builds up (the last frame always gets a result), and
    every frame the node received is either classified or counted as dropped for a newer one."""
    client, process, _ = newest_frame_node
    images, _ = fashion_test
    frames = [demo_frame(images[i % len(images)]) for i in range(10)]
    time.sleep(1.0)  # the readiness probes are done
    before = camera_counters(client)
    rss = []
    sent_ids = []
    start = time.monotonic()
    for index in range(240):  # 8 s at 30 Hz
        frame_id = f"rate-{index}"
        client.image_publisher.publish(image_message(frames[index % 10], frame_id, client.node))
        sent_ids.append(frame_id)
        if index % 30 == 0:
            rss.append(rss_mb(process.pid))
        time.sleep(max(0.0, start + (index + 1) / 30 - time.monotonic()))
    assert "rate-239" in client.wait_for({"rate-239"}, timeout=60), "the newest frame got no result"
    time.sleep(1.0)  # results of the earlier frames are all in before the last one's
    results = client.results_for(set(sent_ids))
    after = camera_counters(client)
    received = after["frames_received"] - before["frames_received"]
    processed = after["frames_processed"] - before["frames_processed"]
    dropped = after["frames_dropped_newer_arrived"] - before["frames_dropped_newer_arrived"]
    assert 0 < received <= 240
    assert processed + dropped == received, (processed, dropped, received)
    assert len(results) == processed, f"{len(results)} results for {processed} classified frames"
    assert rss[-1] - rss[1] < 60, f"memory grew from {rss[1]:.0f} to {rss[-1]:.0f} MiB"


def test_launch_file_and_parameters_file_are_consistent(running_node, installed_prefix: Path):
    client, _, _ = running_node
    source = (REPO_ROOT / "launch" / "mixclf.launch.py").read_text()
    tree = ast.parse(source)
    calls = {node.func.id: node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    node_call = calls["Node"]
    keywords = {k.arg: k.value for k in node_call.keywords}
    assert ast.literal_eval(keywords["package"]) == "mixclf_ros"
    executable = ast.literal_eval(keywords["executable"])
    assert (installed_prefix / "lib" / "mixclf_ros" / executable).exists()
    arguments = {call.args[0].value for call in ast.walk(tree)
                 if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument"
                 and isinstance(call.args[0], ast.Constant)}
    # the arguments that stand for parameters are declared from one table
    [table] = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and getattr(node.targets[0], "id", "") == "PARAMETER_ARGUMENTS"]
    arguments |= {key.value for key in table.keys}
    assert {"namespace", "params_file", "image_topic", "device", "alpha"} <= arguments
    assert '"config", "mixclf.yaml"' in source
    assert (installed_prefix / "share" / "mixclf_ros" / "config" / "mixclf.yaml").exists()

    parameters = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    declared = set(client.list_parameters())
    undeclared = set(flatten(parameters)) - declared
    assert not undeclared, f"parameters file sets undeclared parameters: {undeclared}"


def flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_model_parameters_are_the_schema_keys_the_models_kind_uses(running_node):
    from mixclf_ros.models import schema

    client, _, _ = running_node
    declared = set(client.list_parameters())
    for prefix, kind in (("standard_model", "standard"), ("robust_model", "lipschitz")):
        expected = {f"{prefix}.{key.name}" for key in schema.keys_for_kind(kind) if not key.node_parameter}
        assert {name for name in declared if name.startswith(prefix + ".")} == expected, prefix
    assert "standard_model.sigma" not in declared and "standard_model.n0" not in declared
    assert "robust_model.sigma" not in declared and "robust_model.lipschitz_constant" in declared


def test_integer_value_for_a_double_parameter_is_taken_as_that_double(running_node, fashion_test):
    """`ros2 param set /mixclf alpha 1` sends an integer."""
    from rcl_interfaces.msg import ParameterType, ParameterValue

    client, _, _ = running_node
    images, _ = fashion_test
    result = client.set_raw_parameter("alpha", ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=1))
    try:
        assert result.successful, result.reason
        [value] = client.get_parameters("alpha")
        assert value.type == ParameterType.PARAMETER_DOUBLE and value.double_value == 1.0
        got = publish_and_collect(client, {"alpha-int": demo_frame(images[4])})
        assert got["alpha-int"].alpha == 1.0
        out_of_range = client.set_raw_parameter(
            "alpha", ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=2))
        assert not out_of_range.successful and out_of_range.reason
    finally:
        assert client.set_parameters(alpha=0.6)[0].successful


def test_integer_start_up_value_for_a_double_parameter_is_taken_as_that_double(newest_frame_node):
    from rcl_interfaces.msg import ParameterType

    client, _, _ = newest_frame_node
    [value] = client.get_parameters("max_image_age")  # started with -p max_image_age:=5
    assert value.type == ParameterType.PARAMETER_DOUBLE and value.double_value == 5.0


def test_configure_parameters_are_refused_while_active_with_the_reason(running_node):
    client, _, _ = running_node
    for name, value in (("standard_model.crop_height", 100), ("robust_model.kind", "smoothing"), ("device", "cpu")):
        result = client.set_parameters(**{name: value})[0]
        assert not result.successful and "deactivate" in result.reason, (name, result.reason)
    assert client.get_parameters("standard_model.crop_height")[0].integer_value == 476
    read_only = client.set_parameters(autostart=False)[0]
    assert not read_only.successful


def test_no_parameters_file_runs_the_shipped_config_and_a_reconfigure_changes_the_model(
        tmp_path, installed_prefix, fashion_test):
    """Started with no parameters file, the node runs the shipped config; then the full lifecycle
    cycle over DDS: deactivate, cleanup, switch the robust model to randomized smoothing and the
    crop, configure, activate: results come from the new model."""
    import os

    from rclpy.parameter import parameter_value_to_python

    from mixclf_ros.models import zoo_config
    from mixclf_ros.msg import CertifiedClassification as Msg

    images, _ = fashion_test
    shipped = dict(flatten(yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]))
    shipped["torch_threads"] = TEST_TORCH_THREADS  # node_process pins it
    # no parameters file; reliable frames only, so that no frame is lost in transport
    with node_with_client("-p", "qos_overrides./image.subscription.reliability:=reliable",
                          log_path=tmp_path / "mixclf_node.log", reliable=True,
                          domain_id=int(os.environ["ROS_DOMAIN_ID"]) + 101) as (client, _):
        values = client.get_parameters(*shipped)
        running = {name: parameter_value_to_python(value) for name, value in zip(shipped, values)}
        running = {name: list(value) if isinstance(value, (list, tuple)) else value for name, value in running.items()}
        assert running == shipped
        before = publish_and_collect(client, {"before": demo_frame(images[5])})["before"]
        assert before.status == Msg.STATUS_OK and before.certified_radius > 0
        assert before.certificate_method == Msg.CERTIFICATE_LIPSCHITZ

        assert client.lifecycle_state() == "active"
        assert client.change_state("deactivate") and client.lifecycle_state() == "inactive"
        # inactive: the frame is counted, nothing is published (nav2); checked below, once a later
        # frame's result has come back over the same reliable subscription
        client.image_publisher.publish(image_message(demo_frame(images[5]), "inactive", client.node))
        assert client.change_state("cleanup") and client.lifecycle_state() == "unconfigured"

        smoothing = zoo_config("robust_smoothing")
        changes = {f"robust_model.{key}": smoothing[key]
                   for key in ("kind", "architecture", "weights", "sha256", "mean", "std")}
        for name, value in changes.items():
            result = client.set_parameters(**{name: value})[0]
            assert result.successful, (name, result.reason)
        declared = set(client.list_parameters())
        assert {"robust_model.sigma", "robust_model.n0", "robust_model.n"} <= declared
        assert "robust_model.lipschitz_constant" not in declared
        smaller = client.set_parameters(**{"robust_model.n": 200, **{f"{model}.{key}": 0 for model in (
            "standard_model", "robust_model") for key in ("crop_height", "crop_width")}})
        assert all(result.successful for result in smaller), smaller

        assert client.change_state("configure") and client.change_state("activate")
        assert client.lifecycle_state() == "active"
        article = np.repeat(np.repeat(images[5], 2, axis=0), 2, axis=1)  # 56x56, no crop needed
        after = publish_and_collect(client, {"after": article})["after"]
        assert after.status == Msg.STATUS_OK, after.status_message
        assert not client.results_for({"inactive"})
        assert after.certificate_method == (Msg.CERTIFICATE_RANDOMIZED_SMOOTHING if after.certified_radius > 0
                                            else Msg.CERTIFICATE_NONE)
        assert after.confidence == (pytest.approx(0.999) if after.certified_radius > 0 else 0.0)
        # without the crop, the whole 56x56 frame is the model input: l2 gain of a 2x area resize is 1/2;
        # the bound of the preprocessing's float32 error is subtracted first, so never more than 2r
        if after.certified_radius > 0:
            assert 0.99 * 2 * after.certified_radius <= after.image_radius <= 2 * after.certified_radius


@pytest.mark.parametrize("executable", ["mixclf_node", "mixclf_camera_sim", "mixclf_monitor", "mixclf_demo",
                                        "mixclf_eval"])
def test_installed_executables_print_usage_on_help_and_start_nothing(executable, installed_prefix):
    import subprocess

    path = installed_prefix / "lib" / "mixclf_ros" / executable
    try:
        result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{executable} --help did not exit: it started instead of printing its usage")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower(), result.stdout[:2000]
    if executable == "mixclf_node":
        assert "alpha = 0.6 (live)" in result.stdout and "frame_policy = 'newest' (configure)" in result.stdout
