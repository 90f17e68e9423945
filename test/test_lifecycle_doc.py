"""docs/LIFECYCLE.md's Python block (SetParameters and ChangeState without the `ros2` command) runs as
written against the installed node, and does what it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from rosutil import node_with_client

pytestmark = pytest.mark.ros


def test_the_documented_snippet_sets_alpha_and_drives_the_lifecycle(tmp_path, installed_prefix):
    text = (REPO_ROOT / "docs" / "LIFECYCLE.md").read_text()
    [snippet] = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    (tmp_path / "drive_mixclf.py").write_text(snippet)
    domain = int(os.environ["ROS_DOMAIN_ID"]) + 120
    params = ["--params-file", str(REPO_ROOT / "config" / "mixclf.yaml"), "-p", "device:=cpu", "-p", "alpha:=0.6"]
    with node_with_client(*params, log_path=tmp_path / "node.log", domain_id=domain) as (client, _):
        result = subprocess.run([sys.executable, str(tmp_path / "drive_mixclf.py")], capture_output=True, text=True,
                                timeout=180, env={**os.environ, "ROS_DOMAIN_ID": str(domain)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines() == ["alpha 0.7: set", "transition 4: done", "transition 3: done",
                                              "state: active"], result.stdout + result.stderr
        assert client.get_parameters("alpha")[0].double_value == pytest.approx(0.7)
        assert client.lifecycle_state() == "active"
