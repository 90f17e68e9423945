"""The package layout is the architecture: imports run only downwards, no cycles, small modules,
and a public API that imports neither rclpy nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "mixclf_ros"

# Layers from the bottom up: a module may import its own layer and the layers below, never above.
LAYERS: dict[str, int] = {
    "core": 0, "interrupts": 0,
    "vision": 1, "attacks": 1,
    "data": 2,
    "models": 3,
    "runtime": 4, "train": 4,
    "evaluation": 5, "ros": 5, "demo": 5,
}
LEAVES = ("evaluation", "ros", "demo")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _package_imports(module: str, path: Path) -> set[str]:
    """Modules of the package this module imports (anywhere in it, lazily or not)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            imported.add(base)
            imported |= {f"{base}.{alias.name}" for alias in node.names}
    modules = _modules()
    return {name for name in imported if name in modules and name != module and name != "mixclf_ros"}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module: _package_imports(module, path) for module, path in _modules().items()}


def test_every_module_belongs_to_a_layer():
    areas = {_area(module) for module in _modules()} - {"", "msg"}
    assert areas <= set(LAYERS), f"modules outside the layer map: {sorted(areas - set(LAYERS))}"


def test_imports_only_run_downwards(graph):
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if _area(module) and _area(target) in LAYERS and _area(module) in LAYERS
              and _area(module) != _area(target) and LAYERS[_area(target)] >= LAYERS[_area(module)]]
    assert not upward, "imports that run upwards or sideways between layers:\n" + "\n".join(upward)


def test_core_imports_nothing_else_of_the_package(graph):
    outside = [f"{module} -> {target}" for module, targets in graph.items() if _area(module) == "core"
               for target in targets if _area(target) != "core"]
    assert not outside, "\n".join(outside)


def test_leaves_are_imported_by_no_other_area(graph):
    into_leaves = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
                   if _area(target) in LEAVES and _area(module) != _area(target)]
    assert not into_leaves, "\n".join(into_leaves)


def test_no_import_cycles(graph):
    visiting, done, cycles = set(), set(), []

    def visit(module: str, trail: list[str]) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(" -> ".join(trail[trail.index(module):] + [module]))
            return
        visiting.add(module)
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_over_500_lines():
    long = {module: len(path.read_text().splitlines()) for module, path in _modules().items()}
    assert not {m: n for m, n in long.items() if n > MAX_LINES}, {m: n for m, n in long.items() if n > MAX_LINES}


def test_public_api_imports_neither_rclpy_nor_torch():
    script = ("import sys, mixclf_ros; names = mixclf_ros.__all__; "
              "print(len(names), 'torch' in sys.modules, 'rclpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    count, torch_loaded, rclpy_loaded = out.stdout.split()
    assert int(count) > 20 and torch_loaded == "False" and rclpy_loaded == "False"


def test_every_public_name_resolves():
    import mixclf_ros

    for name in mixclf_ros.__all__:
        assert getattr(mixclf_ros, name) is not None, name
    assert {"mix_log_probs", "MixedClassifier", "lipschitz_radius", "smoothing_radius", "Smooth", "load_model",
            "zoo_config", "CertifiedClassifier"} <= set(mixclf_ros.__all__)
