"""Ctrl-C for the package's programs: one clean shutdown, never a traceback.

A terminal sends SIGINT to the whole process group, and `ros2 launch` forwards its own on top, so a
program often gets two in a row: the first must stop it, a second must not cut its clean-up short
(uncaught, it printed a traceback and the process died of the signal, exit code -2).

`ignore_repeated_interrupts` installs a SIGINT handler that raises `KeyboardInterrupt` once and
ignores every later SIGINT. Install it before `rclpy.init`: rclpy's own handler (the default,
`SignalHandlerOptions.ALL`) then still shuts the context down and wakes the executors, and chains
to this one.

`run` runs an entry point under it. While the program is still importing (torch, rclpy: seconds on
a loaded machine) an interrupt is only remembered, and the program ends (exit code 0) as soon as
the imports are done: a `KeyboardInterrupt` raised inside torch's import left libtorch half set up
and the process aborted at exit (-6), and one raised inside a library's `except:` was swallowed,
so that the second SIGINT met rclpy's handler alone.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from typing import NoReturn

__all__ = ["ignore_repeated_interrupts", "run"]

_interrupted = threading.Event()


def _raise_once(signum, frame) -> None:
    # SIG_IGN, not a Python function that returns: Python's finalization resets signals with Python
    # handlers to the default action (a SIGINT then kills the exiting process: exit code -2), but
    # leaves ignored ones alone. It also replaces rclpy's handler, whose work (shutting the context
    # down) is done by the first SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _interrupted.set()
    raise KeyboardInterrupt


def _remember(signum, frame) -> None:
    _interrupted.set()


def ignore_repeated_interrupts() -> None:
    """From now on, the first SIGINT raises KeyboardInterrupt in the main thread, later ones are ignored.
    Idempotent; does nothing outside the main thread (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) in (_raise_once, signal.SIG_IGN):
        return
    signal.signal(signal.SIGINT, _raise_once)


def _quiet_exit(code: int) -> NoReturn:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the program is done: nothing left to interrupt
    sys.exit(code)


def run(entry_point: str) -> NoReturn:
    """Exits with the return code of `entry_point` ("package.module:function"), or 0 when interrupted.

    An error raised after an interrupt (e.g. rclpy's "context is not valid" when the SIGINT shut the
    context down while a node was being created) is the interrupt's doing: it ends the program with a
    one-line note instead of a traceback."""
    signal.signal(signal.SIGINT, _remember)
    module_name, _, function_name = entry_point.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    ignore_repeated_interrupts()
    if _interrupted.is_set():
        _quiet_exit(0)
    try:
        try:
            code = function()
        except Exception as error:
            # a call, so a SIGINT whose handler is still pending raises here, into the outer `except`
            if not _interrupted.is_set():
                raise
            print(f"interrupted: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            code = 0
    except KeyboardInterrupt:
        code = 0
    _quiet_exit(code)
