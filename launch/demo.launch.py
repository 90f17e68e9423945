"""The demo with separate nodes on a ROS 2 install: camera simulator -> mixclf -> monitor.

    ros2 launch mixclf_ros demo.launch.py frames:=60 rate:=5 attack_eps:=15 alpha_schedule:=20:0.3,40:1.0

Same options and the same node set-up as `make demo ARGS=...` (mixclf_ros.demo.launcher): the node
classifies every frame in order (frame_policy every) from a reliable, depth-10 image subscription,
so every frame gets a result. safe_radius is the attack's size at the model input
(attack_eps / (17 * sqrt(3)) for the default 17x upscaling in three channels).

The launch ends when the monitor exits (it has `frames` results), when the node exits, or 10 s after
the camera has sent its last frame. alpha, device, use_sim_time override params_file only when given.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler, Shutdown, TimerAction
from launch.event_handlers import OnProcessExit
from launch.launch_context import LaunchContext
from launch_ros.actions import Node

from launch import LaunchDescription
from mixclf_ros.ros.launch_arguments import parameter_overrides

DEMO_ARGUMENTS = {
    # name: (default, description)
    "frames": ("60", "frames to publish (0: until stopped)"),
    "rate": ("5.0", "camera rate in Hz"),
    "attack_eps": ("15.0", "PGD on the standard model, l2 in frame pixels in [0,1] (0: off)"),
    "attack_steps": ("20", "PGD steps"),
    "noise_std": ("0.0", "Gaussian noise std in [0,1] pixels"),
    "alpha_schedule": ("20:0.3,40:1.0", "result index:alpha pairs set live by the monitor"),
    "compressed": ("false", "the camera also publishes PNG frames, the node classifies those"),
    "log_level": ("info", "logger level of the mixclf node"),
}
PARAMETER_ARGUMENTS = {
    # launch argument = node parameter, overriding params_file only when given: (type, description)
    "alpha": (float, "initial alpha"),
    "device": (str, "auto | cpu | cuda:N"),
    "use_sim_time": (bool, "take time from /clock"),
}
IMAGE_QOS = {  # what `make demo` sets: reliable, depth 10 (the camera publishes reliably, depth 5)
    f"qos_overrides./{topic}.subscription.{policy}": value
    for topic in ("image", "image/compressed") for policy, value in (("reliability", "reliable"), ("depth", 10))
}
LAST_RESULTS_GRACE_S = 10.0  # after the camera's last frame: then the launch ends even if results are missing



def demo_nodes(context: LaunchContext) -> list:
    from mixclf_ros.demo.render import ARTICLE_SCALE, article_budget
    from mixclf_ros.runtime.classifier import ONE_GREY_LEVEL

    config = context.launch_configurations
    frames, attack_eps = int(config["frames"]), float(config["attack_eps"])
    compressed = config["compressed"].strip().lower() == "true"
    classifier = Node(
        package="mixclf_ros", executable="mixclf_node", name="mixclf", output="screen",
        parameters=[config["params_file"], {
            # the attack's size at the model input, never below the shipped one grey level
            "safe_radius": max(ONE_GREY_LEVEL, article_budget(attack_eps, "l2", scale=ARTICLE_SCALE)),
            "image_transport": "compressed" if compressed else "raw",  # one result per frame
            "frame_policy": "every",  # the demo shows a result for every frame
            **IMAGE_QOS,
        }, parameter_overrides(context, PARAMETER_ARGUMENTS)],
        ros_arguments=["--log-level", config["log_level"]],
    )
    monitor = Node(
        package="mixclf_ros", executable="mixclf_monitor", name="mixclf_monitor", output="screen",
        emulate_tty=True,
        parameters=[{"frames": frames, "alpha_schedule": config["alpha_schedule"]}],
    )
    camera = Node(
        package="mixclf_ros", executable="mixclf_camera_sim", name="camera_sim", output="screen",
        parameters=[{
            "rate": float(config["rate"]), "frames": frames, "attack_eps": attack_eps,
            "attack_steps": int(config["attack_steps"]), "noise_std": float(config["noise_std"]),
            "publish_compressed": compressed,
            "wait_for_active_node": "mixclf",  # an inactive node publishes nothing: start with its first result
        }],
    )
    end = [
        RegisterEventHandler(OnProcessExit(target_action=monitor, on_exit=[Shutdown(reason="monitor finished")])),
        RegisterEventHandler(OnProcessExit(target_action=classifier, on_exit=[Shutdown(reason="mixclf exited")])),
        RegisterEventHandler(OnProcessExit(target_action=camera, on_exit=[TimerAction(
            period=LAST_RESULTS_GRACE_S, actions=[Shutdown(reason="camera finished")])])),
    ]
    return [*end, classifier, monitor, camera]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("mixclf_ros"), "config", "mixclf.yaml")
    arguments = [
        DeclareLaunchArgument("params_file", default_value=default_params, description="parameters of the mixclf node"),
        *(DeclareLaunchArgument(name, default_value=default, description=description)
          for name, (default, description) in DEMO_ARGUMENTS.items()),
        *(DeclareLaunchArgument(name, default_value="", description=f"{description} (empty: from params_file)")
          for name, (_, description) in PARAMETER_ARGUMENTS.items()),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=demo_nodes)])
