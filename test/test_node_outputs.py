"""The node as a robot integrator meets it, over real DDS: one transport per camera, the lifecycle
publisher, fully qualified diagnostics names, the debug image, and vision_msgs where installed.

One node runs in namespace /front, in a ROS domain of its own, subscribing to the compressed
transport with the debug image on."""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT
from rosutil import image_message, node_process

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

NAMESPACE = "/front"


class Client:
    """Publishes raw and compressed frames of one camera; collects what the node publishes."""

    def __init__(self, context):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        from mixclf_ros.msg import CertifiedClassification

        self.node = rclpy.create_node("outputs_client", context=context)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.raw = self.node.create_publisher(Image, f"{NAMESPACE}/image", qos)
        self.compressed = self.node.create_publisher(CompressedImage, f"{NAMESPACE}/image/compressed", qos)
        self.lock = threading.Condition()
        self.results: list = []
        self.debug_images: list = []
        self.diagnostics: list = []
        self.node.create_subscription(CertifiedClassification, f"{NAMESPACE}/certified_classification",
                                      self._add(self.results), 100)
        self.node.create_subscription(Image, f"{NAMESPACE}/mixclf/debug_image", self._add(self.debug_images), 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._add(self.diagnostics), 10)
        self.executor = MultiThreadedExecutor(num_threads=2, context=context)
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _add(self, into: list):
        def add(message) -> None:
            with self.lock:
                into.append(message)
                self.lock.notify_all()
        return add

    def wait(self, condition, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not (found := condition()) and time.monotonic() < deadline:
                self.lock.wait(0.2)
            return found

    def publish_both(self, pixels: np.ndarray, frame_id: str) -> None:
        """The same frame on both transports, as a camera driver with image_transport does."""
        from sensor_msgs.msg import CompressedImage

        raw = image_message(pixels, frame_id, self.node)
        png = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))[1].tobytes()
        self.raw.publish(raw)
        self.compressed.publish(CompressedImage(header=raw.header, format="png", data=png))

    def results_for(self, frame_id: str) -> list:
        with self.lock:
            return [r for r in self.results if r.header.frame_id == frame_id]

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.fixture(scope="module")
def front_node(tmp_path_factory, installed_prefix):
    import rclpy

    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article

    domain = int(os.environ["ROS_DOMAIN_ID"]) + 102
    log = tmp_path_factory.mktemp("front") / "mixclf_node.log"
    args = ["--params-file", str(REPO_ROOT / "config" / "mixclf.yaml"), "-r", f"__ns:={NAMESPACE}",
            "-p", "image_transport:=compressed", "-p", "debug_image:=true", "-p", "frame_policy:=every",
            "-p", "max_image_age:=10.0", "-p", "device:=cpu",
            "-p", f"qos_overrides.{NAMESPACE}/image/compressed.subscription.reliability:=reliable",
            "-p", f"qos_overrides.{NAMESPACE}/image/compressed.subscription.depth:=10"]
    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain)
    images, _ = load_fashion_mnist("test")
    frames = [embed_article(images[i]) for i in range(6)]
    with node_process("mixclf_node", *args, log_path=log, env={"ROS_DOMAIN_ID": str(domain)}) as process:
        client = Client(context)
        try:
            for index in range(600):  # until the node is active and discovered: a probe gets a result
                client.publish_both(frames[0], f"probe-{index}")
                if client.wait(lambda index=index: client.results_for(f"probe-{index}"), timeout=0.5):
                    break
            else:
                raise AssertionError(f"node did not answer; log: {log.read_text()[-2000:]}")
            yield client, frames, process, log
        finally:
            client.close()
            rclpy.try_shutdown(context=context)
    assert process.returncode == 0, log.read_text()[-3000:]


def test_a_camera_publishing_both_transports_gets_one_result_per_frame(front_node):
    from mixclf_ros.msg import CertifiedClassification as Msg

    client, frames, _, _ = front_node
    ids = [f"both-{index}" for index in range(5)]
    for frame_id, pixels in zip(ids, frames):
        client.publish_both(pixels, frame_id)
        time.sleep(0.1)
    client.publish_both(frames[5], "last")
    assert client.wait(lambda: client.results_for("last"))  # every earlier result has arrived by now
    for frame_id in ids:
        results = client.results_for(frame_id)
        assert len(results) == 1, (frame_id, len(results))
        assert results[0].status == Msg.STATUS_OK
    assert client.node.count_subscribers(f"{NAMESPACE}/image") == 0  # raw: not subscribed at all
    assert client.node.count_subscribers(f"{NAMESPACE}/image/compressed") == 1


def test_bad_compressed_frame_gets_bad_input(front_node):
    from sensor_msgs.msg import CompressedImage

    from mixclf_ros.msg import CertifiedClassification as Msg

    client, _, process, _ = front_node
    garbage = CompressedImage(format="jpeg", data=b"\xff\xd8 definitely not a jpeg")
    garbage.header.frame_id, garbage.header.stamp = "bad-compressed", client.node.get_clock().now().to_msg()
    client.compressed.publish(garbage)
    [result] = client.wait(lambda: client.results_for("bad-compressed"))
    assert result.status == Msg.STATUS_BAD_INPUT and not result.safe and result.status_message
    assert process.poll() is None


def test_debug_image_shows_the_result(front_node):
    from mixclf_ros.vision.annotate import SAFE_GREEN, UNSAFE_RED

    client, frames, _, _ = front_node
    client.publish_both(frames[1], "debug-1")
    [result] = client.wait(lambda: client.results_for("debug-1"))
    [image] = client.wait(lambda: [m for m in client.debug_images if m.header.frame_id == "debug-1"])
    assert (image.height, image.width, image.encoding) == (480, 640, "rgb8")
    pixels = np.frombuffer(bytes(image.data), np.uint8).reshape(480, 640, 3)
    corner = pixels[:40, -120:].reshape(-1, 3)
    badge = SAFE_GREEN if result.safe else UNSAFE_RED
    assert (corner == badge).all(axis=1).sum() > 100
    assert not (corner == (UNSAFE_RED if result.safe else SAFE_GREEN)).all(axis=1).any()
    assert (pixels[300:] == frames[1][300:]).all()  # the scene itself is unchanged below the band


def test_diagnostics_are_named_by_the_fully_qualified_node_name(front_node):
    client, _, _, _ = front_node
    names = client.wait(lambda: {s.name for array in client.diagnostics for s in array.status})
    assert f"{NAMESPACE}/mixclf: classifier" in names
    assert f"{NAMESPACE}/mixclf: camera image/compressed" in names


def test_vision_msgs_classification_and_label_info(front_node):
    pytest.importorskip("vision_msgs")
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from vision_msgs.msg import Classification, LabelInfo

    client, frames, _, _ = front_node
    labels, classifications = [], []
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    client.node.create_subscription(LabelInfo, f"{NAMESPACE}/label_info", client._add(labels), latched)
    client.node.create_subscription(Classification, f"{NAMESPACE}/classification", client._add(classifications), 10)
    assert client.wait(lambda: labels)  # transient local: a late subscriber gets it
    assert [c.class_name for c in labels[0].class_map][:2] == ["T-shirt/top", "Trouser"]
    time.sleep(1.0)  # let the new subscription match before the frame goes out
    client.publish_both(frames[2], "vision-2")
    [result] = client.wait(lambda: client.results_for("vision-2"))
    [message] = client.wait(lambda: [m for m in classifications if m.header.frame_id == "vision-2"])
    assert message.results[0].class_id == str(result.class_id)
    assert message.results[0].score == pytest.approx(result.probability)


def test_results_publisher_lives_from_configure_to_cleanup(front_node):
    """The result publisher is a lifecycle publisher: gone after cleanup, back after configure."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    client, frames, _, _ = front_node
    topic = f"{NAMESPACE}/certified_classification"
    service = client.node.create_client(ChangeState, f"{NAMESPACE}/mixclf/change_state")
    assert service.wait_for_service(timeout_sec=30)

    def change(transition_id: int) -> bool:
        future = service.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        return bool(client.wait(lambda: future.done()) and future.result().success)

    assert change(Transition.TRANSITION_DEACTIVATE) and change(Transition.TRANSITION_CLEANUP)
    assert client.wait(lambda: client.node.count_publishers(topic) == 0)
    assert change(Transition.TRANSITION_CONFIGURE)
    assert client.wait(lambda: client.node.count_publishers(topic) == 1)
    assert change(Transition.TRANSITION_ACTIVATE)
    client.publish_both(frames[3], "reactivated")
    assert client.wait(lambda: client.results_for("reactivated"))


# ------------------------------------------------------------------------------ without DDS
def test_camera_topics_follow_image_transport_naming():
    from sensor_msgs.msg import CompressedImage, Image

    from mixclf_ros.ros.messages import camera_topics

    assert camera_topics(["image", "", "rear/image"], "raw") == [("image", Image), ("rear/image", Image)]
    assert camera_topics(["image"], "compressed") == [("image/compressed", CompressedImage)]
    with pytest.raises(ValueError, match="image_transport"):
        camera_topics(["image"], "theora")


def test_a_depth_model_takes_raw_depth_only():
    from sensor_msgs.msg import CompressedImage, Image

    from mixclf_ros.ros.messages import decode_message
    from mixclf_ros.vision.decode import BadImageError

    depth = Image(encoding="16UC1", height=2, width=2, step=4, data=bytes(8))
    assert decode_message(depth, "depth").pixels.shape == (2, 2, 1)
    with pytest.raises(BadImageError, match="REP-118"):
        decode_message(depth)
    with pytest.raises(BadImageError, match="depth model"):
        decode_message(CompressedImage(format="png", data=cv2.imencode(".png", np.zeros((2, 2), np.uint16))[1]
                                       .tobytes()), "depth")
