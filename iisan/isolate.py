"""A measurement in a fresh process: no shape met, no kernel loaded, no memory allocated before it, and a
crash (out of memory, a native fault) that ends the process ends one row, not the whole benchmark."""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import signal
import traceback
from contextlib import suppress
from pathlib import Path

from .console import setup_logging
from .errors import UserError, error_line
from .logfiles import Logging, open_logs


def _child(fn, args: tuple, kwargs: dict, queue, logs: list[str]) -> None:
    try:
        setup_logging()
        for path in logs:  # the parent's log files take this process's lines too (one it cannot open: none)
            with suppress(UserError):
                Logging().open(Path(path))
        queue.put(("ok", fn(*args, **kwargs)))
    except BaseException as err:  # reported in the row, never a crash of the whole benchmark
        queue.put(("error", error_line(err), traceback.format_exc()))


def in_fresh_process(fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)`` (a module-level function returning a dict, e.g. ``measure_training``) in a
    spawned process; an error becomes the row's ``error`` and ``traceback`` fields."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, kwargs, queue, open_logs()))
    proc.start()
    try:
        outcome = _wait(proc, queue)
    finally:
        proc.join()
    if outcome is None:  # killed (the OOM killer, a signal) or crashed in native code
        return {"error": f"the measuring process died without a result: {died(proc.exitcode)}", "traceback": ""}
    if outcome[0] == "ok":
        return outcome[1]
    return {"error": outcome[1], "traceback": outcome[2]}


def _wait(proc, queue) -> tuple | None:
    """What the child posted, or None once it has ended without posting anything (waiting on the queue
    alone would never end then)."""
    while proc.is_alive():
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            pass
    try:
        return queue.get(timeout=1.0)  # posted just before it exited
    except queue_module.Empty:
        return None


def died(exitcode: int | None) -> str:
    """How a child process ended, in words: 'exit status 3', 'killed by SIGKILL (out of memory?)'."""
    if exitcode is None or exitcode >= 0:
        return f"exit status {exitcode}"
    name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else f"signal {-exitcode}"
    return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
