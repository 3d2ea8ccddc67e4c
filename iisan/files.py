"""Writing outputs so that nothing is lost: what the project may replace and how it writes (one writer
at a time: ``locks``).

- Atomic writes (``atomic_path``): a fresh hidden name beside the target (never an existing file),
  renamed into place (``os.replace`` is atomic on one filesystem) when complete and removed when the
  write fails. A failed write (disk full, read-only, permission) is one ``OutputError`` naming the
  target; whatever was there before is untouched. File temporaries that killed writers left are
  removed by the next write of the same target, an hour on (``remove_abandoned``; not by ``bulk`` writes).
- What an output may be (never an input, never someone else's file): ``claims``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import resource
import secrets
import shutil
import stat
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

from .errors import OutputError, UserError, in_the_way

WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports its writes' I/O errors as its own type
TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
ABANDONED_AFTER_S = 3600  # a temporary file untouched this long, its writer gone, was abandoned


# --------------------------------------------------------------------------------------------------
# atomic writes


def temporary_sibling(path: str | Path) -> Path:
    """``.<name>.<pid>-<random>.tmp`` beside ``path``: hidden, and a name nothing else uses, so removing
    it after a failure never removes anything this process did not create. A long name is shortened
    (``temporary_stem``), so that a target whose own name is valid has a valid temporary."""
    path = Path(path)
    while True:
        candidate = path.with_name(f".{temporary_stem(path.name)}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        if not os.path.lexists(candidate):
            return candidate


STEM_BYTES = 255 - 25  # of a temporary's name (NAME_MAX) for its target's: the rest is 2 dots, a pid, "-", 8 hex, .tmp


def temporary_stem(name: str) -> str:
    """``name`` as its temporaries spell it: itself when it fits ``STEM_BYTES``, else its first bytes (cut at a
    character) and ``~`` with 16 hex digits of its sha256, which keep the temporaries of two long names apart."""
    if len(raw := os.fsencode(name)) <= STEM_BYTES:
        return name
    return f"{raw[:STEM_BYTES - 17].decode('utf-8', 'ignore')}~{hashlib.sha256(raw).hexdigest()[:16]}"


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporary siblings of ``path``: left by writers that died when the caller holds the lock of ``path``
    (then no live writer owns one); else judged by ``remove_abandoned``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stem = temporary_stem(path.name)
    return [p for p in path.parent.iterdir() if (m := TEMPORARY.match(p.name)) and m.group("name") == stem]


def only_temporaries_of(folder: Path, name: str) -> bool:
    """Whether ``folder`` holds nothing but temporaries of ``folder/name`` (or nothing): the folder IISAN made
    for it, its writer killed before the rename."""
    return set(folder.iterdir()) <= set(stale_temporaries(folder / name))


def remove(path: Path) -> None:
    """Remove a file or folder this process created (a temporary), quietly: a failure to remove (a
    read-only file system, where nothing was written; a name that cannot even be looked at) must not hide
    the error that led here."""
    with suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def folders_kept_on_success(path: str | Path):
    """A block that may create ``path`` (and missing parents): when it fails, the folders it created and
    left empty are removed again, so a refused command leaves no trace. Folders that existed before, or
    that hold anything, stay."""
    path = Path(path).absolute()
    created = []  # from the leaf up: the folders missing now
    for folder in (path, *path.parents):
        if os.path.lexists(folder):
            break
        created.append(folder)
    try:
        yield
    except BaseException:
        for folder in created:
            with suppress(OSError):
                folder.rmdir()  # only an empty folder goes (a parent still holding one stays)
        raise


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries, to disk (before the rename that publishes them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``path`` (the caller has claimed ``path``). A folder
    already there is moved aside first and removed once the new one is in place, or put back when the
    rename fails."""
    old = temporary_sibling(path) if path.is_dir() and not path.is_symlink() else None
    try:
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:  # a failed rename, or a Ctrl-C between the two: the old folder back in place
        if old is not None and old.exists() and not path.exists():
            with suppress(OSError):
                os.replace(old, path)
        raise
    if old is not None:
        remove(old)


def shown(path: str | Path) -> str:
    """``path`` for a message that it is missing: a relative one says the working folder it was looked
    for in (flags and config files alike give paths relative to it)."""
    path = Path(path)
    return str(path) if path.is_absolute() else f"{path} (in the working folder {Path.cwd()})"


def starts_with(path: Path, head: str) -> bool:
    """Whether ``path`` is a file whose first bytes are ``head`` (how a writer recognises its own text files)."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(len(head.encode())) == head.encode()


def check_readable(path: str | Path) -> None:
    """Raise the operating system's own error ('Permission denied') where safetensors would call every failure to
    open a file 'No such file or directory'; also for a path that is not valid UTF-8 (safetensors cannot open it)
    and for anything but a regular file (a named pipe would hang its reader)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a file name, as Python holds them (surrogateescape)
        raise OSError(errno.EILSEQ, "its path is not valid UTF-8, which safetensors cannot open: rename it") from None
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a folder, a pipe or a device)", str(path))
    open(path, "rb").close()


def failure_reason(err: BaseException) -> str:
    """The operating system's words for a failed write: 'No space left on device', 'Permission denied'; a
    file too large says which limit that may be, as does an I/O error under a file-size limit (LMDB's words)."""
    if isinstance(err, OSError) and err.strerror:
        said = err.strerror
    else:  # safetensors' words for the OS's
        text = str(err)
        found = re.search(r'message: "([^"]+)"', text) or re.search(r"error: ([^:()]+?) \(os error \d+\)", text)
        said = found.group(1) if found else text.splitlines()[0] if text else type(err).__name__
    if said == os.strerror(errno.EFBIG):
        said += " (this process's file-size limit, ulimit -f, or the file system's)"
    elif said.endswith(os.strerror(errno.EIO)) and \
            (limit := resource.getrlimit(resource.RLIMIT_FSIZE)[0]) != resource.RLIM_INFINITY:
        said += f" (or this process's file-size limit, ulimit -f, of {shown_bytes(limit)}: LMDB says it so)"
    return said


def disk_failure(err: BaseException) -> bool:
    """A write this machine's disk refused (full, over quota, read-only, a file too large): said as such, not
    blamed on a download's network."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def write_failure(path: str | Path, err: BaseException) -> OutputError:
    """A failed write in one line: a relative path says the folder it is relative to (a read-only working folder)."""
    try:
        shown = path if Path(path).is_absolute() else f"{path} (in {Path.cwd()})"
    except OSError:  # the working folder was removed
        shown = path
    return OutputError(f"could not write {shown}: {in_the_way(path, err) or failure_reason(err)}")


def require_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse, before writing, an output the disk cannot hold: ``what`` (``"400 images of 224x224
    pixels"``) needs about ``needed`` bytes at ``path``. Some writers (LMDB) report a full disk as an
    'Input/output error' midway; this says what is short, and where, at the start."""
    place = Path(path).absolute()
    while not place.exists() and place != place.parent:  # not created yet: the disk of the nearest folder above
        place = place.parent
    free = shutil.disk_usage(place).free
    if needed > free:
        raise OutputError(f"could not write {path}: {what} need about {shown_bytes(needed)}; the disk holding {place} "
                          f"has {shown_bytes(free)} free: free some space there, or write elsewhere")


def shown_bytes(n: int) -> str:
    """A size as a message says it: ``512 bytes``, ``8.6 MiB``, ``1.2 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def umask() -> int:
    """The umask, from /proc where Linux shows it: ``os.umask`` reads it only by setting it, for every thread
    at once (a file another thread created in between, a cache's writer's, took the other mask)."""
    with suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="latin-1") as fh:
        return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    os.umask(mask := os.umask(0o022))  # elsewhere: set back at once
    return mask


def usual_permissions(*files: Path) -> None:
    """Give ``files`` (and folders) the permissions a new one gets here (the umask's). safetensors creates its
    files readable by their owner alone, LMDB its own 644 and 755, whatever a shared group's umask says."""
    mask = umask()
    for file in files:
        os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~mask)


def permissions_of(replaced: Path, tmp: Path) -> None:
    """``tmp``, about to replace the file ``replaced``, takes its permissions and group (a results file
    someone made private stays so when a resumed run rewrites it); a new file, the umask's."""
    try:
        before = os.stat(replaced)
    except OSError:
        return usual_permissions(tmp)
    with suppress(OSError):  # a group this user is not in: the file keeps the user's own
        os.chown(tmp, -1, before.st_gid)
    os.chmod(tmp, stat.S_IMODE(before.st_mode))


@contextmanager
def atomic_path(path: str | Path, *, bulk: bool = False):
    """A fresh temporary path beside ``path`` to write to (a file or a folder); renamed onto ``path``
    when the block succeeds (a folder by ``replace_folder``), removed when it fails. A failed write
    becomes one ``OutputError`` naming ``path``, which keeps whatever it held before. A file is synced
    before its rename, and abandoned temporaries of ``path`` are removed after it; not with ``bulk``
    (one of many files written into a folder in a row, an image per item), where each would cost a sync
    and a scan of the folder per file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        yield tmp
        if tmp.is_file():
            permissions_of(path, tmp)
            if not bulk:
                fsync(tmp)  # on disk before the rename: after a power cut, the old file or the new one, whole
        replace_folder(tmp, path) if tmp.is_dir() else os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            remove(tmp)
        if isinstance(err, WRITE_ERRORS) and not isinstance(err, UserError):
            raise write_failure(path, err) from None
        raise
    if not bulk:
        remove_abandoned(path)


def remove_abandoned(path: Path) -> None:
    """Remove the file temporaries of ``path`` that killed writers left: untouched for ``ABANDONED_AFTER_S``
    and their process gone from this machine. No lock is needed: a live writer renames its file within
    seconds of its last byte, and a writer on another machine sharing the folder is past that hour too.
    Their age is read on the file system's clock, by ``path``'s own time of writing (just now): a file server
    stamps them all, and a node whose clock runs an hour ahead of it took another node's live one as old."""
    with suppress(OSError):  # a tidying that fails (a folder it may not list) leaves the write done
        now = path.stat().st_mtime
        for tmp in stale_temporaries(path):
            with suppress(OSError):
                info, pid = tmp.lstat(), int(TEMPORARY.match(tmp.name)["pid"])
                if stat.S_ISREG(info.st_mode) and now - info.st_mtime > ABANDONED_AFTER_S and not _running(pid):
                    tmp.unlink()


def _running(pid: int) -> bool:
    try:
        with suppress(PermissionError):  # another user's
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # gone, or a number no process has
        return False
    return True


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_text(payload, **kwargs) -> str:
    """``payload`` as JSON, a float that is not finite as null: strict readers (JavaScript, jq) take no NaN."""
    with suppress(ValueError):  # (raised by a NaN or inf) json's own fast encoder, not the walk, where there are none
        return json.dumps(payload, allow_nan=False, **kwargs)

    def finite(value):
        if isinstance(value, (dict, list, tuple)):
            return {k: finite(v) for k, v in value.items()} if isinstance(value, dict) else [finite(v) for v in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return json.dumps(finite(payload), allow_nan=False, **kwargs)


def write_json_atomic(path: str | Path, payload: dict) -> Path:
    return write_text_atomic(path, json_text(payload, indent=2, default=str) + "\n")


@contextmanager
def put_back_on_failure(*paths: Path):
    """The files at ``paths`` as they were if the block fails: a hard link to each that exists is kept aside
    until the block ends, and renamed back; one that did not exist is removed. For outputs replaced one after
    the other, that must change together (a cache's two files; an image LMDB and its report). A file system
    that refuses the link (a shared folder under ``fs.protected_hardlinks``, another user's file) leaves that
    file without a way back."""
    existed, kept = {path for path in paths if path.is_file()}, {}
    for path in existed:
        with suppress(OSError):
            os.link(path, link := temporary_sibling(path))
            kept[path] = link
    try:
        yield
    except BaseException:
        for path in paths:
            if path in kept:
                with suppress(OSError):
                    os.replace(kept[path], path)
            elif path not in existed:
                remove(path)
        raise
    finally:
        for link in kept.values():
            remove(link)


def path_component(text: str) -> str:
    """``text`` made safe as (part of) one file or folder name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("._") or "_"
