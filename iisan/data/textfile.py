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


def decoded_lines(path: Path, encoding: str | None = None, newline: str | None = None,
                  hint: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of ``path`` in ``encoding`` (a UTF-8 byte-order mark is
    dropped). A byte that is not valid in the encoding, or a stream its decoder refuses (UTF-16 without a
    byte-order mark), is a ``DataError`` naming the file (and line where known) and the encoding, then
    ``hint``: by default, to pass ``--encoding``; with no ``encoding`` (UTF-8, for an input that has no
    ``--encoding`` flag), to save the file as UTF-8."""
    if hint is None:
        hint = ("save it as UTF-8 (e.g. with iconv -f latin-1 -t utf-8)" if encoding is None
                else "pass --encoding with the file's encoding (e.g. latin-1)")
    name = encoding = encoding or "utf-8"
    if codecs.lookup(encoding).name == "utf-8":
        name, encoding = "utf-8", "utf-8-sig"  # reads plain UTF-8 alike and drops a leading byte-order mark
    lineno = 0
    with open(path, encoding=encoding, errors="surrogateescape", newline=newline) as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                bad = _ESCAPED.search(line)
                if bad:
                    byte = ord(bad.group()) - 0xDC00
                    raise DataError(f"{path}:{lineno}: byte 0x{byte:02x} at column {bad.start() + 1} is not {name} "
                                    f"text; {hint}")
                yield lineno, line
        except UnicodeError as err:  # the decoder's own refusal: no BOM, truncated data, bytes < 0x80
            where = f" after line {lineno}" if lineno else ""
            raise DataError(f"{path}: not {name} text{where} ({error_text(err)}); {hint}") from None


def visible(text: str) -> str:
    """``text`` for a message: as it is when every character shows, else quoted with escapes (a NUL or
    another control character would be invisible, and ``I1\x00`` would read as the valid id ``I1``)."""
    return text if text.isprintable() else repr(text)


def error_text(err: UnicodeError) -> str:
    """A decoder's message in one line, without the positions in a read buffer (they are not the file's)."""
    if isinstance(err, UnicodeDecodeError):
        return err.reason
    return " ".join(str(err).split()) or type(err).__name__


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
