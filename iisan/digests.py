"""Digests that name what a file holds: a results file records its inputs by them, a checkpoint its
weights, a fetched file the bytes it was published with."""

from __future__ import annotations

import hashlib
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
