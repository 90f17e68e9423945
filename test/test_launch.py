"""The launch files: they parse, and their arguments behave as documented. Checked with launch's own
API where `launch` and `launch_ros` are importable (a ROS 2 install), statically (ast) always."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

LAUNCH_DIR = REPO_ROOT / "launch"
LAUNCH_FILES = ["mixclf.launch.py", "demo.launch.py"]
PARAMS = REPO_ROOT / "config" / "mixclf.yaml"


# ------------------------------------------------------------------------------ static (always)
def string_constants(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def names(tree: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | \
        {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def dict_keys(tree: ast.AST, variable: str) -> set[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == variable for t in node.targets):
            return {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
    return set()


@pytest.mark.parametrize("file", LAUNCH_FILES)
def test_launch_files_parse_and_declare_the_common_arguments(file):
    tree = ast.parse((LAUNCH_DIR / file).read_text(), filename=file)
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    declared = string_constants(tree) | dict_keys(tree, "PARAMETER_ARGUMENTS") | dict_keys(tree, "DEMO_ARGUMENTS")
    assert {"params_file", "log_level", "use_sim_time", "alpha", "device"} <= declared
    # parameter-valued arguments default to empty ("from params_file"): no ParameterValue of a default
    assert "ParameterValue" not in names(tree)


def test_mixclf_launch_declares_autostart_and_namespace_statically():
    tree = ast.parse((LAUNCH_DIR / "mixclf.launch.py").read_text())
    assert {"autostart", "use_sim_time", "alpha", "device"} <= dict_keys(tree, "PARAMETER_ARGUMENTS")
    assert {"namespace", "image_topic", "log_level"} <= string_constants(tree)


def test_demo_launch_ends_with_the_monitor_and_subscribes_reliably_statically():
    tree = ast.parse((LAUNCH_DIR / "demo.launch.py").read_text())
    assert {"OnProcessExit", "Shutdown", "RegisterEventHandler"} <= names(tree)
    assert {"reliability", "reliable", "depth", "every"} <= string_constants(tree)


# ------------------------------------------------------------------------------ launch's own API
def launch_api():
    try:
        import launch_ros.actions  # noqa: F401  (imports launch)
    except ImportError as error:
        pytest.skip(f"launch/launch_ros not importable here: {error}")


def load_launch_file(file: str):
    spec = importlib.util.spec_from_file_location(file.replace(".", "_"), LAUNCH_DIR / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(file: str, **given: str):
    """Visits the launch description as `ros2 launch <file> name:=value ...` would, without starting
    processes: returns (description, context, the actions the OpaqueFunction returns)."""
    from launch.actions import OpaqueFunction
    from launch.launch_context import LaunchContext

    description = load_launch_file(file).generate_launch_description()
    context = LaunchContext()
    context.launch_configurations.update(given)
    actions = []
    for entity in description.entities:
        returned = entity.visit(context)  # DeclareLaunchArgument: default unless given
        if isinstance(entity, OpaqueFunction):
            actions += returned or []
    return description, context, actions


def command_line(node, context) -> list[str | None]:
    """The node's command line after substitution (process-local parts as None)."""
    from launch.substitutions import TextSubstitution

    node._perform_substitutions(context)  # what Node.execute does first
    return ["".join(part.text for part in parts) if all(isinstance(p, TextSubstitution) for p in parts) else None
            for parts in node.cmd]


def effective_parameters(node, context) -> dict:
    """Parameters the node starts with: the --params-file files and -p rules, later ones winning."""
    line = command_line(node, context)
    values = {}
    for flag, argument in itertools.pairwise(line):
        if flag == "--params-file":
            for key, section in yaml.safe_load(Path(argument).read_text()).items():
                if key in ("/**", "mixclf", "/mixclf", node.node_name):
                    values.update(section["ros__parameters"])
        elif flag == "-p":
            name, _, value = argument.partition(":=")
            values[name] = yaml.safe_load(value)
    return values


def node_named(actions, executable: str):
    from launch_ros.actions import Node

    return next(a for a in actions if isinstance(a, Node) and a.node_executable == executable)


def params_file_with(tmp_path: Path, **values) -> str:
    data = yaml.safe_load(PARAMS.read_text())
    data["/**"]["ros__parameters"].update(values)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("file", LAUNCH_FILES)
def test_params_file_wins_when_no_argument_is_given(tmp_path, file):
    launch_api()
    mine = params_file_with(tmp_path, alpha=0.8, device="cpu", use_sim_time=True)
    _, context, actions = launch(file, params_file=mine)
    parameters = effective_parameters(node_named(actions, "mixclf_node"), context)
    assert parameters["alpha"] == 0.8
    assert parameters["device"] == "cpu"
    assert parameters["use_sim_time"] is True


@pytest.mark.parametrize("file", LAUNCH_FILES)
def test_given_arguments_override_the_params_file_with_the_parameter_types(tmp_path, file):
    launch_api()
    mine = params_file_with(tmp_path, alpha=0.8)
    given = {"alpha": "1", "device": "cpu", "use_sim_time": "true", "log_level": "debug"}
    if file == "mixclf.launch.py":
        given["autostart"] = "False"
    _, context, actions = launch(file, params_file=mine, **given)
    node = node_named(actions, "mixclf_node")
    parameters = effective_parameters(node, context)
    assert parameters["alpha"] == 1.0 and isinstance(parameters["alpha"], float)  # the node declares a double
    assert parameters["device"] == "cpu" and parameters["use_sim_time"] is True
    if file == "mixclf.launch.py":
        assert parameters["autostart"] is False
    line = command_line(node, context)
    assert line[line.index("--log-level") + 1] == "debug"


def test_a_bad_boolean_argument_is_refused():
    launch_api()
    with pytest.raises(ValueError, match="use_sim_time must be true or false"):
        launch("mixclf.launch.py", use_sim_time="yes")


def test_mixclf_launch_declares_its_arguments_and_remaps_the_camera():
    launch_api()
    description, context, actions = launch("mixclf.launch.py", namespace="front", image_topic="/cam/image_raw")
    declared = {argument.name for argument in description.get_launch_arguments()}
    assert {"namespace", "params_file", "image_topic", "log_level", "alpha", "device", "autostart",
            "use_sim_time"} <= declared
    node = node_named(actions, "mixclf_node")
    command_line(node, context)
    assert node.expanded_node_namespace == "/front"
    assert dict(node.expanded_remapping_rules) == {"image": "/cam/image_raw",
                                                   "image/compressed": "/cam/image_raw/compressed"}


def test_demo_node_subscribes_reliably_with_depth_10_and_classifies_every_frame():
    launch_api()
    _, context, actions = launch("demo.launch.py", attack_eps="15")
    parameters = effective_parameters(node_named(actions, "mixclf_node"), context)
    assert parameters["frame_policy"] == "every"
    assert parameters["qos_overrides./image.subscription.reliability"] == "reliable"
    assert parameters["qos_overrides./image.subscription.depth"] == 10
    assert parameters["safe_radius"] == pytest.approx(15 / (17 * math.sqrt(3)))
    assert parameters["alpha"] == yaml.safe_load(PARAMS.read_text())["/**"]["ros__parameters"]["alpha"]


@pytest.mark.parametrize("executable, ends", [("mixclf_monitor", True), ("mixclf_node", True),
                                              ("mixclf_camera_sim", False)])
def test_demo_launch_ends_when_the_monitor_or_the_node_exits(executable, ends):
    """The launch's event handlers, given the exit event of each process: a Shutdown follows the
    monitor's and the node's exit at once, the camera's only after a grace period for the last results."""
    launch_api()
    from launch.actions import RegisterEventHandler, Shutdown, TimerAction
    from launch.events.process import ProcessExited

    _, context, actions = launch("demo.launch.py")
    process = node_named(actions, executable)
    event = ProcessExited(action=process, name=executable, cmd=[executable], cwd=None, env=None, pid=1, returncode=0)
    handled = [entity for action in actions if isinstance(action, RegisterEventHandler)
               and action.event_handler.matches(event) for entity in action.event_handler.handle(event, context) or []]
    assert any(isinstance(entity, Shutdown) for entity in handled) is ends
    if not ends:
        assert any(isinstance(entity, TimerAction) for entity in handled)
