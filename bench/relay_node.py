"""The floor for end-to-end latency: an rclpy node that receives the same image over the same
QoS and publishes a CertifiedClassification with its header, doing no work at all.

    relay_node.py [events|single]   (executor: rclpy's EventsExecutor, the default and the mixclf
                                     node's default, or rclpy.spin's SingleThreadedExecutor)"""

import sys

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.experimental import EventsExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from mixclf_ros.msg import CertifiedClassification
from mixclf_ros.ros.node import serve


def main() -> int:
    rclpy.init()
    node = rclpy.create_node("relay")
    publisher = node.create_publisher(CertifiedClassification, "certified_classification", 10)

    def relay(image: Image) -> None:
        publisher.publish(CertifiedClassification(header=image.header))

    # the same QoS as the mixclf node in the benchmark: depth 1, reliable (see bench/__main__.py)
    node.create_subscription(Image, "image", relay, QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
    events = (sys.argv[1:] or ["events"])[0] == "events"
    executor = EventsExecutor() if events else SingleThreadedExecutor()
    executor.add_node(node)
    try:
        serve(executor, events)  # as the mixclf node serves its executor
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
