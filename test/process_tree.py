"""The live processes below a pid, from Linux /proc: how the tests check that nothing is left running."""

from __future__ import annotations

from pathlib import Path


def process_identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time in clock ticks) of a live process, None once it has exited (also while a
    zombie or dead, not yet reaped): a pid that was reused later has another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every live descendant of `pid`."""
    found, stack = set(), [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                if (identity := process_identity(child)) is not None:
                    found.add(identity)
                    stack.append(child)
    return found
