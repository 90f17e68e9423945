"""`make demo`: camera simulator -> mixclf node -> monitor, three processes over real DDS.

    python -m mixclf_ros.demo.launcher --frames 60 --rate 5 --attack-eps 30 --alpha-schedule 0:0.6,20:0.3,40:0.8

Starts the classifier node with the shipped parameters file, waits until it is active (lifecycle
`get_state`), starts the monitor and the simulator, and ends all three cleanly when the monitor
has its frames, the simulator is done, or on Ctrl-C. Exit code 0 when every frame got a result.

With `--attack-eps E` (l2, frame pixels in [0,1]) the simulator attacks the standard model, and
the node's `safe_radius` is set to the attack's size at the model input, so `safe` means: the
certificate covers the attack, i.e. the frame provably has the class of its clean version.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mixclf_ros.demo.render import ARTICLE_SCALE, article_budget


def default_params_file() -> str:
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory("mixclf_ros")) / "config" / "mixclf.yaml"
    except (ImportError, LookupError, ValueError):
        path = Path(__file__).resolve().parents[1] / "config" / "mixclf.yaml"
    return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mixclf-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60, help="frames to classify (0: until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz")
    parser.add_argument("--attack-eps", type=float, default=15.0,
                        help="PGD on the standard model, l2 radius in frame pixels in [0,1] (0: no attack)")
    parser.add_argument("--attack-steps", type=int, default=20)
    parser.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise std, [0,1] pixels")
    parser.add_argument("--alpha", type=float, default=0.6, help="initial alpha")
    parser.add_argument("--alpha-schedule", default="20:0.3,40:1.0",
                        help="result index:alpha pairs applied live, e.g. 20:0.3,40:1.0 ('' for none)")
    parser.add_argument("--compressed", action="store_true",
                        help="the camera also publishes PNG frames; the node classifies those (image_transport)")
    parser.add_argument("--params-file", default=default_params_file())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--summary-file", default="", help="write the monitor's JSON summary here")
    parser.add_argument("--start-index", type=int, default=0, help="first Fashion-MNIST test image")
    parser.add_argument("--timeout", type=float, default=180.0, help="give up waiting for the node (s)")
    return parser.parse_args(argv)


def wait_until_active(timeout: float) -> bool:
    """Polls the node's lifecycle state over its get_state service."""
    import rclpy
    import rclpy.executors
    from lifecycle_msgs.msg import State
    from lifecycle_msgs.srv import GetState

    context = rclpy.context.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("mixclf_demo_waiter", context=context)
    executor = rclpy.executors.SingleThreadedExecutor(context=context)
    client = node.create_client(GetState, "mixclf/get_state")
    deadline = time.monotonic() + timeout
    active = False
    try:
        while time.monotonic() < deadline and not active:
            if client.wait_for_service(timeout_sec=0.5):
                future = client.call_async(GetState.Request())
                rclpy.spin_until_future_complete(node, future, timeout_sec=2.0, executor=executor)
                active = future.done() and future.result().current_state.id == State.PRIMARY_STATE_ACTIVE
            if not active:
                time.sleep(0.2)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    return active


def stop(process: subprocess.Popen, name: str, timeout: float = 15.0) -> None:
    stop_all({name: process}, timeout)


def stop_all(processes: dict[str, subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGINT to every process still running, then waits for them all (`timeout` seconds in all, then
    SIGKILL)."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"demo: {name} did not stop on SIGINT; killing it", file=sys.stderr)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def python_program(module: str) -> list[str]:
    """The command of a program of this package run as `mixclf_ros.interrupts.run` runs the installed
    executables: a Ctrl-C while importing or a repeated one ends it cleanly."""
    return [sys.executable, "-c", f"from mixclf_ros.interrupts import run; run('{module}:main')"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary_file = args.summary_file or os.path.join(tempfile.mkdtemp(prefix="mixclf_demo_"), "summary.json")
    from mixclf_ros.runtime.frame_result import ONE_GREY_LEVEL  # (torch: not needed for --help)

    # with no attack, the shipped threshold (one grey level) stays in force rather than none
    safe_radius = (article_budget(args.attack_eps, "l2", scale=ARTICLE_SCALE) if args.attack_eps > 0
                   else ONE_GREY_LEVEL)
    node_args = ["--ros-args", "--params-file", args.params_file, "-p", f"alpha:={args.alpha}",
                 "-p", f"safe_radius:={safe_radius}", "-p", f"device:={args.device}",
                 "-p", f"image_transport:={'compressed' if args.compressed else 'raw'}",
                 # every frame gets a result: the demo camera publishes reliably, and the node queues
                 # frames instead of keeping only the newest when a CPU hiccup delays inference
                 "-p", "frame_policy:=every",
                 "-p", "qos_overrides./image.subscription.reliability:=reliable",
                 "-p", "qos_overrides./image.subscription.depth:=10",
                 "-p", "qos_overrides./image/compressed.subscription.reliability:=reliable",
                 "-p", "qos_overrides./image/compressed.subscription.depth:=10"]
    sim_args = ["--ros-args", "-p", f"rate:={args.rate}", "-p", f"frames:={args.frames}",
                "-p", f"attack_eps:={args.attack_eps}", "-p", f"attack_steps:={args.attack_steps}",
                "-p", f"noise_std:={args.noise_std}", "-p", f"start_index:={args.start_index}",
                "-p", f"publish_compressed:={str(args.compressed).lower()}"]
    monitor_args = ["--ros-args", "-p", f"frames:={args.frames}", "-p", f"summary_file:={summary_file}"]
    if args.alpha_schedule.strip():  # rcl refuses an empty `-p name:=`; the monitor's default is no schedule
        monitor_args += ["-p", f"alpha_schedule:={args.alpha_schedule}"]
    print(f"demo: alpha {args.alpha}, schedule '{args.alpha_schedule}', attack l2 eps {args.attack_eps} in "
          f"frame pixels = {safe_radius:.3f} at the model input (the node's safe_radius)", flush=True)

    processes: dict[str, subprocess.Popen] = {}
    exit_code = 1
    try:
        processes["node"] = subprocess.Popen(python_program("mixclf_ros.ros.node") + node_args, start_new_session=True)
        if not wait_until_active(args.timeout):
            print("demo: the mixclf node did not become active", file=sys.stderr)
            return 1
        processes["monitor"] = subprocess.Popen(python_program("mixclf_ros.demo.monitor") + monitor_args,
                                                start_new_session=True)
        time.sleep(1.0)  # let the monitor discover the topics before the first frame
        processes["camera"] = subprocess.Popen(python_program("mixclf_ros.demo.camera_sim") + sim_args,
                                               start_new_session=True)
        while processes["monitor"].poll() is None:
            if processes["node"].poll() is not None:
                print("demo: the mixclf node exited", file=sys.stderr)
                break
            if processes["camera"].poll() is not None:
                # all frames sent: give the last results a few seconds, then stop the monitor
                try:
                    processes["monitor"].wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    stop(processes["monitor"], "monitor")
                break
            time.sleep(0.1)
        if processes["monitor"].wait() != 0 or not Path(summary_file).is_file():
            print(f"demo: the monitor failed (exit code {processes['monitor'].returncode}, no summary)",
                  file=sys.stderr)
            return 1
        summary = json.loads(Path(summary_file).read_text())
        expected = args.frames
        exit_code = 0 if args.frames == 0 or summary["total"]["results"] >= expected else 1
        if exit_code:
            print(f"demo: {summary['total']['results']} results for {expected} frames", file=sys.stderr)
    except KeyboardInterrupt:
        exit_code = 0
    finally:
        # The children run in sessions of their own (a terminal's Ctrl-C reaches only this process): a
        # second Ctrl-C raising out of the stop left the children not yet signalled running for ever.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all({name: processes[name] for name in ("camera", "monitor", "node") if name in processes})
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
