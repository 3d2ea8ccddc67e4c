"""One file over HTTP(S), resumably and checked: the bytes go to ``<dest>.part`` and the file is renamed
onto ``dest`` only when it is complete and matches what is known of it (size, sha256, git blob id).

Resuming: a ``.part`` left by an interrupted download is continued with an HTTP ``Range`` request; a
server that answers with the whole file instead (status 200) or cannot satisfy the range (416) makes
the download restart from the first byte. A ``.part`` as long as the file and passing its checks (a run
stopped before the rename) is renamed without a request. A finished file that fails its check is removed
(it is our own ``.part``) and the error says so; the next run downloads it again. A network failure keeps
the ``.part`` for the next run and ends with one line naming the address and where the file goes.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import math
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..claims import refuse_link
from ..digests import sha256
from ..errors import FetchError
from ..files import disk_failure, write_failure

log = logging.getLogger(__name__)

BLOCK = 1 << 20


@dataclass(frozen=True)
class Expected:
    """What is known of a file before downloading it (None: unknown, not checked)."""

    size: int | None = None
    sha256: str | None = None
    git_blob: str | None = None  # git's object id: sha1 of b"blob <size>\0" + content


def git_blob_id(path: str | Path) -> str:
    """The id git gives a file's content, so a download can be checked against a repository's tree."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def digests(found: str, want: str, shown: int = 16) -> tuple[str, str]:
    """Two digests that differ, each cut to its first ``shown`` digits where those tell them apart, else
    whole (two messages' prefixes alike would read as a match)."""
    if found[:shown] == want[:shown]:
        return found, want
    return f"{found[:shown]}…", f"{want[:shown]}…"


def mismatch(path: Path, expected: Expected) -> str | None:
    """How ``path`` differs from ``expected``, or None."""
    size = path.stat().st_size
    if expected.size is not None and size != expected.size:
        return f"has {size:,} bytes, expected {expected.size:,}"
    if expected.sha256 is not None and (found := sha256(path)) != expected.sha256:
        return "has sha256 {}, expected {}".format(*digests(found, expected.sha256))
    if expected.git_blob is not None and (found := git_blob_id(path)) != expected.git_blob:
        return "has git blob id {}, expected {}".format(*digests(found, expected.git_blob, 12))
    return None


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return " ".join(f"{type(err).__name__}: {reason}".split())


def _open(url: str, start: int, timeout: float):
    headers = {"Range": f"bytes={start}-"} if start else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, timeout: float, size: int | None = None) -> None:
    """Append to ``part`` from where it ends, or rewrite it when the server will not resume. With the file's
    ``size`` known, a server that sends more is cut off one byte past it (the size check then names it)."""
    start = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, start, timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not start:
            raise
        log.info("%s: the partial download %s is not a prefix the server can continue; restarting", url, part)
        start = 0
        response = _open(url, 0, timeout)
    with response:
        resumed = start and response.status == 206 and \
            (response.headers.get("Content-Range") or "").startswith(f"bytes {start}-")
        if start and not resumed:
            log.info("%s: the server does not resume downloads; restarting from the first byte", url)
        elif resumed:
            log.info("%s: resuming at byte %s", url, f"{start:,}")
        most = math.inf if size is None else size + 1 - (start if resumed else 0)  # bytes still to take
        with open(part, "ab" if resumed else "wb") as fh:
            while most > 0 and (block := response.read(min(BLOCK, most))):
                fh.write(block)
                most -= len(block)
            received = fh.tell() - (start if resumed else 0)
        announced = response.headers.get("Content-Length")
        if announced is not None and received < int(announced) and most != 0:  # short reads at EOF
            raise http.client.IncompleteRead(b"", int(announced) - received)


def http_download(url: str, dest: str | Path, expected: Expected = Expected(), timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (see the module docstring); returns ``dest``."""
    dest = Path(dest)
    part = partial_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(part, f"a partial download of {dest.name}")
    have = part.stat().st_size if part.exists() else None
    if expected.size is not None and have is not None and have >= expected.size:
        if have == expected.size and mismatch(part, expected) is None:
            log.info("%s is complete (a run stopped before renaming it) and matches; using it", part)
            os.replace(part, dest)
            return dest
        part.unlink()  # longer than the file, or as long and not it: not a prefix of it
    try:
        _transfer(url, part, timeout, expected.size)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        if disk_failure(err):
            raise write_failure(part, err) from None
        kept = f"the partial file {part} is kept for the next run, or " if part.is_file() else ""
        raise FetchError(f"cannot download {url} ({_reason(err)}); {kept}download it by hand from {url} to "
                         f"{dest}") from None
    problem = mismatch(part, expected)
    if problem:
        part.unlink()
        raise FetchError(f"the file downloaded from {url} {problem}; it was removed, run the command again "
                         f"to retry, or download it by hand to {dest}")
    os.replace(part, dest)
    return dest
