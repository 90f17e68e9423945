"""The demo with separate nodes on a ROS 2 install: camera simulator -> mixclf -> monitor.

    ros2 launch mixclf_ros demo.launch.py rate:=5 attack_eps:=15 alpha_schedule:=20:0.3,40:1.0

Same options as `make demo ARGS=...`. safe_radius defaults to the attack's size at the model input
(attack_eps / (17 * sqrt(3)) for the default 17x upscaling in three channels).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("mixclf_ros"), "config", "mixclf.yaml")
    options = {
        "params_file": (default_params, "parameters file of the mixclf node"),
        "frames": ("0", "frames to publish (0: until stopped)"),
        "rate": ("5.0", "camera rate in Hz"),
        "attack_eps": ("15.0", "PGD on the standard model, l2 in frame pixels in [0,1] (0: off)"),
        "attack_steps": ("20", "PGD steps"),
        "noise_std": ("0.0", "Gaussian noise std in [0,1] pixels"),
        "alpha": ("0.6", "initial alpha"),
        "alpha_schedule": ("20:0.3,40:1.0", "result index:alpha pairs set live by the monitor"),
        "compressed": ("false", "also publish and classify PNG frames"),
        "device": ("auto", "auto | cpu | cuda:N"),
    }
    arguments = [DeclareLaunchArgument(name, default_value=default, description=description)
                 for name, (default, description) in options.items()]
    config = LaunchConfiguration
    # never below the node's shipped threshold, one grey level (1/255): no attack keeps that in force
    safe_radius = PythonExpression(["max(1 / 255, max(0.0, ", config("attack_eps"), ") / (17 * 3 ** 0.5))"])
    camera = Node(
        package="mixclf_ros", executable="mixclf_camera_sim", name="camera_sim", output="screen",
        parameters=[{
            "rate": ParameterValue(config("rate"), value_type=float),
            "frames": ParameterValue(config("frames"), value_type=int),
            "attack_eps": ParameterValue(config("attack_eps"), value_type=float),
            "attack_steps": ParameterValue(config("attack_steps"), value_type=int),
            "noise_std": ParameterValue(config("noise_std"), value_type=float),
            "publish_compressed": ParameterValue(config("compressed"), value_type=bool),
        }],
    )
    classifier = Node(
        package="mixclf_ros", executable="mixclf_node", name="mixclf", output="screen",
        parameters=[config("params_file"), {
            "alpha": ParameterValue(config("alpha"), value_type=float),
            "safe_radius": ParameterValue(safe_radius, value_type=float),
            "device": config("device"),
            "enable_compressed": ParameterValue(config("compressed"), value_type=bool),
            "frame_policy": "every",  # the demo shows a result for every frame
        }],
    )
    monitor = Node(
        package="mixclf_ros", executable="mixclf_monitor", name="mixclf_monitor", output="screen",
        emulate_tty=True,
        parameters=[{
            "frames": ParameterValue(config("frames"), value_type=int),
            "alpha_schedule": config("alpha_schedule"),
        }],
    )
    return LaunchDescription([*arguments, classifier, monitor, camera])
