"""Reading the data set's text files: decoded line by line in a named encoding (``--encoding``), so a
byte that is not text in it is reported with its file, line and column instead of a decoder's
traceback; and item ids checked where they enter, since they name image files and LMDB keys."""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import DataError
from ..files import shown

_ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"
RESERVED_IDS = frozenset({".", "..", "__meta__"})  # path components, and the image LMDB's metadata key
MAX_ID_BYTES = 200  # an image file is <id>.<extension>, and file names stop at 255 bytes
CR_EXPECTED = ("lines end in LF or CRLF: remove the CR (a file whose lines all end in CR alone, as old Macs "
               "wrote, converts with tr '\\r' '\\n')")


def decoded_lines(path: Path, encoding: str | None = None, hint: str | None = None,
                  allow_cr: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of ``path`` in ``encoding``, its end (LF or CRLF) included; a
    byte-order mark of the encoding is dropped. Lines end at LF alone: a carriage return elsewhere than
    just before it is a ``DataError`` naming its line and column (universal newlines would end a line
    there and shift every later line number; a file of CR-ended lines, an old Mac's, is refused on line 1),
    unless ``allow_cr`` (CSV: its reader takes CRs itself, a quoted field may hold one).

    A gzip-compressed file, and a byte-order mark of another encoding than ``encoding`` (a UTF-8 one under
    latin-1 would be glued onto the first id), are refused before reading. A byte that is not valid in the
    encoding, or a stream its decoder refuses (UTF-16 without a byte-order mark), is a ``DataError``
    naming the file (and line where known) and the encoding, then ``hint``: by default, to pass
    ``--encoding``; with no ``encoding`` (UTF-8, for an input that has no ``--encoding`` flag), to save
    the file as UTF-8."""
    if hint is None:
        hint = ("save it as UTF-8 (e.g. with iconv -f latin-1 -t utf-8)" if encoding is None
                else "pass --encoding with the file's encoding (e.g. latin-1)")
    check_leading_bytes(path, encoding)
    name = opened = encoding or "utf-8"
    if codecs.lookup(name).name == "utf-8":
        name, opened = "utf-8", "utf-8-sig"  # reads plain UTF-8 alike and drops a leading byte-order mark
    lineno = 0
    with open(path, encoding=opened, errors="surrogateescape", newline="\n") as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if lineno == 1 and line.startswith("\ufeff"):  # the BOM of utf-16-le and the like, not text
                    line = line[1:]
                bad = _ESCAPED.search(line)
                if bad:
                    byte = ord(bad.group()) - 0xDC00
                    raise DataError(f"{path}:{lineno}: byte 0x{byte:02x} at column {bad.start() + 1} is not "
                                    f"{name} text; {hint}")
                cr = line.removesuffix("\n").removesuffix("\r").find("\r")
                if cr >= 0 and not allow_cr:
                    raise DataError(f"{path}:{lineno}: a carriage return (CR) inside the line at column {cr + 1}; "
                                    f"{CR_EXPECTED}")
                yield lineno, line
        except UnicodeError as err:  # the decoder's own refusal: no BOM, truncated data, bytes < 0x80
            where = f" after line {lineno}" if lineno else ""
            raise DataError(f"{path}: not {name} text{where} ({error_text(err)}); {hint}") from None


def check_leading_bytes(path: Path, encoding: str | None) -> None:
    """Refuse, on line 1, a file whose first bytes say it is no text in ``encoding`` (``None``: UTF-8 from
    an input without an ``--encoding`` flag): gzip-compressed, or a byte-order mark of another encoding."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    codec = codecs.lookup(encoding or "utf-8").name
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path}:1: starts with the bytes 1f 8b: the file is gzip-compressed, not text; gunzip it "
                        "first")
    if head.startswith(codecs.BOM_UTF8) and codec not in ("utf-8", "utf-8-sig"):
        raise DataError(f"{path}:1: starts with a UTF-8 byte-order mark (ef bb bf), but --encoding {encoding} was "
                        "given: the file is UTF-8; leave --encoding out (or pass --encoding utf-8)")
    # UTF-32's marks first: UTF-16 LE's (ff fe) begins UTF-32 LE's (ff fe 00 00); the first mark found is the file's
    for bom, wide in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                      (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if not head.startswith(bom):
            continue
        if not codec.startswith(wide):
            iconv = f"save it as UTF-8 (e.g. with iconv -f {wide} -t utf-8)"
            todo = iconv if encoding is None else (  # --encoding reads the users and the items file alike
                f"pass --encoding {wide} if the other data file is {wide.upper()} too, else {iconv}")
            raise DataError(f"{path}:1: starts with a {wide.upper()} byte-order mark ({bom.hex(' ')}): the file is "
                            f"{wide.upper()} text, not {encoding or 'utf-8'}; {todo}")
        return


def visible(text: str) -> str:
    """``text`` for a message: as it is when every character shows, else quoted with escapes (a NUL or
    another control character would be invisible, and ``I1\x00`` would read as the valid id ``I1``)."""
    return text if text.isprintable() else repr(text)


def other_normal_form(unknown: Iterable[str], known: Iterable[str], where: str) -> str:
    """'' or, where ids of ``unknown`` are ids of ``known`` (the file ``where``) in another Unicode normal form
    ('é' as e and a combining accent, or as one character), how many, with one's code points on each side."""
    nfc = {unicodedata.normalize("NFC", k): k for k in known}
    alike = {u: k for u in sorted(unknown) if (k := nfc.get(unicodedata.normalize("NFC", u), u)) != u}
    if not alike:
        return ""
    here, there = next(iter(alike.items()))
    return (f"; {len(alike):,} of them are ids of {where} written with other Unicode characters, e.g. "
            f"{codepoints(here)} here, {codepoints(there)} there: write both files in one normal form (NFC)")


def codepoints(text: str) -> str:
    """``'é' (U+0065 U+0301)``: text with its characters' code points, where two spellings look alike."""
    return f"{text!r} ({' '.join(f'U+{ord(c):04X}' for c in text)})"


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
    elif item_id and item_id.split() != [item_id]:  # (split() cuts at every character isspace() names)
        problem = "contains whitespace (the users file separates item ids by whitespace)"
    elif bad := control_character(item_id):
        problem = f"contains the control character U+{ord(bad):04X}"
    elif len(item_id.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
        problem = f"is longer than {MAX_ID_BYTES} bytes"
    if problem:
        raise DataError(f"{where}: item id {item_id!r} {problem}; item ids must be usable as image file "
                        "names (no whitespace, '/', '\\' or control characters; not '.' or '..')")


def control_character(text: str) -> str:
    """The first control (or other invisible, unassigned) character of ``text``; '' when none."""
    if text.isprintable():  # no character of a C category is printable: the fast answer for nearly every id
        return ""
    return next((ch for ch in text if unicodedata.category(ch).startswith("C")), "")


def check_user_id(user_id: str, where: str) -> None:
    """A user id is any visible text: a control character is damage (a NUL: a UTF-16 file read as UTF-8)."""
    if bad := control_character(user_id):
        hint = " (a NUL: is the file UTF-16? --encoding names its encoding)" if bad == "\0" else ""
        raise DataError(f"{where}: user id {user_id!r} contains the control character U+{ord(bad):04X}{hint}")


def check_data_file(path: Path, what: str) -> None:
    """``path`` is an existing file this process may read (``what``: users or items, for the message)."""
    if path.is_dir():
        raise DataError(f"{what} file {path} is a folder, expected a file")
    if path.exists() and not path.is_file():
        raise DataError(f"{what} file {shown(path)} is not a regular file (a pipe or a device), expected a file")
    if path.is_symlink() and not path.exists():  # to nothing, or a loop
        raise DataError(f"{what} file {shown(path)} is a symbolic link to no file (to {os.readlink(path)!r}, "
                        "which is missing or links back to itself)")
    if not path.is_file():
        raise DataError(f"{what} file {shown(path)} does not exist")
    try:  # (another user's file: before a run folder is made for a run that cannot read it)
        os.close(os.open(path, os.O_RDONLY))
    except OSError as err:
        raise DataError(f"{what} file {shown(path)} cannot be read: {err.strerror}") from None
