"""How a command's standard streams behave: closed ones pointed at /dev/null (``closed_streams_to_null``),
characters an ASCII standard output or error cannot hold written as escapes or ASCII stand-ins
(``printable_streams``), whether the reader of standard output has gone (``stdout_closed``), and whether a
progress bar can show (``bar_disable``)."""

from __future__ import annotations

import codecs
import os
import select
import sys

# What this library's own tables and messages write that ASCII lacks, in ASCII: "mean +/- std", not "mean \xb1 std"
# (a title's dash or ellipsis too: an encoding error cannot tell whose text it is in).
ASCII_FOR = {"\u00b1": "+/-", "\u00d7": "x", "\u00b7": ".", "\u2014": "--", "\u2013": "-", "\u2026": "..."}


def _bytes_or_escapes(err: UnicodeError) -> tuple[str | bytes, int]:
    """An encoding error handler: the bytes of a file name Python could not decode (its surrogates, as
    ``surrogateescape`` gives them back), an ASCII stand-in for a sign of this library's own (``ASCII_FOR``:
    +/- for the sign of mean +/- std), and escapes (``\\xe9``) for any other character (a title's)."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    chunk = err.object[err.start:err.end]
    if all(0xDC80 <= ord(c) <= 0xDCFF for c in chunk):
        return bytes(ord(c) - 0xDC00 for c in chunk), err.end
    return "".join(ASCII_FOR.get(c) or c.encode("ascii", "backslashreplace").decode() for c in chunk), err.end


codecs.register_error("iisan-escape", _bytes_or_escapes)


def closed_streams_to_null(prog: str) -> None:
    """A standard stream the caller closed (``>&-``) is pointed at /dev/null: else the first file this process
    opens takes its number, and whatever a library writes to stderr lands in that file (a run's lock). A
    closed standard output is said, once, on stderr: what the command prints is lost."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115
            if fd == 1 and sys.stderr is not None:
                print(f"{prog}: standard output is closed: what this command prints is lost", file=sys.stderr)


def printable_streams() -> None:
    """Standard output that writes what its encoding cannot hold (a title under an ASCII locale with
    PYTHONUTF8=0) as escapes or ``ASCII_FOR``'s stand-ins, not a UnicodeEncodeError when the table is half
    printed; file names still as their bytes. Standard error, not UTF-8, the same (Python escapes there)."""
    if getattr(sys.stdout, "errors", None) in ("strict", "surrogateescape") and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="iisan-escape")
    if getattr(sys.stderr, "errors", None) == "backslashreplace" and hasattr(sys.stderr, "reconfigure") and \
            codecs.lookup(sys.stderr.encoding).name != "utf-8":  # its messages' signs too (a dash, ...)
        sys.stderr.reconfigure(errors="iisan-escape")


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its end)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no file descriptor: take it as so
        return True


def bar_disable(enabled: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar on stderr: None (tqdm draws one where stderr is a terminal), or True
    where not ``enabled`` or where the terminal says it is 0 columns wide (a pseudo-terminal that a script or a
    CI wrapper made, ``script -qc``): tqdm drew nothing there, and no log lines took the bar's place."""
    if not enabled:
        return True
    try:
        if sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns == 0:
            return True
    except (OSError, ValueError, AttributeError):  # no file number (a stream a caller swapped in)
        pass
    return None
