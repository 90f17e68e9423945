"""Shared fixtures. ROS tests run over real DDS on a domain id of their own (set here, before rclpy
is imported), with discovery kept on this host."""

import os
import random
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(60, 100)))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")
# Operator norms cached by the tests (and the nodes they start) stay out of the user's cache.
os.environ.setdefault("MIXCLF_CACHE_DIR", tempfile.mkdtemp(prefix="mixclf-test-cache-"))


def pytest_collection_modifyitems(items: list) -> None:
    """A test that needs the built package (`installed_prefix`) or an rclpy context is a `ros` test,
    marked or not, so that `-m "not ros"` never starts DDS."""
    for item in items:
        if {"installed_prefix", "rclpy_context"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ros)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Small models, small batches: one torch thread is as fast here, and leaves the second core to
    the node processes the tests start."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def installed_prefix() -> Path:
    """The colcon install prefix of this package (make setup builds it)."""
    prefix = REPO_ROOT / "install" / "mixclf_ros"
    if not (prefix / "lib" / "mixclf_ros" / "mixclf_node").exists():
        pytest.fail("package not built: run `make setup` (tests run against the colcon install space)")
    return prefix


@pytest.fixture
def rclpy_context():
    """An initialised rclpy context, shut down after the test."""
    import rclpy

    context = rclpy.context.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)



@pytest.fixture(params=[True, False], ids=["componentwise", "cheap"])
def both_rounding_domains(request, monkeypatch):
    """Runs a test once per rounding domain: every `ErrorBoundedForward` call it makes without
    saying which computes the componentwise bound, or only the cheap per-sample l2 one the node
    computes first. A rule that breaks in either domain fails the test."""
    from mixclf_ros.core.forward_error import ErrorBoundedForward

    call = ErrorBoundedForward.__call__
    monkeypatch.setattr(ErrorBoundedForward, "__call__",
                        lambda self, x, componentwise=request.param: call(self, x, componentwise))
    return request.param
