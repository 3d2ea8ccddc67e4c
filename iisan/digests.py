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
