"""Test helpers: start the installed node as a process, and talk to it over real DDS."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from conftest import REPO_ROOT

TEST_TORCH_THREADS = 1
"""torch threads of every node a test starts (unless the test sets them): one, leaving the second
core of a small test machine to the test and DDS."""


@contextmanager
def node_process(executable: str, *ros_args: str, log_path: Path, env: dict | None = None):
    """Runs `install/mixclf_ros/lib/mixclf_ros/<executable> --ros-args <ros_args>`; on exit sends
    SIGINT and checks that the process ends by itself."""
    path = REPO_ROOT / "install" / "mixclf_ros" / "lib" / "mixclf_ros" / executable
    if executable == "mixclf_node" and not any("torch_threads" in argument for argument in ros_args):
        # a fixed thread plan: a measured one (torch_threads 0) depends on the machine's load
        ros_args = (*ros_args, "-p", f"torch_threads:={TEST_TORCH_THREADS}")
    log = open(log_path, "w")
    process = subprocess.Popen([str(path), "--ros-args", *ros_args], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise AssertionError(f"{executable} did not stop on SIGINT; log: {log_path}") from None
        log.close()


@contextmanager
def node_with_client(*ros_args: str, log_path: Path, env: dict | None = None, client_name: str = "test_client",
                 reliable: bool = False, domain_id: int | None = None):
    """The installed mixclf node with `ros_args`, and a `RosClient` that has seen it classify a
    frame; yields (client, process). Checks the node exits 0 on SIGINT. `domain_id`: a ROS domain of
    their own (default: the session's), so that another running node cannot answer."""
    import rclpy

    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain_id)
    if domain_id is not None:
        env = {**(env or {}), "ROS_DOMAIN_ID": str(domain_id)}
    with node_process("mixclf_node", *ros_args, log_path=log_path, env=env) as process:
        client = RosClient(context, name=client_name, reliable=reliable)
        try:
            client.wait_until_ready()
            yield client, process
        finally:
            client.close()
            rclpy.try_shutdown(context=context)
    assert process.returncode == 0, f"node exit code {process.returncode}: {log_path.read_text()[-3000:]}"


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class RosClient:
    """A test-side rclpy node spun in a background thread: publishes frames, collects results,
    sets parameters through the SetParameters service (what `ros2 param set` does)."""

    def __init__(self, context, name: str = "test_client", node_name: str = "mixclf", reliable: bool = False,
                 single_threaded: bool = False):
        """`single_threaded`: spin a SingleThreadedExecutor (what `make bench` measures with: rclpy's
        MultiThreadedExecutor at times delivered results 100 to 1,000 ms late, to any node)."""
        import rclpy
        from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
        from rclpy.parameter_client import AsyncParameterClient
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage, Image

        from mixclf_ros.msg import CertifiedClassification

        self.node = rclpy.create_node(name, context=context)
        self.results: list[CertifiedClassification] = []
        self.lock = threading.Condition()
        frames_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE if reliable
                                else ReliabilityPolicy.BEST_EFFORT)
        self.image_publisher = self.node.create_publisher(Image, "image", frames_qos)
        self.compressed_publisher = self.node.create_publisher(CompressedImage, "image/compressed", frames_qos)
        self.node.create_subscription(CertifiedClassification, "certified_classification", self._on_result, 100)
        self.target_node = node_name
        # deep response queue: a storm of concurrent requests must not overflow the client side
        self.parameters = AsyncParameterClient(self.node, node_name, qos_profile=QoSProfile(depth=1000))
        self.executor = (SingleThreadedExecutor(context=context) if single_threaded
                         else MultiThreadedExecutor(num_threads=2, context=context))
        self.executor.add_node(self.node)
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        """The executor's spin, surviving entities the test thread destroys meanwhile: a subscription
        made for one wait (e.g. on /diagnostics) and destroyed while the executor builds its wait
        set raised InvalidHandle in the spin thread, which died, and the client heard nothing more."""
        from rclpy.executors import ExternalShutdownException, ShutdownException
        from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

        while not self._stopping.is_set():
            try:
                self.executor.spin_once(timeout_sec=0.1)
            except _rclpy.InvalidHandle:
                continue  # the next wait set is built without it
            except (ShutdownException, ExternalShutdownException):
                return

    def _on_result(self, message) -> None:
        with self.lock:
            self.results.append(message)
            self.lock.notify_all()

    def close(self) -> None:
        self._stopping.set()
        self.thread.join(timeout=5.0)
        self.executor.shutdown()
        self.node.destroy_node()

    def clear(self) -> None:
        with self.lock:
            self.results.clear()

    def results_for(self, frame_ids: set[str]) -> dict:
        with self.lock:
            return {r.header.frame_id: r for r in self.results if r.header.frame_id in frame_ids}

    def wait_for(self, frame_ids: set[str], timeout: float = 20.0) -> dict:
        """Results for `frame_ids`, as soon as all have arrived (woken by each arrival), or
        whatever arrived within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                found = self.results_for(frame_ids)  # the Condition's lock is reentrant
                remaining = deadline - time.monotonic()
                if len(found) == len(frame_ids) or remaining <= 0:
                    return found
                self.lock.wait(remaining)

    def wait_until_ready(self, timeout: float = 90.0, probe_timeout: float = 0.5) -> None:
        """Publishes a probe frame until a result with status OK comes back, waiting `probe_timeout`
        seconds for each (longer for slow models, e.g. smoothing with many samples)."""
        from mixclf_ros.msg import CertifiedClassification as Msg

        deadline = time.monotonic() + timeout
        index = 0
        while time.monotonic() < deadline:
            frame_id = f"probe-{index}"
            self.image_publisher.publish(image_message(np.zeros((480, 640, 3), np.uint8), frame_id, self.node))
            found = self.wait_for({frame_id}, timeout=probe_timeout)
            if found and found[frame_id].status == Msg.STATUS_OK:
                return
            index += 1
        raise AssertionError("node did not become ready")

    def set_parameters(self, **values):
        """`ros2 param set`: a SetParameters service call; returns the per-parameter results."""
        from rclpy.parameter import Parameter

        assert self.parameters.wait_for_services(timeout_sec=20.0), "parameter services not available"
        future = self.parameters.set_parameters([Parameter(name, value=value) for name, value in values.items()])
        deadline = time.monotonic() + 60  # not re-sent: a set is not read-only
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), "SetParameters did not answer"
        return future.result().results

    def set_raw_parameter(self, name: str, parameter_value):
        """SetParameters with a hand-built rcl_interfaces ParameterValue (any type)."""
        from rcl_interfaces.msg import Parameter as ParameterMsg
        from rcl_interfaces.srv import SetParameters

        request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=parameter_value)])
        return self._call(SetParameters, "set_parameters", request).results[0]

    def _call(self, service_type, name: str, request):
        client = self.node.create_client(service_type, f"/{self.target_node}/{name}")
        try:
            assert client.wait_for_service(timeout_sec=30.0), f"/{self.target_node}/{name} not available"
            future = client.call_async(request)
            deadline = time.monotonic() + 120  # configure loads and warms up both models
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert future.done(), f"/{self.target_node}/{name} did not answer"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def lifecycle_state(self) -> str:
        """The node's lifecycle state label (`<node>/get_state`), e.g. 'active'."""
        from lifecycle_msgs.srv import GetState

        return self._call(GetState, "get_state", GetState.Request()).current_state.label

    def change_state(self, transition: str) -> bool:
        """Triggers a lifecycle transition by label (`<node>/change_state`): configure, activate,
        deactivate, cleanup; returns whether it succeeded."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        transition_id = getattr(Transition, f"TRANSITION_{transition.upper()}")
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self._call(ChangeState, "change_state", request).success

    def _query(self, send, what: str, timeout: float = 60.0, resend_after: float = 5.0):
        """The answer to a read-only service request, re-sent every `resend_after` seconds: a reply
        can be lost when the server has not yet matched this client's reply reader (the service is
        "available" once the request topic matches), which waiting longer never mends."""
        assert self.parameters.wait_for_services(timeout_sec=20.0), "parameter services not available"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            future = send()
            resend = min(deadline, time.monotonic() + resend_after)
            while not future.done() and time.monotonic() < resend:
                time.sleep(0.01)
            if future.done():
                return future.result()
            future.cancel()
        raise AssertionError(f"{what} did not answer in {timeout:.0f} s")

    def get_parameters(self, *names: str) -> list:
        return self._query(lambda: self.parameters.get_parameters(list(names)), "GetParameters").values

    def list_parameters(self) -> list[str]:
        return list(self._query(self.parameters.list_parameters, "ListParameters").result.names)


def camera_counters(client: RosClient, topic: str = "image") -> dict[str, int]:
    """The node's counters of camera `topic`, from the next /diagnostics message."""
    from diagnostic_msgs.msg import DiagnosticArray

    arrays: list[DiagnosticArray] = []
    subscription = client.node.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 10)
    try:
        deadline = time.monotonic() + 30
        while not arrays and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.node.destroy_subscription(subscription)
    [status] = [s for s in arrays[0].status if s.name.endswith(f"camera {topic}")]
    return {kv.key: int(kv.value) for kv in status.values if kv.value.isdigit()}


def image_message(pixels: np.ndarray, frame_id: str, node, encoding: str | None = None, stamp=None):
    """A sensor_msgs/Image from an HxW or HxWxC array, stamped now (or `stamp`)."""
    from sensor_msgs.msg import Image

    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if encoding is None:
        encoding = {1: "mono8", 3: "rgb8", 4: "rgba8"}[channels]
    message = Image()
    message.header.frame_id = frame_id
    message.header.stamp = stamp if stamp is not None else node.get_clock().now().to_msg()
    message.height, message.width = pixels.shape[:2]
    message.encoding = encoding
    message.is_bigendian = 0
    message.step = pixels.shape[1] * channels * pixels.dtype.itemsize
    message.data = np.ascontiguousarray(pixels).tobytes()
    return message
