"""CSV users and items files (header row, CSV quoting), the generic readers behind ``interactions``:
any ``.csv`` users or items file is read here. Written for MicroLens (Ni et al., "A Content-Driven
Micro-Video Recommendation Dataset at Scale"), whose column names the headers may use.

MicroLens ships two interaction files and a titles file, all with numeric ids:

- ``MicroLens-100k_pairs.tsv``: ``user_id<TAB>item item ...``, oldest first: the same format as the
  Amazon users files, read by ``interactions.read_users`` as it is (the IISAN-Versa authors use it).
- ``MicroLens-100k_pairs.csv``: one interaction a line, ``user,item,timestamp`` with a header row.
- ``MicroLens-100k_title_en.csv``: ``item,title`` with a header row, CSV-quoted (titles hold commas);
  the authors' ``MicroLens-100k_title_en.tsv`` is ``item<TAB>title``, the Amazon items format. Titles
  may be empty (pass ``--allow-empty-titles``).

``interactions.read_users`` / ``read_items`` hand ``.csv`` files to the readers here (``interactions.FORMATS``),
so a CSV data set goes through the same protocol and ``SeqRecData`` as the Amazon ones.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from .. import once
from ..bounds import INTEGER, NUMBER
from ..errors import DataError
from .textfile import CR_EXPECTED, check_user_id, decoded_lines

# Header names taken, case aside, first found first: MicroLens', common ones, Amazon Reviews' (reviewerID, asin
# or 2023's parent_asin, unixReviewTime) and MovieLens' (userId, movieId).
USER_COLUMNS = ("user", "userid", "user_id", "reviewerid")
ITEM_COLUMNS = ("item", "itemid", "item_id", "video", "videoid", "video_id", "parent_asin", "asin", "movieid")
TIME_COLUMNS = ("timestamp", "time", "ts", "unixreviewtime")

log = logging.getLogger(__name__)


def _column(header: list[str], names: tuple[str, ...], path: Path, what: str) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise DataError(f"{path}:1: no {what} column in the header {header} (expected one of {', '.join(names)})")


def _read_csv(path: Path, what: str, encoding: str) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header of a CSV file and its other rows as ``(line number, row)``, read as they are taken (a list
    of them held about 480 bytes an interaction); blank rows skipped. A row's line number is the line it starts on:
    a quoted field may span lines."""
    rows = _rows(path, encoding)
    if (first := next(rows, None)) is None:
        raise DataError(f"{what} file {path} is empty")
    return first[1], _checked(rows, first[1], path)


def _rows(path: Path, encoding: str) -> Iterator[tuple[int, list[str]]]:
    # lines end at LF only (a CR inside quotes is the title's): the reader's line count is the file's
    reader = csv.reader(line for _, line in decoded_lines(path, encoding, allow_cr=True))
    done = 0  # lines the reader has consumed before the row
    try:
        for row in reader:
            yield done + 1, row
            done = reader.line_num
    except csv.Error as err:  # a CR outside quotes, a field over the module's limit (131,072 characters), a NUL
        if "new-line character seen in unquoted field" in str(err):  # the reader's word for a CR there
            raise DataError(f"{path}:{reader.line_num}: a carriage return (CR) inside the line, outside quotes; "
                            f"{CR_EXPECTED}") from None
        raise DataError(f"{path}:{done + 1}: not a CSV row this reader takes ({err})") from None


def _checked(rows: Iterator[tuple[int, list[str]]], header: list[str], path: Path) -> Iterator[tuple[int, list[str]]]:
    for lineno, row in rows:
        if not row or not "".join(row).strip():
            continue
        if len(row) > len(header):  # a title's unquoted comma makes a field more, and would cut the title short
            raise DataError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)} (a field holding a "
                            "comma must be quoted)")
        yield lineno, row


def read_pairs_csv(path: str | Path, encoding: str = "utf-8") -> list[tuple[str, list[str]]]:
    """``user,item,timestamp`` rows -> ``[(user_id, items oldest first)]`` in order of first appearance.

    Each user's items are sorted by timestamp; ties keep file order (a stable sort), and the users whose valid or
    test target a tie decides (their last two items share a timestamp with another item: whole days, in Amazon's
    data) are counted in a warning. A row that repeats an earlier one (user, item and timestamp) is kept, as a
    second interaction, and counted in a warning: it moves that user's later items one place, the valid and test
    targets included."""
    path = Path(path)
    events: dict[str, list[tuple[int | Decimal, int, str]]] = {}
    items: dict[str, str] = {}  # one string per item id, shared by its rows
    header, rows = _read_csv(path, "pairs", encoding)
    u = _column(header, USER_COLUMNS, path, "user")
    i = _column(header, ITEM_COLUMNS, path, "item")
    t = _column(header, TIME_COLUMNS, path, "timestamp")
    for lineno, row in rows:
        if len(row) <= max(u, i, t):
            raise DataError(f"{path}:{lineno}: expected {len(header)} columns, found {len(row)}")
        if not NUMBER.fullmatch(written := row[t].strip()):  # (not float(): it reads '1_0', other scripts' digits)
            raise DataError(f"{path}:{lineno}: timestamp {row[t]!r} is not a number")
        # exact: as floats, stamps past 2**53 (nanoseconds since 1970) would tie and keep file order; whole numbers
        # as ints (a fifth of a Decimal's memory and time; the two compare exactly) but past int()'s 4300 digits
        stamp = int(written) if len(written) <= 30 and INTEGER.fullmatch(written) else Decimal(written)
        if isinstance(stamp, Decimal) and not stamp.is_finite():  # nan sorts anywhere, even into the test target
            raise DataError(f"{path}:{lineno}: timestamp {row[t]!r} is not a finite number")
        user, item = row[u].strip(), row[i].strip()
        if not user or not item:
            raise DataError(f"{path}:{lineno}: empty user or item id")
        check_user_id(user, f"{path}:{lineno}")
        events.setdefault(user, []).append((stamp, lineno, items.setdefault(item, item)))
    if not events:
        raise DataError(f"pairs file {path} holds no interactions")
    for seen in events.values():
        seen.sort()
    if repeats := [pair for seen in events.values() for pair in _repeats(seen)]:
        many = len(repeats) > 1
        log.log(once.level("repeated rows", (path, len(repeats))), "%s: %d row%s an earlier row's user, item and "
                "timestamp (e.g. line %d repeats line %d); each is read as one more interaction: remove them from "
                "the file if they are duplicates", path, len(repeats), "s repeat" if many else " repeats",
                *min(repeats))
    if tied := [(user, seen) for user, seen in events.items() if _targets_tied(seen)]:
        user, seen = tied[0]
        log.log(once.level("tied targets", (path, len(tied))), "%s: %d of %d users' valid or test target is decided "
                "by the order of their rows in the file, as their last two interactions share a timestamp with "
                "another item (e.g. user %r, lines %s); another order of the same rows gives other targets", path,
                len(tied), len(events), user, ", ".join(str(line) for _, line, _ in seen[-3:]))
    return [(user, [item for _, _, item in seen]) for user, seen in events.items()]


def _targets_tied(seen: list[tuple[int | Decimal, int, str]]) -> bool:
    """Whether a tie of timestamps decides one of the last two items of one user's events (in time order)."""
    return any(len({item for when, _, item in seen if when == seen[p][0]}) > 1 for p in (-1, -2) if len(seen) >= -p)


def _repeats(seen: list[tuple[int | Decimal, int, str]]) -> list[tuple[int, int]]:
    """``(line, the line it repeats)`` for each of one user's events, in time order, whose item and timestamp an
    earlier one has (events of one timestamp sort together)."""
    out, first, stamp = [], {}, None
    for when, line, item in seen:
        if when != stamp:
            first, stamp = {}, when
        if (earlier := first.setdefault(item, line)) != line:
            out.append((line, earlier))
    return out


def read_titles_csv(path: str | Path, encoding: str = "utf-8") -> list[tuple[int, str, str]]:
    """``item,title`` rows (header, CSV quoting) -> ``[(line, item_id, title)]`` in file order."""
    path = Path(path)
    header, rows = _read_csv(path, "titles", encoding)
    i = _column(header, ITEM_COLUMNS, path, "item")
    t = _column(header, ("title", "title_en", "name"), path, "title")
    titles = []
    for lineno, row in rows:
        if len(row) <= i:
            raise DataError(f"{path}:{lineno}: expected item,title, found {row!r}")
        titles.append((lineno, row[i].strip(), row[t] if len(row) > t else ""))
    return titles
