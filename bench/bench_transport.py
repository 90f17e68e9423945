"""Camera frames between two processes over Fast DDS: how many best-effort frames arrive.

    python -m bench --only transport [--transport-frames 1000]

A publisher process sends `frames` 640x480 rgb8 frames (900 KB) best effort at 30 Hz; a subscriber
process (best effort, depth 1, like the mixclf node's camera subscription) counts the distinct
frames it receives. The machine is loaded on purpose: one busy process per core beside the two.
Compared, with the same publisher and subscriber:
- fastdds_default: Fast DDS's default transports (no profile, FASTDDS_BUILTIN_TRANSPORTS unset);
- large_data: FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA (what env.sh sets without a profile);
- camera_profile: FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_camera.xml.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE = REPO_ROOT / "config" / "fastdds_camera.xml"
CONDITIONS = {
    "fastdds_default": {},
    "large_data": {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"},
    "camera_profile": {"FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE)},
}
TRANSPORT_VARIABLES = ("FASTDDS_BUILTIN_TRANSPORTS", "FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


def best_effort_qos():
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)


def publish(frames: int, rate: float) -> int:
    import numpy as np
    import rclpy
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("bench_transport_camera")
    publisher = node.create_publisher(Image, "bench_transport_image", best_effort_qos())
    deadline = time.monotonic() + 60.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # discovery of the data path settles
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8).tobytes()
    start = time.monotonic()
    for index in range(frames):
        message = Image(height=480, width=640, encoding="rgb8", step=640 * 3, data=pixels)
        message.header.frame_id = str(index)
        message.header.stamp = node.get_clock().now().to_msg()
        publisher.publish(message)
        time.sleep(max(0.0, start + (index + 1) / rate - time.monotonic()))
    time.sleep(2.0)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def subscribe(result_file: str) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("bench_transport_receiver")
    received: set[str] = set()
    node.create_subscription(Image, "bench_transport_image", lambda m: received.add(m.header.frame_id),
                             best_effort_qos())
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        Path(result_file).write_text(json.dumps({"received": len(received)}))
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def measure(work: Path, name: str, frames: int, rate: float) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in TRANSPORT_VARIABLES}
    env.update(CONDITIONS[name])
    result_file = work / f"transport_{name}.json"
    command = [sys.executable, "-m", "bench.bench_transport"]
    with open(work / f"transport_{name}_subscriber.log", "w") as log:
        receiver = subprocess.Popen(command + ["subscribe", str(result_file)], env=env, cwd=REPO_ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
        with open(work / f"transport_{name}_publisher.log", "w") as publisher_log:
            sender = subprocess.run(command + ["publish", str(frames), str(rate)], env=env, cwd=REPO_ROOT,
                                    stdout=publisher_log, stderr=subprocess.STDOUT, timeout=frames / rate + 180)
        receiver.send_signal(signal.SIGINT)
        receiver.wait(timeout=60)
    received = json.loads(result_file.read_text())["received"] if sender.returncode == 0 else 0
    return {"sent": frames, "received": received, "lost": frames - received,
            "loss_percent": 100.0 * (frames - received) / frames}


def bench_transport(work: Path, frames: int = 1000, rate: float = 30.0) -> dict:
    """Loss of best-effort camera frames per transport configuration, on a loaded machine."""
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        report = {name: measure(work, name, frames, rate) for name in CONDITIONS}
    finally:
        for process in load:
            process.kill()
            process.wait()
    report["conditions"] = (f"{frames} frames 640x480 rgb8, best effort, depth 1, {rate:g} Hz, two processes, "
                            f"{len(load)} busy processes beside them")
    return report


def markdown(report: dict) -> list[str]:
    lines = ["## Camera frames over Fast DDS (best effort, loaded machine)", "", report["conditions"] + ".", "",
             "| transport configuration | received / sent | lost |", "|---|---|---|"]
    for name in CONDITIONS:
        r = report[name]
        lines.append(f"| {name} | {r['received']} / {r['sent']} | {r['loss_percent']:.1f} % |")
    return lines + [""]


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        raise SystemExit(publish(int(sys.argv[2]), float(sys.argv[3])))
    raise SystemExit(subscribe(sys.argv[2]))
