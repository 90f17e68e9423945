"""mixclf_ros: certified mixed classification for ROS 2.

The library modules (mixing, certify, lipschitz, smoothing, models, data, image, evaluate) import
no ROS; `node`, `camera_sim`, `monitor` and `demo` need rclpy and the generated `mixclf_ros.msg`.
"""

from pkgutil import extend_path

# The generated message module `mixclf_ros.msg` lives in the colcon install space. When this
# package is imported from a source checkout, let it find `msg` there too.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
