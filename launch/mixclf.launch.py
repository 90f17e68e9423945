"""Starts the certified mixed classifier node.

    ros2 launch mixclf_ros mixclf.launch.py image_topic:=/camera/image_raw alpha:=0.7
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("mixclf_ros"), "config", "mixclf.yaml")
    arguments = [
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="parameters file (ros__parameters of node mixclf)"),
        DeclareLaunchArgument("image_topic", default_value="image",
                              description="camera topic (sensor_msgs/Image) remapped onto 'image'"),
        DeclareLaunchArgument("device", default_value="auto", description="auto | cpu | cuda:N"),
        DeclareLaunchArgument("alpha", default_value="0.6",
                              description="weight of the robust model, >= 0.5 for certificates"),
    ]
    node = Node(
        package="mixclf_ros",
        executable="mixclf_node",
        name="mixclf",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "device": LaunchConfiguration("device"),
                "alpha": ParameterValue(LaunchConfiguration("alpha"), value_type=float),
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("image/compressed", [LaunchConfiguration("image_topic"), "/compressed"]),
        ],
    )
    return LaunchDescription([*arguments, node])
