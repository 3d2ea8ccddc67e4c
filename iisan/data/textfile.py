"""Reading the data set's text files: decoded line by line in a named encoding (``--encoding``), so a
byte that is not text in it is reported with its file, line and column instead of a decoder's
traceback; and item ids checked where they enter, since they name image files and LMDB keys."""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError

_ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"
RESERVED_IDS = frozenset({".", "..", "__meta__"})  # path components, and the image LMDB's metadata key
MAX_ID_BYTES = 200  # an image file is <id>.<extension>, and file names stop at 255 bytes


def decoded_lines(path: Path, encoding: str = "utf-8", newline: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of ``path`` in ``encoding`` (a UTF-8 byte-order mark is
    dropped). A byte that is not valid in the encoding is a ``DataError`` naming file, line and column."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"  # reads plain UTF-8 alike and drops a leading byte-order mark
    with open(path, encoding=encoding, errors="surrogateescape", newline=newline) as fh:
        for lineno, line in enumerate(fh, 1):
            bad = _ESCAPED.search(line)
            if bad:
                byte = ord(bad.group()) - 0xDC00
                name = encoding.removesuffix("-sig")
                raise DataError(f"{path}:{lineno}: byte 0x{byte:02x} at column {bad.start() + 1} is not {name} text; "
                                "pass --encoding with the file's encoding (e.g. latin-1)")
            yield lineno, line


def check_item_id(item_id: str, where: str) -> None:
    """Item ids become image file names (``<id>.jpg``) and LMDB keys: refuse the ones that cannot be
    (whitespace, path separators, control characters, '.', '..', the LMDB's reserved key)."""
    problem = ""
    if item_id in RESERVED_IDS:
        problem = "is reserved"
    elif "/" in item_id or "\\" in item_id:
        problem = "contains a path separator"
    elif any(ch.isspace() for ch in item_id):
        problem = "contains whitespace (the users file separates item ids by whitespace)"
    elif any(unicodedata.category(ch).startswith("C") for ch in item_id):
        bad = next(ch for ch in item_id if unicodedata.category(ch).startswith("C"))
        problem = f"contains the control character U+{ord(bad):04X}"
    elif len(item_id.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
        problem = f"is longer than {MAX_ID_BYTES} bytes"
    if problem:
        raise DataError(f"{where}: item id {item_id!r} {problem}; item ids must be usable as image file "
                        "names (no whitespace, '/', '\\' or control characters; not '.' or '..')")
