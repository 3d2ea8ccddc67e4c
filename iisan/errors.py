"""Every error a user can cause, in one place. Each carries a one-line message that names the file,
line, flag or value at fault and what is expected; the command line prints it as
``iisan: error: <message>`` and exits with status 2 (``console.py``).

The types subclass ``UserError`` (so one ``except`` catches them all) and the built-in type their
callers would expect (``ValueError`` for bad values, ``RuntimeError`` for runs that cannot go on).
"""

from __future__ import annotations

import errno
import json
import os
import signal as signals
from pathlib import Path


class UserError(Exception):
    """Base of the errors below: bad input or a run that cannot go on, never a bug in this library."""


class ConfigError(UserError, ValueError):
    """A bad value or key in a config or on the command line; names the key."""


class ValuesTogether(ConfigError):
    """Values each fine alone, refused together (heads that do not divide the width): judged once every source
    is merged, since a later ``--config`` file or a flag may change either."""


class DataError(UserError, ValueError):
    """Bad input data; names the file and line."""


class ImageStoreError(UserError, ValueError):
    """A bad or unreadable image store; names the path."""


class CacheError(UserError, ValueError):
    """A missing or mismatching hidden-state cache; names the file and what differs."""


class EncoderError(UserError, ValueError):
    """An encoder that cannot be loaded or used as asked."""


class TargetError(UserError, ValueError):
    """A PEFT target that matches no module; lists the modules that exist."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory, a refused checkpoint)."""


class RunInUse(TrainingError):
    """A run folder another process is training in (its lock names it): a sweep skips that point."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or used; names the file."""


class FetchError(UserError, RuntimeError):
    """A download that cannot be made (offline, blocked, refused) or a fetched file that no longer
    matches its manifest; says what to get from where and where to put it."""


class GridError(UserError, RuntimeError):
    """Some points of a grid of runs failed (each was reported as it failed; the others ran)."""


class OutputError(UserError, OSError):
    """An output that cannot be written: a path this project did not create (never replaced), one of the
    command's inputs, a path another process is writing, or a failed write (disk full, read-only,
    permission); names the path. Temporary files are removed and earlier outputs left as they were."""


class RunInterrupted(RuntimeError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint: ``what`` happened and
    where the checkpoint is, then ``how`` to resume (kept apart so that a sweep can say that its own way).
    ``signal`` names the signal that asked. Not a ``UserError``: the command line exits with the signal's
    status (``interrupt_status``), not 2. ``results``: a run the signal reached in its last epoch finished all
    the same: its results (a sweep lists it as finished)."""

    def __init__(self, what: str, how: str = "", signal: str = "SIGINT", results: dict | None = None):
        super().__init__(f"{what}. {how}" if how else what)
        self.what = what
        self.signal = signal
        self.results = results

    def rehinted(self, how: str, what: str | None = None) -> RunInterrupted:
        """The same stop, told another way to resume (a sweep's, a script's)."""
        return RunInterrupted(self.what if what is None else what, how, self.signal, self.results)


class Terminated(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (``STOP_SIGNALS``), raised where Ctrl-C raises KeyboardInterrupt: the
    same endings, with that signal's exit status. ``signal``: its name."""

    def __init__(self, *args, signal: str = "SIGTERM"):
        super().__init__(*args)
        self.signal = signal


# The signals that stop a command as Ctrl-C does, each with its own exit status: SIGTERM (a preempted job),
# SIGUSR1 (a batch scheduler's notice that the job's time runs out: SLURM's --signal=USR1@120), SIGHUP (the
# terminal was closed). Left at their default action, the last two killed a run without its checkpoint.
STOP_SIGNALS = tuple(name for name in ("SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signals, name))


def interrupt_status(signal: str) -> int:
    """The exit status of a command a signal stopped, as a shell reports one the signal killed (128 + its
    number): 130 for SIGINT, 143 for SIGTERM (which batch schedulers read as a job terminated), 138 for
    SIGUSR1 and 129 for SIGHUP on Linux."""
    return 128 + int(signals.Signals[signal]) if signal in signals.Signals.__members__ else 130


def ignore_stops() -> None:
    """A command ending on a signal ignores the ones after it while Python and torch run their exit hooks (a second
    or so): a second Ctrl-C there printed a traceback from one, or killed the process with the signal's status
    instead of 130 (``console.exit_interrupted`` registers it as the exit hook that runs first)."""
    for name in ("SIGINT", *STOP_SIGNALS):
        try:
            signals.signal(signals.Signals[name], signals.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            pass


USER_ERRORS = (UserError,)


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``: an error that is not a ``UserError``, named in one line."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{type(err).__name__}: {message}"


class NestedTooDeep(ValueError):
    """JSON nested deeper than Python's decoder recurses (a few thousand ``[``: a hostile or damaged file)."""


def parse_json(text: str | bytes, **hooks):
    """``json.loads(text, **hooks)``, whose every failure on bad text is a ``ValueError``: the decoder's own
    RecursionError on nesting too deep becomes ``NestedTooDeep``, so readers catch one type, as they do for text
    that is not JSON, not UTF-8, or holds an integer of over 4300 digits."""
    try:
        return json.loads(text, **hooks)
    except RecursionError:
        raise NestedTooDeep("arrays or objects nested deeper than Python's JSON reader goes") from None


def in_the_way(path: str | Path, err: BaseException) -> str:
    """For 'Not a directory' or 'File exists' (the ``mkdir`` of a folder where a file is), which file above
    ``path`` is in the way; '' for any other error."""
    if not isinstance(err, (NotADirectoryError, FileExistsError)) or not isinstance(path, (str, os.PathLike)):
        return ""
    for above in Path(path).parents:
        if os.path.lexists(above):
            if above.is_dir():
                return ""
            return f"{above} is a symbolic link to nothing, not a folder" if above.is_symlink() and not \
                above.exists() else f"{above} is a file, not a folder"
    return ""


class InUse(OutputError):
    """An output another process holds the lock of (named by its pid and host): wait for it."""


def machine_failure(err: BaseException, path: str | Path) -> BaseException | None:
    """What to stop with when reading ``path`` failed for the machine's sake, not the file's (out of memory, of
    file descriptors, an I/O error): a rerun may succeed, so the file must not be marked bad for good. None
    for a failure of the file itself."""
    if isinstance(err, MemoryError):
        return err
    if isinstance(err, OSError) and err.errno in (errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EIO):
        return DataError(f"could not read {path}: {err.strerror}, a failure of this machine (its limits: ulimit -n, "
                         "ulimit -v; or its disk), not of the file: run the same command again once it is mended")
    return None
