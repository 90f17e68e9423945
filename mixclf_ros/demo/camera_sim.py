"""Demo camera (`mixclf_camera_sim`): Fashion-MNIST test articles as a real camera would send them.

Publishes `sensor_msgs/Image` rgb8 frames (640x480 by default) on `image`, each 28x28 article
upscaled by an integer factor into the centre of the frame, so that the node's default
preprocessing (centre crop of article size, grey, area resize) recovers the article exactly.
Optionally `CompressedImage` (PNG, lossless) on `image/compressed`.

Perturbations, measured in the published image's pixels scaled to [0, 1]:
- `noise_std`: Gaussian noise;
- `attack_eps` > 0: a PGD perturbation aimed at the STANDARD model within `attack_eps` in
  `attack_norm`. It is computed on the 28x28 article and rendered like the article, so its size in
  the frame is exactly known: in l2 the frame perturbation is `scale * sqrt(3)` times the article's
  (each article pixel covers scale x scale pixels in three channels); in linf they are equal.
  Quantisation to uint8 rounds towards the clean value, so the budget is never exceeded.

The true label of every frame is published as JSON on `ground_truth` (std_msgs/String), keyed by
the frame's stamp, for the monitor.
"""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import rclpy
import torch
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from mixclf_ros.attacks import pgd
from mixclf_ros.data import load_fashion_mnist
from mixclf_ros.demo.render import ARTICLE_SCALE, article_budget, embed_article, quantize_towards
from mixclf_ros.interrupts import ignore_repeated_interrupts
from mixclf_ros.models.loading import load_model, zoo_config


class CameraSimulator(Node):
    def __init__(self):
        super().__init__("camera_sim")
        declare = self.declare_parameter
        self.rate = declare("rate", 5.0).value
        self.frames = declare("frames", 0).value  # 0: until stopped
        self.start_index = declare("start_index", 0).value
        self.width, self.height = declare("width", 640).value, declare("height", 480).value
        self.scale = declare("scale", ARTICLE_SCALE).value
        self.frame_id = declare("frame_id", "camera").value
        self.publish_compressed = declare("publish_compressed", False).value
        self.noise_std = declare("noise_std", 0.0).value
        self.attack_eps = declare("attack_eps", 0.0).value
        self.attack_norm = declare("attack_norm", "l2").value
        self.attack_steps = declare("attack_steps", 20).value
        # Real cameras publish best effort; the demo publishes reliably so that every frame is
        # accounted for (Fast DDS drops best-effort 900 KB frames between processes, see docs/FAST_DDS.md).
        reliability = declare("reliability", "reliable").value
        self.rng = np.random.default_rng(declare("seed", 0).value)
        if self.attack_norm not in ("l2", "linf"):
            raise ValueError("attack_norm must be l2 or linf")

        self.images, self.labels = load_fashion_mnist("test")
        self.standard = load_model(zoo_config("standard")) if self.attack_eps > 0 else None
        # depth 5: a frame is not replaced in the writer's history before the reader acknowledged it
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE if reliability == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        self.image_publisher = self.create_publisher(Image, "image", qos)
        self.compressed_publisher = self.create_publisher(CompressedImage, "image/compressed", qos)
        self.truth_publisher = self.create_publisher(String, "ground_truth", 100)
        self.sent = 0
        wait_s = declare("wait_for_subscribers", 10.0).value
        if wait_s > 0 and not self.wait_for_subscribers(wait_s):
            self.get_logger().warning(f"no subscriber on image and ground_truth after {wait_s} s; publishing anyway")
        # A managed node publishes nothing until it is active: frames sent before would get no result.
        classifier = declare("wait_for_active_node", "").value
        if classifier and not self.wait_until_active(classifier, timeout=declare("wait_for_active_s", 180.0).value):
            self.get_logger().warning(f"node {classifier} is not active; publishing anyway")
        self.timer = self.create_timer(1.0 / self.rate, self._publish_next)
        self.get_logger().info(
            f"publishing {self.width}x{self.height} rgb8 at {self.rate} Hz"
            + (f", PGD-{self.attack_steps} on the standard model, {self.attack_norm} eps {self.attack_eps}"
               " (frame pixels in [0,1])" if self.attack_eps > 0 else "")
            + (f", noise std {self.noise_std}" if self.noise_std > 0 else ""))

    def wait_for_subscribers(self, timeout: float) -> bool:
        """Waits until the classifier and the monitor are matched, so no frame goes to nobody."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cameras = self.image_publisher.get_subscription_count() + (
                self.compressed_publisher.get_subscription_count() if self.publish_compressed else 0)
            if cameras and self.truth_publisher.get_subscription_count():  # a node takes one transport
                return True
            rclpy.spin_once(self, timeout_sec=0.1)
        return False

    def wait_until_active(self, node_name: str, timeout: float) -> bool:
        """Polls the lifecycle state of `node_name` (its get_state service) until it is active."""
        from lifecycle_msgs.msg import State
        from lifecycle_msgs.srv import GetState

        client = self.create_client(GetState, f"{node_name}/get_state")
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if client.wait_for_service(timeout_sec=0.5):
                    future = client.call_async(GetState.Request())
                    rclpy.spin_until_future_complete(self, future, timeout_sec=2.0)
                    if future.done() and future.result().current_state.id == State.PRIMARY_STATE_ACTIVE:
                        return True
                time.sleep(0.2)
            return False
        finally:
            self.destroy_client(client)

    def wait_for_acknowledgements(self, timeout_s: float) -> bool:
        """True when reliable subscribers acknowledged everything published (best-effort ones
        acknowledge nothing and count as done)."""
        timeout = Duration(seconds=timeout_s)
        return all(publisher.wait_for_all_acked(timeout)
                   for publisher in (self.truth_publisher, self.image_publisher, self.compressed_publisher))

    @property
    def done(self) -> bool:
        return 0 < self.frames <= self.sent

    def _perturbed_article(self, index: int) -> np.ndarray:
        clean = self.images[index]
        article = clean.astype(np.float64) / 255.0
        if self.attack_eps > 0:
            x = torch.from_numpy(article).float()[None, None]
            y = torch.tensor([int(self.labels[index])])
            budget = article_budget(self.attack_eps, self.attack_norm, self.scale)
            generator = torch.Generator().manual_seed(index)
            x_adv = pgd(self.standard, x, y, eps=budget, norm=self.attack_norm, steps=self.attack_steps,
                        generator=generator)
            article = x_adv[0, 0].detach().double().numpy()
        return quantize_towards(clean, article)

    def _publish_next(self) -> None:
        if self.done:
            return
        index = (self.start_index + self.sent) % len(self.images)
        article = self._perturbed_article(index)
        frame = embed_article(article, self.height, self.width, self.scale)
        if self.noise_std > 0:
            noise = self.rng.normal(0.0, self.noise_std * 255.0, frame.shape)
            frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
        stamp = self.get_clock().now().to_msg()
        message = Image(height=self.height, width=self.width, encoding="rgb8", step=self.width * 3,
                        data=frame.tobytes())
        message.header.stamp, message.header.frame_id = stamp, self.frame_id
        truth = {"sec": stamp.sec, "nanosec": stamp.nanosec, "index": int(index),
                 "label": int(self.labels[index]), "attack_eps": self.attack_eps,
                 "attack_norm": self.attack_norm, "noise_std": self.noise_std}
        self.truth_publisher.publish(String(data=json.dumps(truth)))
        self.image_publisher.publish(message)
        if self.publish_compressed:
            _, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            compressed = CompressedImage(format="png", data=png.tobytes())
            compressed.header = message.header
            self.compressed_publisher.publish(compressed)
        self.sent += 1


def main(args: list[str] | None = None) -> int:
    ignore_repeated_interrupts()  # before rclpy.init, whose handler chains to it
    rclpy.init(args=args)
    torch.set_num_threads(1)
    node = None
    try:
        node = CameraSimulator()  # loads data and waits for subscribers: Ctrl-C may come here too
        while rclpy.ok() and not node.done:
            rclpy.spin_once(node, timeout_sec=0.1)
        # a reliable sample lost on the way is re-sent only after the next heartbeat: stay until
        # every subscriber has acknowledged the last frames and their ground truth
        node.wait_for_acknowledgements(timeout_s=5.0)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
