"""The package layout, the message contract, ROS-free imports and the pip wheel."""

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

ROS_AREAS = ("mixclf_ros.ros.", "mixclf_ros.demo.", "mixclf_ros.msg")
ROS_FREE_IN_ROS_AREAS = ("mixclf_ros.ros.launch_arguments", "mixclf_ros.demo.render")
"""The architecture's rclpy-free modules inside the ROS areas (docs/ARCHITECTURE.md)."""


def _library_modules() -> list[str]:
    """Every module of the package outside the ROS areas (derived from the files, not kept by hand),
    and the ROS-free ones inside them; "mixclf_ros" first."""
    names = []
    for path in sorted((REPO_ROOT / "mixclf_ros").rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] == "__main__" or name == "mixclf_ros":
            continue  # an entry point runs on import
        if not name.startswith(ROS_AREAS) or name in ROS_FREE_IN_ROS_AREAS:
            names.append(name)
    return ["mixclf_ros", *names]


LIBRARY_MODULES = _library_modules()

REQUIRED_FIELDS = {
    "header": "std_msgs/Header", "status": "uint8", "class_id": "int32", "class_name": "string",
    "probability": "float", "alpha": "float", "certificate_method": "uint8", "norm": "uint8",
    "certified_radius": "float", "image_radius": "float", "confidence": "float", "safe_radius": "float",
    "safe_image_radius": "float",
    "safe": "boolean", "robust_class_id": "int32", "robust_margin": "float", "standard_class_id": "int32",
    "inference_ms": "float",
}


def test_message_has_the_contract_fields_and_constants():
    from mixclf_ros.msg import CertifiedClassification as Msg
    from mixclf_ros.runtime.classifier import NORM_CODES, CertificateMethod, Status

    fields = Msg.get_fields_and_field_types()
    for name, field_type in REQUIRED_FIELDS.items():
        assert fields.get(name) == field_type, name
    for status in Status:
        assert getattr(Msg, f"STATUS_{status.name}") == status.value
    for method in CertificateMethod:
        assert getattr(Msg, f"CERTIFICATE_{method.name}") == method.value
    assert Msg.NORM_L2 == NORM_CODES["l2"] and Msg.NORM_LINF == NORM_CODES["linf"]
    text = (REPO_ROOT / "msg" / "CertifiedClassification.msg").read_text()
    for name in REQUIRED_FIELDS:  # every field documented by a comment above it
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.split("#")[0].split()[1:2] == [name])
        assert lines[index - 1].startswith("#") or name in ("status", "certificate_method", "safe"), name


def test_publisher_and_subscriber_exchange_the_message_over_dds(rclpy_context):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from mixclf_ros.msg import CertifiedClassification as Msg

    talker = rclpy.create_node("contract_talker", context=rclpy_context)
    listener = rclpy.create_node("contract_listener", context=rclpy_context)
    received: list[Msg] = []
    listener.create_subscription(Msg, "contract_test", received.append, 10)
    publisher = talker.create_publisher(Msg, "contract_test", 10)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(talker)
    executor.add_node(listener)
    sent = Msg(status=Msg.STATUS_OK, class_id=7, class_name="Sneaker", probability=0.93, alpha=0.6,
               certificate_method=Msg.CERTIFICATE_LIPSCHITZ, norm=Msg.NORM_L2, certified_radius=0.21,
               image_radius=5.3, confidence=1.0, safe_radius=0.1, safe=True, robust_class_id=7,
               robust_margin=0.8, standard_class_id=7, inference_ms=1.5)
    sent.header.frame_id = "camera"
    sent.header.stamp.sec, sent.header.stamp.nanosec = 1234, 5678
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        publisher.publish(sent)
        executor.spin_once(timeout_sec=0.1)
    executor.shutdown()
    assert received, "no message received over DDS within 10 s"
    got = received[0]
    assert got.header.frame_id == "camera" and got.header.stamp.sec == 1234 and got.header.stamp.nanosec == 5678
    assert (got.class_id, got.class_name, got.safe, got.norm) == (7, "Sneaker", True, Msg.NORM_L2)
    assert got.certified_radius == pytest.approx(0.21)


BLOCK_ROS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('rclpy', 'sensor_msgs', 'std_msgs', 'diagnostic_msgs', 'rcl_interfaces') \\
                or name.startswith('mixclf_ros.msg'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
blocked = [m for m in sys.modules if m.split('.')[0] == 'rclpy' or m.startswith('mixclf_ros.msg')]
assert not blocked, blocked
print('ok')
"""


@pytest.mark.slow
def test_library_imports_without_ros():
    result = subprocess.run([sys.executable, "-c", BLOCK_ROS, *LIBRARY_MODULES], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_node_module_does_need_ros():
    """The blocker above is real: the node module fails to import under it."""
    result = subprocess.run([sys.executable, "-c", BLOCK_ROS, "mixclf_ros.ros.node"], capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode != 0 and "blocked for this test" in result.stderr


@pytest.mark.slow
def test_pip_builds_a_wheel_with_the_library(tmp_path: Path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt",
                 "requirements-cluster.txt"):
        (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    subprocess.run(["cp", "-r", str(REPO_ROOT / "mixclf_ros"), str(source / "mixclf_ros")], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mixclf_ros-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in LIBRARY_MODULES[1:]:
        path = module.replace(".", "/")
        assert f"{path}.py" in names or f"{path}/__init__.py" in names, module
    assert any(name.startswith("mixclf_ros/models/zoo/") and name.endswith(".pt") for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mixclf-eval = mixclf_ros.evaluation.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: cluster" in metadata and 'Requires-Dist: ray==2.60.0; extra == "cluster"' in metadata


def test_installed_layout(installed_prefix: Path):
    for executable in ("mixclf_node", "mixclf_camera_sim", "mixclf_monitor", "mixclf_demo", "mixclf_eval"):
        path = installed_prefix / "lib" / "mixclf_ros" / executable
        assert path.exists() and path.stat().st_mode & 0o111, executable
    share = installed_prefix / "share" / "mixclf_ros"
    assert (share / "launch" / "mixclf.launch.py").exists()
    assert (share / "config" / "mixclf.yaml").exists()
    assert (share / "package.xml").exists()
    site = next((installed_prefix / "lib").glob("python3*/site-packages/mixclf_ros"))
    assert (site / "msg" / "_certified_classification.py").exists()
    assert (site / "ros" / "node.py").exists() and any((site / "models" / "zoo").glob("*.pt"))


def test_package_xml_declares_runtime_dependencies():
    text = (REPO_ROOT / "package.xml").read_text()
    assert '<package format="3">' in text and "<build_type>ament_cmake</build_type>" in text
    for dependency in ("rclpy", "sensor_msgs", "std_msgs", "diagnostic_msgs", "builtin_interfaces",
                       "rosidl_default_generators", "rosidl_default_runtime", "python3-torch",
                       "python3-torchvision", "python3-opencv", "python3-numpy"):
        assert f">{dependency}<" in text, dependency

