"""Ctrl-C in a terminal sends SIGINT to the whole process group, and a launcher may forward its own:
the installed executables must end cleanly (exit code 0, no traceback) on a repeated SIGINT, at any
point of their life."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO_ROOT
from process_tree import descendants, process_identity
from rosutil import node_with_client

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)


def interrupt_group_twice(process: subprocess.Popen, gap_s: float = 0.2, timeout: float = 60.0) -> int:
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(gap_s)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError("did not stop after two SIGINTs") from None


def test_active_node_ends_cleanly_on_two_sigints_to_its_group(tmp_path, installed_prefix):
    log_path = tmp_path / "node.log"
    params = ["--params-file", str(REPO_ROOT / "config" / "mixclf.yaml"), "-p", "device:=cpu"]
    with node_with_client(*params, log_path=log_path) as (client, process):
        client.close()  # the node's own process group gets the signals, not this test
        code = interrupt_group_twice(process)
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("executable, delay_s", [
    ("mixclf_monitor", 0.5),   # importing
    ("mixclf_monitor", 1.5),   # importing, or between rclpy.init and the node's creation
    ("mixclf_monitor", 8.0),   # waiting for the classifier's parameter services (15 s)
    ("mixclf_camera_sim", 0.5),
    ("mixclf_camera_sim", 8.0),  # loading data or waiting for subscribers
    ("mixclf_node", 0.5),
])
def test_programs_end_cleanly_when_interrupted_while_starting(tmp_path, installed_prefix, executable, delay_s):
    log_path = tmp_path / f"{executable}.log"
    path = REPO_ROOT / "install" / "mixclf_ros" / "lib" / "mixclf_ros" / executable
    # a domain of its own: nothing answers, so the programs stay in their start-up waits
    env = {**os.environ, "ROS_DOMAIN_ID": str(200 + os.getpid() % 30)}
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        time.sleep(delay_s)
        code = interrupt_group_twice(process)
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def run_entry_point(tmp_path, module_source: str) -> subprocess.CompletedProcess:
    """Runs `interrupts.run("entry:main")` for a module written from `module_source`."""
    (tmp_path / "entry.py").write_text(textwrap.dedent(module_source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    return subprocess.run([sys.executable, "-c", "from mixclf_ros.interrupts import run; run('entry:main')"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_an_interrupt_while_importing_ends_the_program_before_main_even_if_a_library_swallows_it(tmp_path):
    # libraries that wrap their optional imports in a bare `except:` used to swallow the
    # KeyboardInterrupt, and a KeyboardInterrupt inside torch's import aborted the process at exit
    result = run_entry_point(tmp_path, """
        import os, signal, time
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except BaseException:
            pass

        def main():
            print("main ran")
            return 3
    """)
    assert result.returncode == 0, result.stderr
    assert "main ran" not in result.stdout
    assert "Traceback" not in result.stderr


def test_an_error_that_follows_an_interrupt_ends_the_program_with_one_line(tmp_path):
    # rclpy's own handler shuts the context down at once, so node creation can fail with
    # "context is not valid" before the program sees the KeyboardInterrupt
    result = run_entry_point(tmp_path, """
        import os, signal, time

        def main():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            except KeyboardInterrupt:
                pass
            raise RuntimeError("the given context is not valid")
    """)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "interrupted: RuntimeError: the given context is not valid" in result.stderr


def test_an_error_without_an_interrupt_still_fails_the_program(tmp_path):
    result = run_entry_point(tmp_path, """
        def main():
            raise RuntimeError("a real failure")
    """)
    assert result.returncode == 1
    assert "RuntimeError: a real failure" in result.stderr


def test_frames_in_flight_when_ctrl_c_shuts_the_context_down_end_quietly(installed_prefix):
    """Ctrl-C shuts rclpy's context down under the inference thread: the batch it is classifying can
    publish nothing (`publisher's context is invalid`, `Failed to publish`, also from the debug
    image's subscriber count). That must end the batch quietly, not raise out of the thread."""
    import numpy as np
    import rclpy
    from rclpy.parameter import Parameter
    from rosutil import image_message

    from mixclf_ros.ros.frame_queue import PendingFrame
    from mixclf_ros.ros.node import MixclfNode

    context = rclpy.context.Context()
    rclpy.init(context=context)
    overrides = [Parameter("autostart", value=False), Parameter("debug_image", value=True),
                 Parameter("device", value="cpu"), Parameter("torch_threads", value=1)]
    node = MixclfNode(context=context, parameter_overrides=overrides)
    try:
        node.trigger_configure()
        node.trigger_activate()
        assert node._outputs is not None and node._publisher is not None, node._configure_error
        frame = PendingFrame("image", image_message(np.zeros((480, 640, 3), np.uint8), "late", node), 0.0)
        rclpy.try_shutdown(context=context)
        node._classify_safely([frame])  # raised RCLError from the error handler before
        assert node._last_error == ""
    finally:
        node.stop_worker()
        node.destroy_node()


def wait_for(condition, timeout: float, what: str) -> None:
    """Polls `condition` until it holds; fails naming `what` after `timeout` s (a hang, not a speed limit)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def interrupt_twice_half_a_second_apart(command: list[str], tmp_path, result_line: str) -> None:
    """Starts `command` in a process group of its own, waits until the monitor prints a result, sends
    SIGINT to the group twice 0.5 s apart (a terminal's Ctrl-C, then another), and checks that the
    launcher exits 0 with no traceback and that every process it started has ended."""
    import re

    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: set[tuple[int, str]] = set()
    try:
        def running() -> bool:
            started.update(descendants(process.pid))
            assert process.poll() is None, log_path.read_text()[-3000:]
            return re.search(result_line, log_path.read_text(), re.MULTILINE) is not None

        wait_for(running, 300, "the demo's first result")
        started.update(descendants(process.pid))
        assert len(started) >= 3, started
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.5)  # the gap between the two Ctrl-Cs is what is tested
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=60)
        wait_for(lambda: not [pid for pid, start in started if process_identity(pid) == (pid, start)], 60,
                 f"the demo's processes {sorted(started)} to end")
    finally:
        for pid, start in started:
            if process_identity(pid) == (pid, start):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output and "killing it" not in output, output[-3000:]


def test_two_sigints_half_a_second_apart_stop_the_whole_demo(tmp_path, installed_prefix):
    """`make demo`'s launcher: its children run in sessions of their own and get its SIGINT; a second
    Ctrl-C during that stop used to raise out of it, leaving the node and monitor running."""
    interrupt_twice_half_a_second_apart(
        [sys.executable, "-m", "mixclf_ros.demo", "--frames", "0", "--rate", "4", "--device", "cpu",
         "--attack-eps", "0", "--alpha-schedule", ""], tmp_path, r"^\s+1 ")


def test_two_sigints_half_a_second_apart_stop_the_demo_launch_file(tmp_path, installed_prefix):
    """The same for `ros2 launch mixclf_ros demo.launch.py` (needs the `launch` package of a ROS install)."""
    import shutil

    pytest.importorskip("launch", reason="the launch package (a ROS 2 install) is not installed")
    pytest.importorskip("launch_ros", reason="the launch_ros package (a ROS 2 install) is not installed")
    if shutil.which("ros2") is None:
        pytest.skip("no ros2 command (a ROS 2 install: apt ros-<distro>-ros2cli)")
    interrupt_twice_half_a_second_apart(
        [shutil.which("ros2"), "launch", "mixclf_ros", "demo.launch.py", "frames:=0", "rate:=4",
         "attack_eps:=0", "alpha_schedule:=", "device:=cpu"], tmp_path, r"^\s*(\[\S+\] )?\s*1 ")
