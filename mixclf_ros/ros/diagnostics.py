"""The node's /diagnostics array: one classifier status and one status per camera.

Status names start with the node's fully qualified name (`/ns/mixclf: camera image`), so that
instances in different namespaces do not overwrite each other in an aggregator; `hardware_id` is
that name too."""

from __future__ import annotations

from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from mixclf_ros.ros.frame_queue import CameraStats


@dataclass(frozen=True)
class ClassifierState:
    """What the classifier status reports."""

    state: str  # active | configured | unconfigured
    device: str
    robust_kind: str
    certificate_norm: str
    warmup_ms: float
    alpha: float
    safe_radius: float
    last_error: str
    configure_error: str = ""
    """Why the last configure failed ('' after a successful one): reported as ERROR."""


def classifier_status(node: str, info: ClassifierState) -> DiagnosticStatus:
    status = DiagnosticStatus(name=f"{node}: classifier", hardware_id=node)
    if info.configure_error:
        status.level = DiagnosticStatus.ERROR
    else:
        status.level = DiagnosticStatus.OK if info.state == "active" else DiagnosticStatus.WARN
    status.message = info.state if not info.last_error else f"{info.state}; last error: {info.last_error}"
    status.values = [
        KeyValue(key="state", value=info.state),
        KeyValue(key="device", value=info.device),
        KeyValue(key="robust_kind", value=info.robust_kind),
        KeyValue(key="certificate_norm", value=info.certificate_norm),
        KeyValue(key="warmup_ms", value=f"{info.warmup_ms:.1f}"),
        KeyValue(key="alpha", value=f"{info.alpha}"),
        KeyValue(key="safe_radius", value=f"{info.safe_radius}"),
        KeyValue(key="last_error", value=info.last_error),
    ]
    return status


def camera_status(node: str, topic: str, stats: CameraStats, now: float, camera_timeout: float) -> DiagnosticStatus:
    """`now`: time.monotonic(); a camera quiet for longer than `camera_timeout` seconds is WARN."""
    status = DiagnosticStatus(name=f"{node}: camera {topic}", hardware_id=node)
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
        status.level = DiagnosticStatus.WARN
        status.message = "no frames" if quiet_s is None else f"camera quiet for {quiet_s:.1f} s"
    elif stats.suspected_lost:
        status.level = DiagnosticStatus.WARN
        status.message = (f"{stats.suspected_lost} frames suspected lost in transport (gaps in header stamps; "
                          "large images over Fast DDS: use config/fastdds_camera.xml, see docs/FAST_DDS.md)")
    else:
        status.level, status.message = DiagnosticStatus.OK, "receiving"
    return status


def diagnostics_array(node: str, info: ClassifierState, cameras: dict[str, CameraStats], now: float,
                      camera_timeout: float, stamp) -> DiagnosticArray:
    """`node`: the fully qualified node name; `now`: time.monotonic()."""
    array = DiagnosticArray()
    array.header.stamp = stamp
    array.status.append(classifier_status(node, info))
    for topic, stats in cameras.items():
        array.status.append(camera_status(node, topic, stats, now, camera_timeout))
    return array
