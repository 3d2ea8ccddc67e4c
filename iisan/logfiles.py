"""A command's log file: after a header, every ``iisan`` log line goes into a file beside what the command writes
too: a run's train.log (``train.records``), a cache build's or import's ``cache-build.log`` (``model.caching``),
the benchmark's ``benchmark.log`` and a reproduction's ``reproduce-<data set>.log`` (``command_log``). Appended
line by line, as a log is: a line a full disk refuses turns the file off with one warning (``LogFile``)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .console import LOG_DATEFMT, LOG_FORMAT
from .files import failure_reason, starts_with, write_failure
from .provenance import command_line, git_commit

log = logging.getLogger(__name__)


class LogFile(logging.FileHandler):
    """A log file's handler. A line it cannot write (a full disk) turns it off, with one warning on the
    console, where logging's own handling would print a '--- Logging error ---' traceback for every later
    line, burying the error that ends the command. Turned off by a flag, not removed from the logger: the
    failure happens while the logger iterates its handlers, and the warning itself passes through here."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):  # a line that cannot be formatted (a bug): logging's traceback
            super().handleError(record)
        elif not self.failed:
            self.failed = True  # before the warning, which passes through here
            log.warning("could not write %s: %s; it stops here (the console has every line)", self.baseFilename,
                        failure_reason(err))


class Logging:
    """``open``: append ``header`` to ``path``, then copy every ``iisan`` log line there (at INFO, even where
    no one set logging up: a library call) until ``close``; where no one did, standard error gets the lines too, as
    a command shows them (a notebook showed nothing for a whole run, not even a warning: the file's handler kept
    logging's last resort away). A name or path that is not UTF-8 is written escaped, not a crash; a file that
    cannot be opened (a full disk, a read-only folder) is one line."""

    def __init__(self):
        self.handler, self.level, self.console = None, logging.NOTSET, None

    def open(self, path: Path, header: str = "") -> None:
        """``header`` appended, then the lines; without one, lines only (a child process's, ``open_logs``)."""
        try:
            if header:
                with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
                    fh.write(header)
            self.handler = LogFile(path, mode="a", encoding="utf-8", errors="backslashreplace")
        except OSError as err:
            raise write_failure(path, err) from None
        logger = logging.getLogger("iisan")
        if not logger.hasHandlers():
            self.console = logging.StreamHandler()
        for handler in (self.console, self.handler):
            if handler is not None:
                handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
                logger.addHandler(handler)
        self.level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)

    def close(self) -> None:
        if self.handler is not None:
            logger = logging.getLogger("iisan")
            logger.removeHandler(self.handler)
            if self.console is not None:
                logger.removeHandler(self.console)
                self.console = None
            logger.setLevel(self.level)
            with suppress(OSError):  # its last lines could not be written: said once already
                self.handler.close()
            self.handler = None


def command_log(path: Path, head: str, what: str, heads: tuple[str, ...] = ()) -> Logging:
    """The log of one command at ``path``, open from here to its ``close``: a header (``head``, the time, the command
    line and the commit) appended after the earlier commands' logs there. A file of that name that is no such log
    (its first line starts with neither ``head`` nor one of ``heads``) or a link is left as it is, with a warning
    naming ``what`` it is not, and no log is kept."""
    log_file = Logging()
    if path.is_symlink() or (path.exists() and not any(starts_with(path, h) for h in (head, *heads))):
        log.warning("%s is not a %s of IISAN's: left as it is, and this command keeps no log", path, what)
        return log_file
    log_file.open(path, f"{head}: started {time.strftime('%Y-%m-%d %H:%M:%S %z')} ===\n"
                        f"command: {command_line()}\ncommit: {git_commit()}\n")
    return log_file


@contextmanager
def logging_to(log_file: Logging, what: str) -> Iterator[None]:
    """The block's log lines go to ``log_file`` (open), closed after it; a block that fails says how ``what``
    ended there last (the console prints the error itself after the file is closed)."""
    try:
        yield
    except BaseException as err:
        log.info("the %s ended: %s", what, " ".join(str(err).split()) or type(err).__name__)
        raise
    finally:
        log_file.close()


def open_logs() -> list[str]:
    """The log files this process writes now, which a process it starts appends its own lines to (``Logging.open``
    without a header): the benchmark measures each row in a fresh process."""
    return [h.baseFilename for h in logging.getLogger("iisan").handlers if isinstance(h, LogFile) and not h.failed]
