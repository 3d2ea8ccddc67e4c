"""Users and items files, and the paper's data protocol (authors' ``read_behaviors``).

Protocol: users with >= ``min_seq_len`` interactions; keep each user's last ``max_seq_len + 3``;
drop items that occur nowhere; re-index the rest 1..N in items-file order (0 = padding). Leave one
out: train ``s[:-2]``, valid target ``s[-2]``, test target ``s[-1]``; inputs are the last
``max_seq_len`` items before the target. Popularity counts the train parts only.

All per-user data lives in one right-aligned matrix ``padded`` of shape (users, max_seq_len + 3), so
every split is a column slice (see ``SeqRecData``). The kept items of a user's line before its last
``max_seq_len + 3`` are held aside only so that a recommendation does not suggest them again.
"""

from __future__ import annotations

import array
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import once
from ..bounds import min_seq_len_problem
from ..console import duration
from ..digests import file_fingerprint
from ..errors import ConfigError, DataError
from ..files import shown_bytes
from .csv_files import ITEM_COLUMNS, USER_COLUMNS, read_pairs_csv, read_titles_csv
from .textfile import check_data_file, check_item_id, check_user_id, decoded_lines, other_normal_form, visible

log = logging.getLogger(__name__)
SAID_BYTES = 20_000_000  # users and items files of this size or more: their reading is said


def check_split(split) -> None:
    """Refuse a split that is neither 'valid' nor 'test' (``eval_split``; called first where work comes before it)."""
    if split not in ("valid", "test"):
        raise ConfigError(f"split {split!r}: expected 'valid' or 'test'")


@dataclass
class ItemCatalog:
    """The items file: ids and titles in file order."""

    path: str
    ids: list[str]
    titles: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # not every id and title: a notebook cell showing it printed megabytes
        return f"ItemCatalog({self.path!r}, {len(self):,} items, fingerprint {self.fingerprint})"

    @functools.cached_property
    def titles_digest(self) -> str:
        """A short name for the titles as read (decoded with the run's ``--encoding``): one file read with
        two encodings gives two texts to the text encoder, under one file fingerprint."""
        return hashlib.sha256("\0".join(self.titles).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def read_items(path: str | Path, allow_empty_titles: bool = False, encoding: str = "utf-8") -> ItemCatalog:
    path = Path(path)
    check_data_file(path, "items")
    ids: list[str] = []
    titles: list[str] = []
    seen: dict[str, int] = {}
    tabs = file_format(path) == "tsv"
    for lineno, item_id, title in FORMATS[file_format(path)].item_rows(path, encoding):
        item_id = item_id.strip()
        if not item_id:
            raise DataError(f"{path}:{lineno}: empty item id")
        if tabs:
            title = title.rstrip("\t")  # a tab at the end of the line ends an empty field, as in a users file
            if "\t" in title:  # a third column would be read into the title
                raise DataError(f"{path}:{lineno}: {title.count(chr(9)) + 2} tab-separated fields, expected 2 "
                                "(item_id<TAB>title)")
        if item_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate item id {item_id!r} (first on line {seen[item_id]})")
        check_item_id(item_id, f"{path}:{lineno}")
        if not title.strip() and not allow_empty_titles:
            raise DataError(
                f"{path}:{lineno}: empty title for item {item_id!r} (pass --allow-empty-titles to accept)"
            )
        seen[item_id] = lineno
        ids.append(item_id)
        titles.append(title)
    if not ids:
        raise DataError(f"items file {path} holds no items")
    return ItemCatalog(str(path), ids, titles, file_fingerprint(path))


def tab_lines(path: Path, expected: str, encoding: str = "utf-8", column_names: tuple[str, ...] = ()):
    """``(line, first field, rest)`` of every non-blank line, split at its first tab; a line without a
    tab is an error naming the file, the line and ``expected``. A first line whose first field is one of
    ``column_names`` (a header, as pandas writes one) is warned of: it is read as data, as the authors'
    files have no header."""
    first = True
    for lineno, line in decoded_lines(path, encoding):  # a CR elsewhere than before the LF is refused there
        line = line.removesuffix("\n").removesuffix("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{lineno}: expected {expected}, found no tab")
        key, rest = line.split("\t", 1)
        if first and key.strip().lower() in column_names:
            log.log(once.level("header line", (path, lineno)), "%s:%d: %r looks like a column name, but these "
                    "files have no header line (%s on every line), so it is read as an id; delete the line if it is "
                    "a header", path, lineno, key.strip(), expected)
        first = False
        yield lineno, key, rest


def read_users(path: str | Path, encoding: str = "utf-8",
               merge_duplicates: bool = False) -> list[tuple[str, list[str]]]:
    """``user_id<TAB>item item ...`` lines, or ``user,item,timestamp`` pairs (``.csv``, as MicroLens').

    A user id on two lines is an error naming both, unless ``merge_duplicates``: then the user's items
    are those of all its lines, in file order."""
    path = Path(path)
    check_data_file(path, "users")
    return FORMATS[file_format(path)].users(path, encoding, merge_duplicates)


def _tab_users(path: Path, encoding: str, merge_duplicates: bool) -> list[tuple[str, list[str]]]:
    users: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    one_copy: dict[str, str] = {}  # each item id once: 8M interactions of 100k items were 8M strings (~0.8 GB)
    for lineno, user_id, items in tab_lines(path, "user_id<TAB>item item ...", encoding,
                                               USER_COLUMNS + ("uid",)):
        user_id = user_id.strip()
        if not user_id:
            raise DataError(f"{path}:{lineno}: empty user id")
        check_user_id(user_id, f"{path}:{lineno}")
        if "\t" in items.rstrip():  # a third column (a timestamp) would be read as more items of the history
            raise DataError(f"{path}:{lineno}: {items.count(chr(9)) + 2} tab-separated fields, expected 2 "
                            "(user_id<TAB>item item ..., the items separated by spaces)")
        if user_id in users:
            if not merge_duplicates:
                raise DataError(f"{path}:{lineno}: user {user_id!r} already has a line ({first_line[user_id]}); "
                                "pass --merge-duplicate-users to join a user's lines in file order")
            users[user_id] += [one_copy.setdefault(item, item) for item in items.split()]
            continue
        users[user_id], first_line[user_id] = [one_copy.setdefault(item, item) for item in items.split()], lineno
    if not users:
        raise DataError(f"users file {path} holds no users")
    return list(users.items())


def _tab_item_rows(path: Path, encoding: str):
    return tab_lines(path, "item_id<TAB>title", encoding, ITEM_COLUMNS + ("id",))


@dataclass(frozen=True)
class FileFormat:
    """How one format's users and items files are read."""

    users: Callable[[Path, str, bool], list[tuple[str, list[str]]]]  # (path, encoding, merge_duplicates)
    item_rows: Callable[[Path, str], Iterable[tuple[int, str, str]]]  # (line, item_id, title), file order


FORMATS = {
    "tsv": FileFormat(_tab_users, _tab_item_rows),
    # One interaction a line: a user's lines always join, ordered by timestamp (data.csv_files).
    "csv": FileFormat(lambda path, encoding, _merge: read_pairs_csv(path, encoding), read_titles_csv),
}


def file_format(path: Path) -> str:
    """The format of a users or items file, by its name: ``.csv`` is CSV, any other tab-separated."""
    return "csv" if path.suffix.lower() == ".csv" else "tsv"


@dataclass
class SeqRecData:
    """A data set after the protocol.

    ``padded[u]`` holds user u's last ``L + 3`` items right-aligned (0 = padding), L = max_seq_len:
    train sequence = columns ``[0, L+1)``, valid target = column ``L+1``, test target = column ``L+2``.
    """

    item_ids: list[str]  # dataset index -> item id; index 0 is padding ("")
    titles: list[str]  # dataset index -> title; index 0 is ""
    user_ids: list[str]
    padded: np.ndarray  # (users, L + 3) int64
    max_seq_len: int
    catalog: ItemCatalog
    skipped: dict[str, int]
    # user row -> the kept items of their line before its last L + 3 (re-indexed, oldest first), for the users
    # whose line is longer: evaluation never reads them (the paper's protocol); recommendations mask them
    earlier: dict[int, np.ndarray] = field(default_factory=dict)

    def __repr__(self) -> str:  # (the real Scientific data's default one was 4.8 million characters)
        return (f"SeqRecData({self.num_users:,} users, {self.num_items:,} items, max_seq_len {self.max_seq_len}, "
                f"items file {self.catalog.path!r})")

    @property
    def num_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return int((self.padded > 0).sum())

    # ----------------------------------------------------------------------------------------------
    def train_sequences(self) -> np.ndarray:
        """(users, L + 1): the train part, left-padded. Inputs are [:, :-1], targets [:, 1:]."""
        return self.padded[:, : self.max_seq_len + 1]

    def eval_split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs (U, L), targets (U,), history (U, L+1 or L+2))`` for 'valid' or 'test'."""
        check_split(split)
        L = self.max_seq_len
        if split == "valid":
            return self.padded[:, 1 : L + 1], self.padded[:, L + 1], self.padded[:, : L + 1]
        return self.padded[:, 2 : L + 2], self.padded[:, L + 2], self.padded[:, : L + 2]

    def popularity(self) -> np.ndarray:
        """(N + 1,) probabilities from the train parts; index 0 (padding) is 1.0 so log(pop) = 0."""
        counts = np.bincount(self.train_sequences().ravel(), minlength=self.num_items + 1).astype(np.float64)
        counts[0] = 0.0
        prob = counts / counts.sum()
        prob[0] = 1.0
        return prob

    def history(self, row: int) -> np.ndarray:
        """User ``row``'s every interaction with a kept item, oldest first: ``earlier`` ones, then those of
        ``padded[row]`` (its last ``L + 3``)."""
        tail = self.padded[row][self.padded[row] > 0]
        return np.concatenate([self.earlier[row], tail]) if row in self.earlier else tail

    @functools.cached_property
    def user_row(self) -> dict[str, int]:
        """User id -> row (a look-up per queried user: ``user_ids.index`` made a users file's queries quadratic)."""
        return {user_id: row for row, user_id in enumerate(self.user_ids)}

    @functools.cached_property
    def kept_items(self) -> str:
        """A digest of the kept item ids in index order: which item each row of a table indexed by item
        position (the ID method's embeddings) stands for. Another users file may keep other items under
        the same items file, and then shifts every row after the first one that differs."""
        return hashlib.sha256("\0".join(self.item_ids[1:]).encode("utf-8", "surrogatepass")).hexdigest()[:16]

    def stats(self) -> dict[str, int]:
        return {"users": self.num_users, "items": self.num_items, "interactions": self.num_interactions}

    def repeated_targets(self, split: str) -> int:
        """How many users' ``split`` target repeats an item of their history (the evaluation masks it)."""
        _, targets, history = self.eval_split(split)
        return int((history == targets[:, None]).any(axis=1).sum())


def load_dataset(users_path: str | Path, items_path: str | Path, max_seq_len: int = 10,
                 min_seq_len: int = 5, allow_empty_titles: bool = False, encoding: str = "utf-8",
                 merge_duplicate_users: bool = False) -> SeqRecData:
    began, size = time.monotonic(), sum(os.path.getsize(p) for p in (users_path, items_path) if os.path.isfile(p))
    if size >= SAID_BYTES:  # a million users take a minute or two of reading, said before and after
        log.info("reading %s and %s (%s)", users_path, items_path, shown_bytes(size))
    catalog = read_items(items_path, allow_empty_titles, encoding)
    raw_users = read_users(users_path, encoding, merge_duplicate_users)
    row_of = {item_id: row for row, item_id in enumerate(catalog.ids)}
    keep = max_seq_len + 3
    if problem := min_seq_len_problem(min_seq_len):
        raise DataError(problem)

    unknown_ids: dict[str, int] = {}
    short_users = matched = 0
    users: list[str] = []
    kept = array.array("q")  # every kept user's rows one after another (a list of lists: ~36 bytes an interaction)
    lengths_kept: list[int] = []
    for user_id, items in raw_users:
        rows = [row_of.get(item, -1) for item in items]
        if -1 in rows:  # (a list comprehension: a million users' lines read twice as fast as a loop)
            for item in (item for item, row in zip(items, rows, strict=True) if row < 0):
                unknown_ids[item] = unknown_ids.get(item, 0) + 1
            rows = [row for row in rows if row >= 0]
        matched += len(rows)
        if len(rows) < min_seq_len:
            short_users += 1
            continue
        users.append(user_id)
        kept.extend(rows)  # the protocol keeps the last ``keep``: evaluation masks those, recommend all (``earlier``)
        lengths_kept.append(len(rows))
    read, raw_users = len(raw_users), None  # (its lists of ids: gone before the arrays below are made)
    skipped = {
        "users_too_short": short_users,
        "unknown_item_interactions": sum(unknown_ids.values()),
        "unknown_item_ids": len(unknown_ids),
    }
    if unknown_ids:
        examples = ", ".join(visible(item) for item in sorted(unknown_ids)[:5])
        examples += other_normal_form(unknown_ids, row_of, Path(items_path).name)
        said = (users_path, skipped["unknown_item_interactions"], len(unknown_ids), items_path, examples)
        log.log(once.level("unknown items", said), "%s: skipped %d interactions with %d item ids not in %s (e.g. %s)",
                *said)
    if short_users:
        log.log(once.level("short users", (users_path, short_users, min_seq_len)), "%s: skipped %d users with fewer "
                "than %d known interactions", users_path, short_users, min_seq_len)
    if not users:  # ids joined by another separator are one unknown id each: say so
        glued = next((sep for sep in ",;|" if any(sep in item for item in unknown_ids)), None)
        hint = f" (item ids are separated by spaces; the unknown ids here contain {glued!r})" if glued else ""
        if not glued and not matched and unknown_ids:
            hint = (f": none of its {len(unknown_ids):,} item ids is among the {len(catalog):,} of {items_path} (its "
                    f"first {visible(catalog.ids[0])}): are the two files of one data set, without a header line?")
        elif not glued and not matched:
            hint = ": its lines list no item ids (expected user_id<TAB>item item ..., oldest first)"
        raise DataError(f"{users_path}: no user has {min_seq_len} or more interactions with known items{hint}")

    # Re-index the items that occur, keeping items-file order (authors: provisional ids, then a filter).
    # All users' last ``keep`` rows in one flat array (numpy once, not once a user: a million users in seconds).
    rows_of = np.frombuffer(kept, dtype=np.int64)
    lengths = np.array(lengths_kept, dtype=np.int64)
    ends, tails = np.cumsum(lengths), np.minimum(lengths, keep)
    flat = rows_of[np.repeat(ends - tails - (np.cumsum(tails) - tails), tails) + np.arange(int(tails.sum()))]
    used = np.zeros(len(catalog), dtype=bool)
    used[flat] = True
    new_index = np.zeros(len(catalog), dtype=np.int64)
    new_index[used] = np.arange(1, used.sum() + 1)
    padded = np.zeros((len(users), keep), dtype=np.int64)
    starts = np.repeat(keep - tails - (np.cumsum(tails) - tails), tails)  # a flat position's column, less itself
    padded[np.repeat(np.arange(len(users)), tails), starts + np.arange(len(flat))] = new_index[flat]
    earlier = {}
    for u in np.flatnonzero(lengths > keep).tolist():
        if (before := new_index[rows_of[ends[u] - lengths[u]: ends[u] - keep]]).any():  # (0: in no user's last L + 3)
            earlier[u] = before[before > 0]
    kept_rows = np.flatnonzero(used)
    if size >= SAID_BYTES:
        log.info("read %s users and %s items, and kept %s users and %s items (the protocol), in %s",
                 f"{read:,}", f"{len(catalog):,}", f"{len(users):,}", f"{len(kept_rows):,}",
                 duration(time.monotonic() - began))
    return SeqRecData(
        item_ids=[""] + [catalog.ids[r] for r in kept_rows],
        titles=[""] + [catalog.titles[r] for r in kept_rows],
        user_ids=users,
        padded=padded,
        max_seq_len=max_seq_len,
        catalog=catalog,
        skipped=skipped,
        earlier=earlier,
    )
