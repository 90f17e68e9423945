"""The common way such a node is written in rclpy, as the baseline for `make bench`:
a cv_bridge-style copy of the image, torchvision transforms on the CPU (PIL), the two models run
one after the other, the default QoS queue of 10 (reliable), every frame processed in order.
It publishes CertifiedClassification (class only, no certificate)."""

import numpy as np
import rclpy
import torch
from PIL import Image as PILImage
from rclpy.executors import ExternalShutdownException
from sensor_msgs.msg import Image
from torchvision import transforms

from mixclf_ros.core.mixing import mix_log_probs
from mixclf_ros.models.loading import load_model, zoo_config
from mixclf_ros.msg import CertifiedClassification
from mixclf_ros.runtime.node_parameters import MODELS


def main() -> int:
    rclpy.init()
    node = rclpy.create_node("naive")
    torch.set_num_threads(1)
    standard, robust = load_model(zoo_config(MODELS["standard_model"])), load_model(zoo_config(MODELS["robust_model"]))
    crop = node.declare_parameter("crop", 476).value
    size = node.declare_parameter("size", 28).value
    transform = transforms.Compose([transforms.CenterCrop(crop), transforms.Grayscale(), transforms.Resize(size),
                                    transforms.ToTensor()])
    publisher = node.create_publisher(CertifiedClassification, "certified_classification", 10)

    def classify(image: Image) -> None:
        # cv_bridge.imgmsg_to_cv2 copies the buffer into a new array
        pixels = np.array(image.data, dtype=np.uint8).reshape(image.height, image.width, 3).copy()
        x = transform(PILImage.fromarray(pixels)).unsqueeze(0)
        with torch.no_grad():
            logits_g = standard(x)
            logits_h = robust(x)
        mixed = mix_log_probs(logits_g, logits_h, 0.6)
        publisher.publish(CertifiedClassification(header=image.header, class_id=int(mixed.argmax())))

    node.create_subscription(Image, "image", classify, 10)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
