"""Starts the certified mixed classifier node.

    ros2 launch mixclf_ros mixclf.launch.py image_topic:=/camera/image_raw alpha:=0.7
    ros2 launch mixclf_ros mixclf.launch.py namespace:=front params_file:=/path/to/mine.yaml

The parameters file is the source of every parameter. A launch argument that stands for a
parameter (alpha, device, autostart, use_sim_time) overrides it only when it is given: its
default is empty, meaning "as in the parameters file" (or the node's default where the file is
silent). log_level sets the node's logger level (ros-args --log-level).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.launch_context import LaunchContext
from launch_ros.actions import Node

from launch import LaunchDescription
from mixclf_ros.ros.launch_arguments import parameter_overrides

PARAMETER_ARGUMENTS = {
    # launch argument = node parameter: (type, description)
    "alpha": (float, "weight of the robust model, >= 0.5 for certificates"),
    "device": (str, "auto | cpu | cuda:N"),
    "autostart": (bool, "configure and activate at start-up (false: a lifecycle manager does it)"),
    "use_sim_time": (bool, "take time from /clock (bag playback, simulation)"),
}



def classifier_node(context: LaunchContext) -> list:
    config = context.launch_configurations
    image_topic = config["image_topic"]
    return [Node(
        package="mixclf_ros",
        executable="mixclf_node",
        name="mixclf",
        namespace=config["namespace"],
        output="screen",
        emulate_tty=True,
        parameters=[config["params_file"], parameter_overrides(context, PARAMETER_ARGUMENTS)],
        remappings=[("image", image_topic), ("image/compressed", f"{image_topic}/compressed")],
        ros_arguments=["--log-level", config["log_level"]],
    )]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("mixclf_ros"), "config", "mixclf.yaml")
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="parameters file (ros__parameters of node mixclf)"),
        DeclareLaunchArgument("image_topic", default_value="image",
                              description="camera topic (sensor_msgs/Image) remapped onto 'image'"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="logger level: debug | info | warn | error | fatal"),
        *(DeclareLaunchArgument(name, default_value="", description=f"{description} (empty: from params_file)")
          for name, (_, description) in PARAMETER_ARGUMENTS.items()),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=classifier_node)])
