"""The node's optional outputs beside `certified_classification`, each a lifecycle publisher
(created at configure, enabled while active, destroyed at cleanup):

- `~/debug_image` (sensor_msgs/Image rgb8, parameter `debug_image`, off by default): the frame with
  class, probability, radius and a green/red safe badge (`vision.annotate`), drawn only while
  someone subscribes;
- `classification` (vision_msgs/Classification: class id as a string, score = the mixed
  probability) and `label_info` (vision_msgs/LabelInfo, transient local, depth 1: class ids and
  names), where vision_msgs is importable; without it the node runs without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from mixclf_ros.runtime.frame_result import FrameResult, Status
from mixclf_ros.vision.annotate import annotate, to_rgb8
from mixclf_ros.vision.decode import DecodedImage

LABEL_INFO_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)


def vision_msgs() -> Any | None:
    """The vision_msgs.msg module, or None where vision_msgs is not installed."""
    try:
        return importlib.import_module("vision_msgs.msg")
    except ImportError:
        return None


def debug_image_message(header, decoded: DecodedImage, result: FrameResult, class_names: list[str]) -> Image:
    """The annotated frame as an rgb8 Image with the frame's header."""
    label = class_names[result.class_id] if 0 <= result.class_id < len(class_names) else str(result.class_id)
    detail = "" if result.status == Status.OK else f"{result.status.name}: {result.status_message}"[:80]
    pixels = annotate(to_rgb8(decoded), label, result.probability, result.certified_radius, result.safe,
                      result.norm, detail)
    return Image(header=header, height=pixels.shape[0], width=pixels.shape[1], encoding="rgb8",
                 step=pixels.shape[1] * 3, data=pixels.tobytes())


def classification_message(module, header, result: FrameResult):
    """vision_msgs/Classification: one hypothesis, the published class (id as a string) with the
    mixed probability as its score; no hypothesis for a frame without a class."""
    message = module.Classification(header=header)
    if result.status == Status.OK and result.class_id >= 0:
        message.results = [module.ObjectHypothesis(class_id=str(result.class_id), score=float(result.probability))]
    return message


def label_info_message(module, header, class_names: list[str]):
    return module.LabelInfo(header=header, class_map=[
        module.VisionClass(class_id=index, class_name=name) for index, name in enumerate(class_names)])


class Outputs:
    """The optional lifecycle publishers of a configured node (see module docstring)."""

    def __init__(self, node, debug_image: bool):
        self._node = node
        self._debug = node.create_lifecycle_publisher(Image, "~/debug_image", 1) if debug_image else None
        self._vision = vision_msgs()
        self._classification = self._label_info = None
        if self._vision is not None:
            self._classification = node.create_lifecycle_publisher(self._vision.Classification, "classification", 10)
            self._label_info = node.create_lifecycle_publisher(self._vision.LabelInfo, "label_info", LABEL_INFO_QOS)

    @property
    def wants_debug_image(self) -> bool:
        return self._debug is not None and self._debug.get_subscription_count() > 0

    def publish_labels(self, class_names: list[str]) -> None:
        """LabelInfo once per activation (transient local: late subscribers get it too)."""
        if self._label_info is not None:
            header = Image().header
            header.stamp = self._node.get_clock().now().to_msg()
            self._label_info.publish(label_info_message(self._vision, header, class_names))

    def publish(self, header, result: FrameResult, decoded: DecodedImage | None, class_names: list[str]) -> None:
        if self._classification is not None:
            self._classification.publish(classification_message(self._vision, header, result))
        if decoded is not None and self.wants_debug_image:
            self._debug.publish(debug_image_message(header, decoded, result, class_names))

    def destroy(self) -> None:
        for publisher in (self._debug, self._classification, self._label_info):
            if publisher is not None:
                self._node.destroy_lifecycle_publisher(publisher)
        self._debug = self._classification = self._label_info = None
