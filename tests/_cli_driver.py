"""Running the real ``iisan`` command line as a separate process, cheaply.

``run_forked`` forks this (already imported) interpreter: the child points fds 0/1/2 at files, applies
an optional fault (a resource limit, another user, a patched function: it changes only the child),
calls ``iisan.cli.main.main(argv)`` and exits with its status, exactly as ``python -m iisan`` would,
minus the 3 s of importing torch and transformers. An exception that escapes ``main`` is printed as
the interpreter prints it (a traceback), so the caller sees what a user would. ``run_subprocess`` is
the real entry point, for the few checks that the two agree.

``snapshot`` hashes every file under some folders, so a test can prove that nothing that existed
before a failing command was changed or removed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHILD_TIMEOUT = 180  # seconds; a hung child (e.g. waiting on a prompt) is killed, and the test fails
CHECKOUT = Path(__file__).resolve().parents[1]  # the package the children run: this tree's


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""

    def describe(self) -> str:
        return f"exit {self.code}\n--- stdout ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-6000:]}"


def run_forked(argv: list[str], scratch: Path, fault: Callable[[], None] | None = None, stdin: bytes = b"",
               cwd: Path | None = None) -> Outcome:
    """``iisan <argv>`` in a forked child; its stdout/stderr files go to ``scratch``."""
    from iisan.cli.main import main  # imported once, in the parent: the children inherit it

    scratch.mkdir(parents=True, exist_ok=True)
    files = {n: scratch / f".child.{n}" for n in ("in", "out", "err")}
    files["in"].write_bytes(stdin)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            signal.alarm(CHILD_TIMEOUT)
            os.chdir(cwd or scratch)
            for fd, name, mode in ((0, "in", os.O_RDONLY), (1, "out", os.O_WRONLY), (2, "err", os.O_WRONLY)):
                os.dup2(os.open(files[name], mode | (os.O_CREAT | os.O_TRUNC if fd else 0), 0o644), fd)
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            root = logging.getLogger()
            for handler in root.handlers[:]:  # pytest's capture: the child logs to its stderr like the CLI
                root.removeHandler(handler)
            if fault is not None:
                fault()
            try:
                main(argv)
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
                if isinstance(done.code, str):
                    print(done.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # a full disk (the fault) may refuse even this
                    pass
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    read = {n: files[n].read_text(errors="replace") for n in ("out", "err")}
    for path in files.values():
        path.unlink(missing_ok=True)
    return Outcome(os.waitstatus_to_exitcode(status), read["out"], read["err"])


def run_subprocess(argv: list[str], cwd: Path, stdin: bytes = b"", env: dict | None = None) -> Outcome:
    """``python -m iisan <argv>``: the real entry point, in a fresh interpreter, of this checkout's package
    (not whichever one is installed: a copy of the tree tests its own code)."""
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "iisan", *argv], cwd=cwd, input=stdin, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})},
                          timeout=CHILD_TIMEOUT)
    return Outcome(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


LOCKS = (".iisan-lock", "/.lock")


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (hidden ones included; locks, which are not outputs, aside),
    by path."""
    found = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink() and not str(path).endswith(LOCKS):
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def changed(before: dict[str, str], after: dict[str, str], may_change: tuple[str, ...] = ()) -> list[str]:
    """Files of ``before`` that are gone or differ in ``after`` (paths ending in ``may_change`` aside)."""
    return [f"{path} {'removed' if path not in after else 'changed'}" for path, digest in before.items()
            if after.get(path) != digest and not path.endswith(may_change or ("\0",))]


def leftovers(*roots: Path) -> list[str]:
    """Temporary files and locks that a failed command should have removed."""
    found = []
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            for name in names + dirs:
                if name.endswith((".tmp", ".iisan-lock")) or name == ".lock":
                    found.append(str(Path(dirpath) / name))
    return found
