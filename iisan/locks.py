"""One writer at a time (``OutputLock``): an exclusive lock on a file beside or inside the output it guards;
``when_free`` waits for a lock another process holds. The OS drops the lock when its holder dies, even by
SIGKILL, so a crash never leaves a stale lock behind. A file at a lock's path that is not one of ours
(``lock_text``) is refused, never truncated nor removed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

from .errors import InUse, OutputError
from .files import write_failure

log = logging.getLogger(__name__)
T = TypeVar("T")

WAIT_SECONDS = 10.0  # between tries of ``when_free``
RUN_LOCK = ".lock"  # a run folder's lock (``train.runfolder``), named here for readers that load no torch
LOCK_TEXT = re.compile(r"pid [0-9]+ on [^\n]+\n?")  # what ``OutputLock`` writes into its file
NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}  # what flock says where there is none
LOCK_READ = 4096  # bytes of a lock file read to tell whose it is (ours hold one short line)


def lock_text(data: bytes) -> str | None:
    """The text of a lock file's ``data`` when it is what ``OutputLock`` leaves: empty (just created, by
    this process or a racing one) or ``pid N on HOST`` (held, or left by a holder that was killed); None
    for anything else, which is someone else's file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if not text or LOCK_TEXT.fullmatch(text) else None


def is_lock_file(path: str | Path) -> bool:
    """Whether ``path`` is a plain file that ``lock_text`` takes for one of ours."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as fh:
        return lock_text(fh.read(LOCK_READ + 1)) is not None


def held(path: str | Path) -> bool | None:
    """Whether a live process holds the lock file at ``path`` (False when there is none); None where that
    cannot be told from here: no POSIX locks, or a holder on another host (locks need not reach across a
    network file system)."""
    try:
        import fcntl  # POSIX only; elsewhere no lock can be told held
    except ImportError:
        return None
    try:
        fh = open(path, "rb")  # never creates one
    except FileNotFoundError:
        return False
    except OSError:
        return None
    with fh:
        text = lock_text(fh.read(LOCK_READ + 1)) or ""
        if " on " in text and text.split(" on ", 1)[1].strip() != socket.gethostname():
            return None
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # a file system that takes no flock locks (see ``OutputLock.refused``)
            return None
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


class OutputLock:
    """An exclusive lock on the file ``path`` (beside or inside the output it guards), taken with
    ``acquire`` and given back with ``release`` (or as a context manager).

    The holder writes its pid and host into the file, for the message another process gets. Released,
    the file is removed; a process that opened it just before checks, once it holds the lock, that the
    file it locked is still the one at ``path`` and otherwise tries again. A file already at ``path``
    is taken over only when it is one of ours (``lock_text``: empty, or the line a holder killed before
    its release left); anything else is refused in one line and left as it is."""

    def __init__(self, path: str | Path, what: str, hint: str = "wait for it to finish"):
        self.path, self.what, self.hint = Path(path), what, hint
        self.handle = None

    def acquire(self) -> OutputLock:
        try:
            import fcntl  # POSIX only; elsewhere outputs go unlocked
        except ImportError:  # not POSIX: no lock
            return self
        stale = 0
        while True:
            if self.path.is_symlink():  # opening it would create, or lock, whatever it points to
                raise self.foreign("is a symbolic link")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                made = not os.path.lexists(self.path)
                handle = open(self.path, "a+b")  # never truncates: whose the file is is not known yet
            except PermissionError as err:  # another user's lock, left by a killed holder in a shared folder?
                raise self.not_ours_to_open(err) from None
            except OSError as err:
                raise write_failure(self.path, err) from None
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = (lock_text(handle.read(LOCK_READ + 1)) or "").strip() or "another process"
                handle.close()
                raise InUse(f"{self.what} is in use by {holder}; {self.hint}") from None
            except OSError as err:
                handle.close()
                if err.errno == errno.ESTALE and (stale := stale + 1) < 10:  # removed by its holder on another node
                    continue
                raise self.refused(err, made) from None
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(os.fstat(handle.fileno()), current):
                break
            handle.close()  # the previous holder removed the file between our open and our lock
        handle.seek(0)
        if lock_text(handle.read(LOCK_READ + 1)) is None:
            handle.close()
            raise self.foreign("was not written by IISAN (a lock file of IISAN is empty or says 'pid N on HOST')")
        self.handle = handle
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            handle.flush()
        except OSError as err:  # a full disk: the lock file, ours, is removed, and the error is one line
            self.release()
            raise write_failure(self.path, err) from None
        return self

    def refused(self, err: OSError, made: bool) -> OutputError:
        """A lock the file system refused, in one line: one that takes no flock locks (a Lustre mount without
        ``-o flock``, NFS without its lock service, some FUSE mounts), a lock file another node keeps removing
        (ESTALE), or another failure; the empty lock file this process made there is removed."""
        if made:
            with suppress(OSError):
                if self.path.stat().st_size == 0:
                    self.path.unlink()
        if err.errno in NO_FLOCK:
            why = ("the file system there takes no flock locks (Lustre mounted without -o flock, NFS without its "
                   "lock service?): use a folder on a local disk or on one that does, or ask its administrators")
        elif err.errno == errno.ESTALE:
            why = "another node keeps removing it (a network file system): try again once the other writer is done"
        else:
            why = "the file system failed: try again, or write elsewhere"
        return OutputError(f"could not lock {self.path} ({self.what}): {err.strerror or err}; {why}")

    def not_ours_to_open(self, err: OSError) -> OutputError:
        """A lock file this process may not open for writing: one a killed holder of another user left (a shared
        folder, the holder's umask) is said to be one, with its holder, for whoever may remove it."""
        try:
            with open(self.path, "rb") as fh:  # (at most what a lock holds: a large file is no lock)
                left = (lock_text(fh.read(LOCK_READ + 1)) or "").strip() if self.path.is_file() else ""
        except OSError:
            left = ""
        if not left:
            return write_failure(self.path, err)
        return OutputError(f"could not write {self.path}: {err.strerror}; it is the lock file of {self.what} that "
                           f"{left} took, which this user may not replace: if that process has ended, its owner "
                           "(or anyone who may) can remove the file")

    def foreign(self, why: str) -> OutputError:
        return OutputError(f"{self.path}, the lock file of {self.what}, exists and {why}; IISAN never replaces "
                           "or removes a file it did not write: move that one away")

    def release(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            # while still holding it (see the class docstring), and only ours; one that cannot be removed (its
            # folder made read-only meanwhile) stays, taken over by the next holder: the error that ends the
            # run is the one to say, not this
            with suppress(OSError):
                if os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                    self.path.unlink()
            with suppress(OSError):  # (bytes a full disk refused are not written again on close)
                handle.close()

    close = release

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def when_free(call: Callable[[], T], seconds: float = WAIT_SECONDS) -> T:
    """``call()``, tried again every ``seconds`` while an ``OutputLock`` it takes is held by another process
    (the tasks of a job array building one shared cache), said once; Ctrl-C stops the wait."""
    said = False
    while True:
        try:
            return call()
        except InUse as err:
            if not said:
                log.info("%s; waiting for it to be free (Ctrl-C stops)", str(err).split("; ")[0])
                said = True
            time.sleep(seconds)
