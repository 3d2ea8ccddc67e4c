"""Digests that name what a file holds: a results file records its inputs by them, a checkpoint its
weights, a fetched file the bytes it was published with; and what a set of files looked like (``stat_digest``),
by which a build run again on unchanged inputs keeps what it wrote."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """A short name for a file's content: the first 16 hex digits of its sha256."""
    return sha256(path)[:16]


_FINGERPRINTS: dict[tuple, str] = {}  # (path, device, inode, size, time) -> file_fingerprint


def known_fingerprint(path: str | Path) -> str:
    """``file_fingerprint``, read once a process for one file as make judges it (by its size and time): what
    names a run asks for it at every point of a sweep. A check that the file has not changed since a run read
    it reads the file again (``file_fingerprint``)."""
    info = os.stat(path)
    key = (os.path.abspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = file_fingerprint(path)
    return _FINGERPRINTS[key]


def stat_digest(head: object, files: Iterable[tuple[str, Path]]) -> str:
    """The sha256 of ``head`` (as JSON: the settings that read the files) and of each named file's size and
    modification time, as make judges files ("-" for one that is missing or whose name the system refuses): a
    file rewritten with the same size and time is not seen."""
    digest = hashlib.sha256(json.dumps(head).encode())
    for name, path in files:
        try:
            info = os.stat(path)
            seen = f"{info.st_size} {info.st_mtime_ns}"
        except (OSError, ValueError):
            seen = "-"
        digest.update(f"{name}\t{seen}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
