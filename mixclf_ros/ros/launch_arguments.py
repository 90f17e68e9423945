"""Launch arguments that stand for node parameters, shared by the package's launch files.

A launch argument that stands for a parameter overrides the parameters file only when it is given:
its default is empty, meaning "as in the parameters file". Needs no rclpy (only the launch
context's string configurations), so the launch files can import it anywhere `launch` runs.
"""

from __future__ import annotations

from typing import Any


def parameter_overrides(context: Any, arguments: dict[str, tuple[type, str]]) -> dict[str, Any]:
    """{parameter: typed value} for the launch arguments in `arguments` (name -> (type, description))
    that were given (not empty) in `context` (a `launch.LaunchContext`). Booleans must be spelled
    true or false."""
    overrides: dict[str, Any] = {}
    for name, (kind, _) in arguments.items():
        text = context.launch_configurations.get(name, "").strip()
        if not text:
            continue
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(f"launch argument {name} must be true or false, got {text!r}")
            overrides[name] = text.lower() == "true"
        else:
            overrides[name] = kind(text)
    return overrides
