"""A command's log file: after a header, every ``iisan`` log line goes into a file beside what the command writes
too, a run's train.log (``train.records``) or a cache build's ``cache-build.log`` (``model.caching``). Appended
line by line, as a log is: a line a full disk refuses turns the file off with one warning (``LogFile``)."""

from __future__ import annotations

import logging
import sys
from contextlib import suppress
from pathlib import Path

from .console import LOG_DATEFMT, LOG_FORMAT
from .files import failure_reason, write_failure

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
    no one set logging up: a library call) until ``close``. A name or path that is not UTF-8 is written
    escaped, not a crash; a file that cannot be opened (a full disk, a read-only folder) is one line."""

    def __init__(self, handler_class: type[LogFile] = LogFile):
        self.handler_class, self.handler, self.level = handler_class, None, logging.NOTSET

    def open(self, path: Path, header: str) -> None:
        try:
            with open(path, "a", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(header)
            self.handler = self.handler_class(path, mode="a", encoding="utf-8", errors="backslashreplace")
        except OSError as err:
            raise write_failure(path, err) from None
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        logger = logging.getLogger("iisan")
        logger.addHandler(self.handler)
        self.level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)

    def close(self) -> None:
        if self.handler is not None:
            logger = logging.getLogger("iisan")
            logger.removeHandler(self.handler)
            logger.setLevel(self.level)
            with suppress(OSError):  # its last lines could not be written: said once already
                self.handler.close()
            self.handler = None
