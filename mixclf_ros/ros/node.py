"""The managed node `mixclf` (executable `mixclf_node`): lifecycle transitions and the inference thread.

Camera frames are queued per camera (`frame_queue`), classified in batches by
`runtime.classifier.CertifiedClassifier`, and published as `CertifiedClassification` messages
(`messages`). Parameters are declared and validated in `parameters`, diagnostics built in
`diagnostics`. The node holds no math.

Lifecycle (rclpy managed node, as nav2 runs them):
  configure  - read the configure parameters, subscribe (one transport per camera, `image_transport`),
               load both models, move them to the device, warm up (time reported in the log and
               diagnostics), create the lifecycle publishers (`certified_classification`, and
               `outputs`: debug image, vision_msgs)
  activate   - enable the publishers, publish the label info, start the inference thread: frames
               get certified results
  deactivate - stop it and disable the publishers; configure parameters may be changed again
  cleanup    - unsubscribe, release the models (GPU memory included), destroy the publishers
  shutdown   - stop and release everything
  error      - (a transition raised) release everything, back to unconfigured
Output while not active: nothing, as nav2 nodes do (frames are counted in diagnostics as
`not_ready`). No result is never a safe result: a consumer must treat a missing or late result as
unsafe (`max_image_age` on its side). One exception: after a failed configure the node stays
subscribed and every frame gets a NOT_READY result whose `status_message` is the reason, with an
ERROR on /diagnostics, until a configure succeeds (a configuration mistake is never silent).
`autostart` (default true) runs configure and activate at start-up.
Diagnostics: one classifier status and one per camera, named "<fully qualified node name>: classifier"
and "<fully qualified node name>: camera <topic>" (two namespaced instances never collide).
"""

from __future__ import annotations

import math
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor
from rclpy.experimental import EventsExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image

from mixclf_ros.msg import CertifiedClassification
from mixclf_ros.ros import parameters
from mixclf_ros.ros.certifiable import CertificateMonitor
from mixclf_ros.ros.diagnostics import ClassifierState, diagnostics_array
from mixclf_ros.ros.frame_queue import FrameQueue, PendingFrame
from mixclf_ros.ros.messages import camera_topics, decode_message, result_message, stale_reason, stamp_ns
from mixclf_ros.ros.outputs import Outputs
from mixclf_ros.runtime.classifier import CertifiedClassifier, FrameResult, Status, select_device
from mixclf_ros.runtime.threads import ThreadPlan, fixed_plan, measure_thread_plan
from mixclf_ros.vision.decode import INPUT_KINDS, BadImageError, DecodedImage


class MixclfNode(LifecycleNode):
    """Certified mixed classification of camera frames (see module docstring)."""

    def __init__(self, node_name: str = "mixclf", **kwargs):
        super().__init__(node_name, **kwargs)
        parameters.declare(self)
        self._live = parameters.initial_live(self)
        self.add_pre_set_parameters_callback(lambda changes: parameters.coerce_integers(changes, self))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

        self._queue = FrameQueue(parameters.MAX_QUEUED_FRAMES)
        self._classifier: CertifiedClassifier | None = None
        self._monitor: CertificateMonitor | None = None
        self._class_names: list[str] = []
        self._worker: threading.Thread | None = None
        self._camera_subscriptions = []
        self._warmup_ms = math.nan
        self._last_error = ""
        self._configure_error = ""
        self._log_times: dict[str, float] = {}
        self._frames_cb_group = ReentrantCallbackGroup()
        self._busy = threading.Lock()  # held while a batch is classified (inline or by the worker)
        self._inline = bool(self.get_parameter("inline_inference").value)
        self._threads: ThreadPlan = fixed_plan(1)

        self._publisher = None  # lifecycle publishers: created at configure, destroyed at cleanup
        self._outputs: Outputs | None = None
        self._input_kind = "intensity"
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(self.get_parameter("diagnostics_period").value, self._publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(
                0.0, self._autostart, callback_group=MutuallyExclusiveCallbackGroup())

    # ---------------------------------------------------------------- parameters
    def _on_set_parameters(self, changes) -> SetParametersResult:
        """Validates the request itself and swaps the live parameters in as one object."""
        try:
            live = parameters.apply_changes(self._live, changes, active=self._queue.is_open)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        if live.classifier.alpha < 0.5 <= self._live.classifier.alpha:
            self.get_logger().warning(f"alpha = {live.classifier.alpha} < 0.5: no certificate, every frame unsafe")
        self._live = live
        if (monitor := self._monitor) is not None:
            monitor.settings_changed(live.classifier)
        return SetParametersResult(successful=True)

    def _after_set_parameters(self, changes) -> None:
        for prefix in parameters.MODELS:
            if any(change.name == f"{prefix}.kind" for change in changes):
                parameters.declare_model_keys(self, prefix)

    # ---------------------------------------------------------------- lifecycle
    def _autostart(self) -> None:
        self._autostart_timer.cancel()
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        from mixclf_ros.models.loading import check_compatible, load_model, unpinned_note

        value = lambda name: self.get_parameter(name).value  # noqa: E731
        started = time.perf_counter()
        self._configure_error = ""  # frames get "models loading" while this runs
        try:
            import torch

            for prefix in parameters.MODELS:
                parameters.declare_model_keys(self, prefix)
            self._queue.set_policy(value("frame_policy"))
            input_kind = value("input_kind")
            if input_kind not in INPUT_KINDS:
                raise ValueError(f"input_kind must be one of {', '.join(INPUT_KINDS)}, got {input_kind!r}")
            self._input_kind = input_kind
            self._destroy_publishers()  # the failure publisher of an earlier failed configure
            self._unsubscribe()  # the topics may have changed since a failed configure
            self._subscribe()
            refused = parameters.refused_start_up_parameters(self)
            if refused:
                raise ValueError(refused)
            torch.set_num_threads(max(1, value("torch_threads")))
            device = select_device(value("device"))
            confidence = self._live.classifier.confidence
            standard = load_model(parameters.model_config(self, "standard_model", confidence), name="standard_model")
            robust = load_model(parameters.model_config(self, "robust_model", confidence), name="robust_model")
            check_compatible(standard, robust)
            for model, prefix in ((standard, "standard_model"), (robust, "robust_model")):
                if note := unpinned_note(model, prefix):
                    self.get_logger().info(note)
            seed = parameters.smoothing_seed(self)
            # each model its own preprocessing, from its config (crop, resize, input size and channels)
            classifier = CertifiedClassifier(standard, robust, None, device,
                                             standard_precision=value("standard_precision"),
                                             seed=seed, certificate_precision=value("certificate_precision"))
            self._warmup_ms = classifier.warm_up(self._live.classifier)
            monitor = CertificateMonitor(classifier, seed, self.get_logger().warning)
            monitor.settings_changed(self._live.classifier)
            self._threads = self._thread_plan(classifier, value("torch_threads"))
            classifier.restart_float32_trial()  # after the thread plan's blank frames
            self._publisher = self.create_lifecycle_publisher(CertifiedClassification, "certified_classification", 10)
            self._outputs = Outputs(self, debug_image=value("debug_image"))
        except Exception as error:  # every configuration mistake is one clear log line
            # Stay subscribed: every frame gets NOT_READY with this reason, /diagnostics an ERROR.
            self._last_error = self._configure_error = f"configure failed: {error}"
            self.get_logger().error(self._last_error)
            self._destroy_publishers()
            self._publish_configure_failures(state)
            return TransitionCallbackReturn.FAILURE
        self._class_names = list(robust.class_names)
        self._classifier = classifier
        self._monitor = monitor
        monitor.settings_changed(self._live.classifier)  # a live change made while configuring
        self._last_error = self._configure_error = ""
        self.get_logger().info(
            f"configured on {device}: standard={standard.config['architecture']}, "
            f"robust={robust.config['architecture']} ({robust.kind}, {classifier.norm}"
            + (f", Lipschitz {robust.lipschitz_constant:.4g} {robust.lipschitz_source}"
               if robust.kind == "lipschitz" else "")
            + f"); load {1e3 * (time.perf_counter() - started):.0f} ms, first warm-up pass "
            f"{self._warmup_ms:.1f} ms; torch threads: {self._threads.describe()}")
        return TransitionCallbackReturn.SUCCESS

    def _thread_plan(self, classifier: CertifiedClassifier, setting: int) -> ThreadPlan:
        """`torch_threads` N > 0: N always; 0: measured on the real path for one frame and for one
        frame of every camera (a blank VGA frame, or the crops' size if larger, as at warm-up)."""
        if setting > 0:
            return fixed_plan(setting)
        import numpy as np

        configs = (classifier.preprocess_config, classifier.standard_preprocess_config)
        channels = max(config.output_channels for config in configs)
        height = max(480, *(config.crop_height for config in configs))
        width = max(640, *(config.crop_width for config in configs))
        frame = DecodedImage(np.zeros((height, width, channels), np.uint8), "mono" if channels == 1 else "rgb", 1 / 255)
        live = self._live.classifier
        cameras = max(1, len(self._topic_names()))
        return measure_thread_plan(lambda batch: classifier.classify([frame] * batch, live), {1, cameras})

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        super().on_activate(state)  # enables the lifecycle publishers
        if self._outputs is not None:
            self._outputs.publish_labels(self._class_names)
        self._queue.open()
        self._worker = threading.Thread(target=self._inference_loop, name="mixclf-inference", daemon=True)
        self._worker.start()
        self.get_logger().info(f"active: alpha={self._live.classifier.alpha}, topics {self._topic_names()}")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_worker()
        return super().on_deactivate(state)  # disables the lifecycle publishers

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_all()
        return TransitionCallbackReturn.SUCCESS

    def _release_all(self) -> None:
        """Back to unconfigured: no worker, no subscriptions, no models, no publishers."""
        self.stop_worker()
        self._unsubscribe()
        self._release_models()
        self._destroy_publishers()

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_worker()
        self._camera_subscriptions = []  # destroyed with the node
        self._release_models()
        self._destroy_publishers()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: release everything and go back to unconfigured."""
        self.get_logger().error(f"error during a transition from '{state.label}': releasing models and topics")
        self._release_all()
        return TransitionCallbackReturn.SUCCESS

    def _publish_configure_failures(self, state: LifecycleState) -> None:
        """After a failed configure: a results publisher, enabled, for the NOT_READY results that carry
        the reason (the node stays unconfigured; the next configure replaces it)."""
        try:
            self._publisher = self.create_lifecycle_publisher(CertifiedClassification, "certified_classification", 10)
            self._publisher.on_activate(state)
        except Exception as error:  # the reason is still logged and on /diagnostics
            self.get_logger().error(f"cannot publish the configure failure on certified_classification: {error}")

    def _destroy_publishers(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            self.destroy_lifecycle_publisher(publisher)
        outputs, self._outputs = self._outputs, None
        if outputs is not None:
            outputs.destroy()

    def _release_models(self) -> None:
        classifier, self._classifier = self._classifier, None
        self._monitor = None
        if classifier is not None and classifier.device.type == "cuda":
            import torch

            del classifier
            torch.cuda.empty_cache()

    def stop_worker(self) -> None:
        """Closes the frame queue and waits for the inference thread to finish its batch."""
        self._queue.close()
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
        topics = camera_topics(self._topic_names(), self.get_parameter("image_transport").value)
        for topic, message_type in topics:
            self._queue.add_camera(topic)
            self._camera_subscriptions.append(self.create_subscription(
                message_type, topic, lambda message, topic=topic: self._on_frame(topic, message), qos,
                callback_group=self._frames_cb_group, qos_overriding_options=overrides))

    def _unsubscribe(self) -> None:
        for subscription in self._camera_subscriptions:
            self.destroy_subscription(subscription)
        self._camera_subscriptions = []

    # ---------------------------------------------------------------- frames
    def _on_frame(self, topic: str, message: Image | CompressedImage) -> None:
        """Queues the frame (not active: counted, no output, unless configure failed). With
        `inline_inference`, when no batch is being classified, classifies it here, in the callback:
        no hand-off to the inference thread, which only takes the frames that arrive while a batch runs."""
        stamp_s = stamp_ns(message.header) * 1e-9
        inline = self._inline and self._busy.acquire(blocking=False)
        try:
            if self._queue.put(topic, message, stamp_s, wake=not inline):
                if inline:
                    self._classify_safely(self._queue.take_now())
            elif self._configure_error:
                self._publish(message.header, FrameResult.failure(
                    Status.NOT_READY, self._configure_error, self._live.classifier))
        finally:
            if inline:
                self._busy.release()
                self._queue.wake()

    def _inference_loop(self) -> None:
        while (frames := self._queue.take_batch()) is not None:
            with self._busy:
                self._classify_safely(frames)

    def _classify_safely(self, frames: list[PendingFrame]) -> None:
        try:
            self._process(frames)
        except Exception as error:  # keep serving: report, publish unsafe, continue
            if not self.context.ok():
                return  # shutting down: the context is gone, so is everyone these results were for
            self._last_error = f"inference loop: {type(error).__name__}: {error}"
            self._log_limited("loop", self._last_error)
            try:
                for frame in frames:
                    self._finish(frame, FrameResult.failure(
                        Status.MODEL_ERROR, self._last_error, self._live.classifier))
            except Exception as publish_error:  # the publisher itself fails: the thread must live on
                self._log_limited("publish", f"cannot publish the failure: {type(publish_error).__name__}: "
                                             f"{publish_error}")

    def _process(self, frames: list[PendingFrame]) -> None:
        live = self._live  # one consistent snapshot for the whole batch
        now_ns = self.get_clock().now().nanoseconds
        batch, decoded = [], []
        for frame in frames:
            reason = stale_reason(frame.message.header, now_ns, live.max_image_age)
            if reason:
                self._finish(frame, FrameResult.failure(Status.STALE, reason, live.classifier))
                continue
            try:
                decoded.append(decode_message(frame.message, self._input_kind))
                batch.append(frame)
            except BadImageError as error:
                self._finish(frame, FrameResult.failure(Status.BAD_INPUT, str(error), live.classifier))
        if not batch:
            return
        classifier, monitor = self._classifier, self._monitor
        if classifier is None or monitor is None:
            for frame in batch:
                self._finish(frame, FrameResult.failure(Status.NOT_READY, "models not loaded", live.classifier))
            return
        self._threads.apply(len(decoded))
        for frame, image, result in zip(batch, decoded, classifier.classify(decoded, live.classifier)):
            if result.status == Status.OK:
                monitor.frame_seen(frame.topic, image)
            self._finish(frame, monitor.annotate(result), image)

    def _finish(self, frame: PendingFrame, result: FrameResult, decoded: DecodedImage | None = None) -> None:
        self._queue.record(frame, result)
        if result.status != Status.OK:
            self._log_limited(f"{frame.topic}:{result.status.name}",
                              f"{frame.topic}: {result.status.name}: {result.status_message}")
            if result.status == Status.MODEL_ERROR:
                self._last_error = result.status_message
        self._publish(frame.message.header, result, decoded)

    def _publish(self, header, result: FrameResult, decoded: DecodedImage | None = None) -> None:
        publisher, outputs = self._publisher, self._outputs
        try:
            if publisher is not None:
                publisher.publish(result_message(header, result, self._class_names))
            if outputs is not None:
                outputs.publish(header, result, decoded, self._class_names)
        except Exception:
            if self.context.ok():
                raise
            # shutting down (Ctrl-C shut the context down under this thread): nowhere to publish to

    def _log_limited(self, key: str, text: str, period_s: float = 5.0) -> None:
        now = time.monotonic()
        if now - self._log_times.get(key, -math.inf) >= period_s:
            self._log_times[key] = now
            self.get_logger().warning(text)

    # ---------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        classifier, live = self._classifier, self._live
        active = self._queue.is_open
        info = ClassifierState(
            state="active" if active else ("configured" if classifier else "unconfigured"),
            device=str(classifier.device) if classifier else "", robust_kind=classifier.kind if classifier else "",
            certificate_norm=classifier.norm if classifier else "", warmup_ms=self._warmup_ms,
            alpha=live.classifier.alpha, safe_radius=live.classifier.safe_radius, last_error=self._last_error,
            configure_error=self._configure_error)
        cameras, now = self._queue.snapshot(), time.monotonic()
        array = diagnostics_array(self.get_fully_qualified_name(), info, cameras, now, live.camera_timeout,
                                  self.get_clock().now().to_msg())
        if (monitor := self._monitor) is not None:
            monitor.measure_rate(now, sum(stats.processed for stats in cameras.values()))
            array.status.append(monitor.status(self.get_fully_qualified_name()))
        self._diagnostics.publish(array)


def serve(executor: Executor, events: bool) -> None:
    """Spins `executor` until rclpy shuts down or Ctrl-C. EventsExecutor.spin() stops serving this
    node's callbacks in this rclpy build (timers and subscriptions starve after activation), so an
    EventsExecutor (`events`) is served by repeated spin_once."""
    try:
        if events:
            while rclpy.ok():
                executor.spin_once(timeout_sec=0.5)
        else:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = MixclfNode()
    kind = node.get_parameter("executor").value
    if kind not in ("events", "multi_threaded"):
        node.get_logger().error(f"executor must be 'events' or 'multi_threaded', got {kind!r}; using events")
        kind = "events"
    executor = EventsExecutor() if kind == "events" else MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        serve(executor, events=kind == "events")
    finally:
        node.stop_worker()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
