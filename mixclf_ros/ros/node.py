"""ROS 2 glue: the managed node `mixclf` (executable `mixclf_node`).

Subscribes to camera topics, hands the newest frame of each camera (`frame_policy` newest; or every
frame in order, `frame_policy` every) to `pipeline.CertifiedClassifier` and publishes one
`CertifiedClassification` per processed frame.
All the math lives in the library; this module only moves messages, parameters and state.

Lifecycle (rclpy managed node):
  configure  - read parameters, subscribe (frames get NOT_READY), load both models, move them to
               the device, warm up (time reported in the log and diagnostics)
  activate   - start the inference worker: frames get certified results
  deactivate - stop the worker: frames get NOT_READY
  cleanup    - unsubscribe and release the models (GPU memory included)
`autostart` (default true) runs configure and activate at start-up.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.time import Time
from sensor_msgs.msg import CompressedImage, Image

from mixclf_ros.msg import CertifiedClassification
from mixclf_ros.runtime.classifier import (
    NORM_CODES,
    CertifiedClassifier,
    FrameResult,
    LiveSettings,
    Status,
    select_device,
)
from mixclf_ros.vision.decode import BadImageError, decode_compressed, decode_image
from mixclf_ros.vision.preprocess import PreprocessConfig

MODEL_KEYS: dict[str, tuple[int, object, str]] = {
    # key: (parameter type, default, description); the model config keys of mixclf_ros.models.loading
    "architecture": (ParameterType.PARAMETER_STRING, "", "project builder name, 'torchvision:<name>' "
                     "or 'package.module:Callable'"),
    "weights": (ParameterType.PARAMETER_STRING, "", "'zoo:<file>' (shipped) or a path: a state_dict "
                "(loaded with weights_only=True) or a TorchScript file"),
    "sha256": (ParameterType.PARAMETER_STRING, "", "expected sha256 of the weights file ('' = unchecked)"),
    "num_classes": (ParameterType.PARAMETER_INTEGER, 10, "number of output classes"),
    "input_channels": (ParameterType.PARAMETER_INTEGER, 1, "model input channels (1 or 3)"),
    "input_height": (ParameterType.PARAMETER_INTEGER, 28, "model input height in pixels"),
    "input_width": (ParameterType.PARAMETER_INTEGER, 28, "model input width in pixels"),
    "mean": (ParameterType.PARAMETER_DOUBLE_ARRAY, [0.0], "per-channel mean of [0,1] pixels"),
    "std": (ParameterType.PARAMETER_DOUBLE_ARRAY, [1.0], "per-channel std of [0,1] pixels"),
    "kind": (ParameterType.PARAMETER_STRING, "standard", "standard | empirical | lipschitz | smoothing"),
    "norm": (ParameterType.PARAMETER_STRING, "l2", "certificate norm of a lipschitz model: l2 | linf"),
    "lipschitz_constant": (ParameterType.PARAMETER_DOUBLE, 0.0, "declared Lipschitz constant of the "
                           "probability outputs (> 0), or 0 to compute a sound bound"),
    "sigma": (ParameterType.PARAMETER_DOUBLE, 0.25, "smoothing noise std, [0,1]-pixel units"),
    "n0": (ParameterType.PARAMETER_INTEGER, 64, "smoothing: noise samples to select the class"),
    "n": (ParameterType.PARAMETER_INTEGER, 1000, "smoothing: noise samples to bound the probabilities"),
}

MAX_QUEUED_FRAMES = 100  # frame_policy "every": frames kept per camera before the oldest is dropped
LIVE_PARAMETERS = ("alpha", "safe_radius", "max_image_age", "confidence")


def _descriptor(description: str, parameter_type: int, read_only: bool = False,
                float_range: tuple[float, float] | None = None,
                integer_range: tuple[int, int] | None = None) -> ParameterDescriptor:
    descriptor = ParameterDescriptor(description=description, type=parameter_type, read_only=read_only)
    if float_range is not None:
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=float(float_range[0]), to_value=float(float_range[1]), step=0.0)]
    if integer_range is not None:
        descriptor.integer_range = [IntegerRange(from_value=integer_range[0], to_value=integer_range[1], step=0)]
    return descriptor


@dataclass
class CameraStats:
    """Counters of one camera topic, for diagnostics."""

    received: int = 0
    processed: int = 0
    dropped: int = 0  # replaced by a newer frame before inference got to it
    bad_input: int = 0
    stale: int = 0
    not_ready: int = 0
    model_error: int = 0
    suspected_lost: int = 0  # gaps in header stamps larger than 1.5x the usual frame interval
    safe: int = 0
    last_receive: float | None = None
    last_stamp: float | None = None
    stamp_intervals: deque = field(default_factory=lambda: deque(maxlen=30))
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=300))

    def note_stamp(self, stamp_s: float) -> None:
        if self.last_stamp is not None and stamp_s > self.last_stamp:
            interval = stamp_s - self.last_stamp
            if len(self.stamp_intervals) >= 5:
                usual = sorted(self.stamp_intervals)[len(self.stamp_intervals) // 2]
                if usual > 0 and interval > 1.5 * usual:
                    self.suspected_lost += max(1, round(interval / usual) - 1)
            self.stamp_intervals.append(interval)
        self.last_stamp = stamp_s


@dataclass
class PendingFrame:
    topic: str
    message: Image | CompressedImage
    received: float


class MixclfNode(LifecycleNode):
    """Certified mixed classification of camera frames (see module docstring)."""

    def __init__(self, node_name: str = "mixclf", **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        p = self.get_parameter
        self._settings = LiveSettings(
            alpha=p("alpha").value, safe_radius=p("safe_radius").value, confidence=p("confidence").value)
        self._max_image_age = p("max_image_age").value
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._lock = threading.Condition()
        self._pending: dict[str, deque[PendingFrame]] = {}
        self._keep_every_frame = False
        self._stats: dict[str, CameraStats] = {}
        self._classifier: CertifiedClassifier | None = None
        self._active = False
        self._worker: threading.Thread | None = None
        self._camera_subscriptions = []
        self._publisher = None
        self._warmup_ms = float("nan")
        self._last_error = ""
        self._log_times: dict[str, float] = {}
        self._frames_cb_group = ReentrantCallbackGroup()

        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(p("diagnostics_period").value, self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())
        if p("autostart").value:
            self._autostart_timer = self.create_timer(
                0.0, self._autostart, callback_group=MutuallyExclusiveCallbackGroup())

    # ---------------------------------------------------------------- parameters
    def _declare_parameters(self) -> None:
        double, integer = ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_INTEGER
        string, boolean = ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_BOOL
        string_array = ParameterType.PARAMETER_STRING_ARRAY
        declared = [
            ("alpha", 0.6, _descriptor(
                "weight of the robust model in the mixture; certificates need alpha >= 0.5 (live)",
                double, float_range=(0.0, 1.0))),
            ("safe_radius", 0.0, _descriptor(
                "safe = true needs certified_radius >= this (model-input [0,1] pixel units) (live)",
                double, float_range=(0.0, 1e6))),
            ("max_image_age", 1.0, _descriptor(
                "frames whose header stamp is older than this many seconds are STALE; 0 disables (live)",
                double, float_range=(0.0, 3600.0))),
            ("confidence", 0.999, _descriptor(
                "randomized smoothing: probability that a certificate holds, 1 - beta (live)",
                double, float_range=(0.5, 1.0 - 1e-12))),
            ("image_topics", ["image"], _descriptor(
                "camera topics (sensor_msgs/Image), relative names so remapping and namespaces apply",
                string_array, read_only=True)),
            ("enable_compressed", False, _descriptor(
                "also subscribe to sensor_msgs/CompressedImage on <topic>/compressed", boolean, read_only=True)),
            ("device", "auto", _descriptor(
                "auto (first CUDA device, else CPU), cpu, cuda:N", string, read_only=True)),
            ("standard_precision", "float32", _descriptor(
                "float32 | float16 | bfloat16 for the standard model (CUDA only)", string, read_only=True)),
            ("torch_threads", int(os.environ.get("MIXCLF_TORCH_THREADS", "1")), _descriptor(
                "CPU threads for torch (1 is fastest for small models, one frame at a time)",
                integer, read_only=True, integer_range=(1, 256))),
            ("crop_height", 0, _descriptor("centre crop height in source pixels, 0 = none", integer,
                                           read_only=True, integer_range=(0, 100000))),
            ("crop_width", 0, _descriptor("centre crop width in source pixels, 0 = none", integer,
                                          read_only=True, integer_range=(0, 100000))),
            ("resize", "area", _descriptor("resize mode to the model input: area | bilinear", string,
                                           read_only=True)),
            ("frame_policy", "newest", _descriptor(
                "newest: classify only the newest frame of each camera (real time; older frames are "
                "dropped and counted) | every: classify every frame in order, up to "
                f"{MAX_QUEUED_FRAMES} queued per camera (playback, evaluation)", string, read_only=True)),
            ("class_names", [""], _descriptor(
                "class names, index = class id (empty: the robust model's, if any)", string_array,
                read_only=True)),
            ("diagnostics_period", 1.0, _descriptor("seconds between /diagnostics messages", double,
                                                    read_only=True, float_range=(0.05, 60.0))),
            ("camera_timeout", 2.0, _descriptor(
                "seconds without frames after which a camera is reported WARN", double,
                float_range=(0.1, 3600.0))),
            ("autostart", True, _descriptor("configure and activate at start-up", boolean, read_only=True)),
            ("seed", 0, _descriptor("seed of the randomized-smoothing noise", integer, read_only=True)),
        ]
        for prefix in ("standard_model", "robust_model"):
            for key, (parameter_type, default, description) in MODEL_KEYS.items():
                declared.append((f"{prefix}.{key}", default,
                                 _descriptor(f"{prefix}: {description}", parameter_type, read_only=True)))
        for name, default, descriptor in declared:
            self.declare_parameter(name, default, descriptor)

    def _on_set_parameters(self, parameters) -> SetParametersResult:
        """Validates live changes from the request itself and swaps them in atomically."""
        changes: dict[str, float] = {}
        for parameter in parameters:
            if parameter.name not in LIVE_PARAMETERS + ("camera_timeout",):
                continue  # read-only and range checks are done by rclpy from the descriptors
            value = parameter.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return SetParametersResult(successful=False, reason=f"{parameter.name} must be a double")
            if not math.isfinite(value):
                return SetParametersResult(successful=False, reason=f"{parameter.name} must be finite")
            changes[parameter.name] = float(value)
        if "alpha" in changes and not 0.0 <= changes["alpha"] <= 1.0:
            return SetParametersResult(successful=False, reason="alpha must be in [0, 1]")
        if changes.get("safe_radius", 0.0) < 0.0 or changes.get("max_image_age", 0.0) < 0.0:
            return SetParametersResult(successful=False, reason="safe_radius and max_image_age must be >= 0")
        if "confidence" in changes and not 0.5 <= changes["confidence"] < 1.0:
            return SetParametersResult(successful=False, reason="confidence must be in [0.5, 1)")
        live = {key: changes[key] for key in ("alpha", "safe_radius", "confidence") if key in changes}
        if live:
            self._settings = replace(self._settings, **live)  # one assignment: atomic for readers
        if "max_image_age" in changes:
            self._max_image_age = changes["max_image_age"]
        if "alpha" in changes and changes["alpha"] < 0.5:
            self.get_logger().warning(f"alpha = {changes['alpha']} < 0.5: no certificate, every frame unsafe")
        return SetParametersResult(successful=True)

    def _model_config(self, prefix: str) -> dict:
        config = {key: self.get_parameter(f"{prefix}.{key}").value for key in MODEL_KEYS}
        config["mean"], config["std"] = list(config["mean"]), list(config["std"])
        if prefix == "robust_model" and config["kind"] == "smoothing":
            config["beta"] = 1.0 - self._settings.confidence
        return config

    # ---------------------------------------------------------------- lifecycle
    def _autostart(self) -> None:
        self._autostart_timer.cancel()
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from mixclf_ros.models.loading import check_compatible, load_model

        self._subscribe()
        started = time.perf_counter()
        try:
            import torch

            policy = self.get_parameter("frame_policy").value
            if policy not in ("newest", "every"):
                raise ValueError(f"frame_policy must be 'newest' or 'every', got {policy!r}")
            self._keep_every_frame = policy == "every"

            torch.set_num_threads(self.get_parameter("torch_threads").value)
            device = select_device(self.get_parameter("device").value)
            standard = load_model(self._model_config("standard_model"))
            robust = load_model(self._model_config("robust_model"))
            check_compatible(standard, robust)
            channels, height, width = robust.input_shape
            preprocess = PreprocessConfig(
                output_channels=channels, output_height=height, output_width=width,
                crop_height=self.get_parameter("crop_height").value,
                crop_width=self.get_parameter("crop_width").value,
                resize=self.get_parameter("resize").value, device=str(device))
            classifier = CertifiedClassifier(
                standard, robust, preprocess, device,
                standard_precision=self.get_parameter("standard_precision").value,
                seed=self.get_parameter("seed").value)
            self._warmup_ms = classifier.warm_up(self._settings)
        except Exception as error:  # every configuration mistake is one clear log line
            self._last_error = f"configure failed: {error}"
            self.get_logger().error(self._last_error)
            self._unsubscribe()
            return TransitionCallbackReturn.FAILURE
        names = [name for name in self.get_parameter("class_names").value if name]
        self._class_names = names or list(getattr(robust, "class_names", []) or [])
        self._classifier = classifier
        self.get_logger().info(
            f"configured on {device}: standard={standard.config['architecture']}, "
            f"robust={robust.config['architecture']} ({robust.kind}, {classifier.norm}"
            + (f", Lipschitz {robust.lipschitz_constant:.4g} {robust.lipschitz_source}"
               if robust.kind == "lipschitz" else "")
            + f"); load {1e3 * (time.perf_counter() - started):.0f} ms, first warm-up pass "
            f"{self._warmup_ms:.1f} ms")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = True
        self._worker = threading.Thread(target=self._inference_loop, name="mixclf-inference", daemon=True)
        self._worker.start()
        self.get_logger().info(f"active: alpha={self._settings.alpha}, topics {self._topic_names()}")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._unsubscribe()
        self._release_models()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._camera_subscriptions = []  # destroyed with the node
        self._release_models()
        return TransitionCallbackReturn.SUCCESS

    def _release_models(self) -> None:
        classifier, self._classifier = self._classifier, None
        if classifier is not None and classifier.device.type == "cuda":
            import torch

            del classifier
            torch.cuda.empty_cache()

    def _stop_worker(self) -> None:
        with self._lock:
            self._active = False
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=10.0)
            self._worker = None

    def _topic_names(self) -> list[str]:
        return [topic for topic in self.get_parameter("image_topics").value if topic]

    def _subscribe(self) -> None:
        if self._camera_subscriptions:
            return
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        overrides = QoSOverridingOptions.with_default_policies()
        self._publisher = self.create_publisher(CertifiedClassification, "certified_classification", 10)
        topics = [(topic, Image) for topic in self._topic_names()]
        if self.get_parameter("enable_compressed").value:
            topics += [(f"{topic}/compressed", CompressedImage) for topic in self._topic_names()]
        for topic, message_type in topics:
            self._stats.setdefault(topic, CameraStats())
            self._camera_subscriptions.append(self.create_subscription(
                message_type, topic, lambda message, topic=topic: self._on_frame(topic, message), qos,
                callback_group=self._frames_cb_group, qos_overriding_options=overrides))

    def _unsubscribe(self) -> None:
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions = []
        with self._lock:
            self._pending.clear()

    # ---------------------------------------------------------------- frames
    def _on_frame(self, topic: str, message: Image | CompressedImage) -> None:
        now = time.monotonic()
        stats = self._stats[topic]
        with self._lock:
            stats.received += 1
            stats.last_receive = now
            stats.note_stamp(Time.from_msg(message.header.stamp).nanoseconds * 1e-9)
            if self._active:
                queue = self._pending.setdefault(topic, deque())
                if queue and (not self._keep_every_frame or len(queue) >= MAX_QUEUED_FRAMES):
                    queue.popleft()  # newest: only the newest frame is worth classifying; every: queue full
                    stats.dropped += 1
                queue.append(PendingFrame(topic, message, now))
                self._lock.notify()
                return
            stats.not_ready += 1
        self._publish(message.header, FrameResult.failure(
            Status.NOT_READY, "models loading or node not active", self._settings))

    def _inference_loop(self) -> None:
        while True:
            with self._lock:
                while self._active and not any(self._pending.values()):
                    self._lock.wait(timeout=0.5)
                if not self._active:
                    return
                # one batch: the oldest waiting frame of each camera
                frames = [queue.popleft() for queue in self._pending.values() if queue]
            try:
                self._process(frames)
            except Exception as error:  # keep serving: report, publish unsafe, continue
                self._last_error = f"inference loop: {type(error).__name__}: {error}"
                self._log_limited("loop", self._last_error)
                for frame in frames:
                    self._finish(frame, FrameResult.failure(Status.MODEL_ERROR, self._last_error, self._settings))

    def _process(self, frames: list[PendingFrame]) -> None:
        settings = self._settings  # one consistent snapshot for the whole batch
        now_ns = self.get_clock().now().nanoseconds
        batch, decoded = [], []
        for frame in frames:
            header = frame.message.header
            age = (now_ns - Time.from_msg(header.stamp).nanoseconds) * 1e-9
            if self._max_image_age > 0 and ((header.stamp.sec == 0 and header.stamp.nanosec == 0)
                                            or abs(age) > self._max_image_age):
                reason = f"image age {age:.3f} s exceeds max_image_age {self._max_image_age:.3f} s"
                if header.stamp.sec == 0 and header.stamp.nanosec == 0:
                    reason = "image has no stamp (0), its age is unknown"
                self._finish(frame, FrameResult.failure(Status.STALE, reason, settings))
                continue
            try:
                decoded.append(self._decode(frame.message))
                batch.append(frame)
            except BadImageError as error:
                self._finish(frame, FrameResult.failure(Status.BAD_INPUT, str(error), settings))
        if not batch:
            return
        classifier = self._classifier
        if classifier is None:
            for frame in batch:
                self._finish(frame, FrameResult.failure(Status.NOT_READY, "models not loaded", settings))
            return
        for frame, result in zip(batch, classifier.classify(decoded, settings)):
            self._finish(frame, result)

    @staticmethod
    def _decode(message: Image | CompressedImage):
        if isinstance(message, CompressedImage):
            return decode_compressed(message.format, message.data)
        return decode_image(message.encoding, message.height, message.width, message.step,
                            message.data, bool(message.is_bigendian))

    def _finish(self, frame: PendingFrame, result: FrameResult) -> None:
        stats = self._stats[frame.topic]
        with self._lock:
            stats.processed += 1
            stats.safe += int(result.safe)
            counter = {Status.BAD_INPUT: "bad_input", Status.STALE: "stale",
                       Status.MODEL_ERROR: "model_error", Status.NOT_READY: "not_ready"}.get(result.status)
            if counter:
                setattr(stats, counter, getattr(stats, counter) + 1)
            stats.latencies_ms.append(1e3 * (time.monotonic() - frame.received))
        if result.status != Status.OK:
            self._log_limited(f"{frame.topic}:{result.status.name}",
                              f"{frame.topic}: {result.status.name}: {result.status_message}")
            if result.status == Status.MODEL_ERROR:
                self._last_error = result.status_message
        self._publish(frame.message.header, result)

    def _publish(self, header, result: FrameResult) -> None:
        publisher = self._publisher
        if publisher is None:
            return
        message = CertifiedClassification()
        message.header = header
        message.status = int(result.status)
        message.status_message = result.status_message
        message.class_id = result.class_id
        names = getattr(self, "_class_names", [])
        message.class_name = names[result.class_id] if 0 <= result.class_id < len(names) else ""
        message.probability = result.probability
        message.alpha = result.alpha
        message.certificate_method = int(result.certificate_method)
        message.norm = NORM_CODES[result.norm]
        message.certified_radius = result.certified_radius
        message.image_radius = result.image_radius
        message.confidence = result.confidence
        message.safe_radius = result.safe_radius
        message.safe = result.safe
        message.robust_class_id = result.robust_class_id
        message.robust_margin = result.robust_margin
        message.standard_class_id = result.standard_class_id
        message.inference_ms = result.inference_ms
        publisher.publish(message)

    def _log_limited(self, key: str, text: str, period_s: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._log_times.get(key, -math.inf) >= period_s:
            self._log_times[key] = now
            self.get_logger().warning(text)

    # ---------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        camera_timeout = self.get_parameter("camera_timeout").value
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        classifier = self._classifier
        summary = DiagnosticStatus(name=f"{self.get_name()}: classifier", hardware_id=self.get_fully_qualified_name())
        state = "active" if self._active else ("configured" if classifier else "unconfigured")
        summary.level = DiagnosticStatus.OK if self._active else DiagnosticStatus.WARN
        summary.message = state if not self._last_error else f"{state}; last error: {self._last_error}"
        summary.values = [
            KeyValue(key="state", value=state),
            KeyValue(key="device", value=str(classifier.device) if classifier else ""),
            KeyValue(key="robust_kind", value=classifier.kind if classifier else ""),
            KeyValue(key="certificate_norm", value=classifier.norm if classifier else ""),
            KeyValue(key="warmup_ms", value=f"{self._warmup_ms:.1f}"),
            KeyValue(key="alpha", value=f"{self._settings.alpha}"),
            KeyValue(key="safe_radius", value=f"{self._settings.safe_radius}"),
            KeyValue(key="last_error", value=self._last_error),
        ]
        array.status.append(summary)
        with self._lock:
            snapshot = {topic: replace(stats, latencies_ms=list(stats.latencies_ms))
                        for topic, stats in self._stats.items()}
        for topic, stats in snapshot.items():
            status = DiagnosticStatus(name=f"{self.get_name()}: camera {topic}",
                                      hardware_id=self.get_fully_qualified_name())
            quiet_s = None if stats.last_receive is None else now - stats.last_receive
            latencies = sorted(stats.latencies_ms)
            values = {
                "frames_received": stats.received, "frames_processed": stats.processed,
                "frames_dropped_newer_arrived": stats.dropped, "frames_suspected_lost_in_transport":
                stats.suspected_lost, "bad_input": stats.bad_input, "stale": stats.stale,
                "model_error": stats.model_error, "not_ready": stats.not_ready,
                "safe_fraction": f"{stats.safe / stats.processed:.3f}" if stats.processed else "n/a",
                "latency_p50_ms": f"{latencies[len(latencies) // 2]:.2f}" if latencies else "n/a",
                "latency_p99_ms": f"{latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]:.2f}"
                if latencies else "n/a",
                "seconds_since_last_frame": "never" if quiet_s is None else f"{quiet_s:.2f}",
            }
            status.values = [KeyValue(key=key, value=str(value)) for key, value in values.items()]
            if quiet_s is None or quiet_s > camera_timeout:
                status.level, status.message = DiagnosticStatus.WARN, "no frames" if quiet_s is None else \
                    f"camera quiet for {quiet_s:.1f} s"
            elif stats.suspected_lost:
                status.level = DiagnosticStatus.WARN
                status.message = (f"{stats.suspected_lost} frames suspected lost in transport (gaps in "
                                  "header stamps; large images over Fast DDS: set FASTDDS_BUILTIN_TRANSPORTS)")
            else:
                status.level, status.message = DiagnosticStatus.OK, "receiving"
            array.status.append(status)
        self._diagnostics.publish(array)


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = MixclfNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._stop_worker()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
