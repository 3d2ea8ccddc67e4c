"""Item images in an LMDB: each value is a small fixed header plus raw uint8 HWC bytes, never a pickle.

Images are stored already converted to RGB and resized to ``size x size`` (the authors resize at train
time with bilinear squashing, aspect ratio not kept; we do the same once, at build time), so training
decodes no JPEG. The record format and reading are here; building is in ``image_build``. A store that
is not one, a damaged metadata record or a record shorter than its header is one line naming the path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np

from ..errors import ImageStoreError, parse_json
from ..files import shown

log = logging.getLogger(__name__)

MAGIC = b"IIM1"
HEADER = struct.Struct("<4sBHHB")  # magic, flags, height, width, channels
FLAG_BLANK = 1
META_KEY = b"__meta__"
FORMAT = "iisan-images/1"  # what the metadata record's "format" says (``image_build``)
IMAGE_SIZE = 224
MAX_SIZE = 4096  # the largest ``size`` a store may hold (``iisan build-lmdb --size``)
BLANK_SOURCE = "blank"  # the metadata "source" of a store of no images on purpose (``blank_by_design``)


def stored_bytes(record: int, page: int = 4096) -> int:
    """What LMDB takes for a record of ``record`` bytes: one over half a page, whole overflow pages with their 16-byte
    header (a 224 x 224 picture: 37 pages, 0.7 % over its bytes), and its key and node in a leaf."""
    return (-(-(record + 16) // page) * page if record > page // 2 else record) + 64


def encode_record(pixels: np.ndarray, blank: bool = False) -> bytes:
    h, w, c = pixels.shape
    return HEADER.pack(MAGIC, FLAG_BLANK if blank else 0, h, w, c) + np.ascontiguousarray(pixels, np.uint8).tobytes()


def records_digest(txn: lmdb.Transaction) -> str:
    """The name of a store's content: the first 16 hex digits of a sha256 over every record, id and bytes, in
    the store's key order (the metadata record left out). Two builds of the same images get the same
    digest, whatever their LMDB pages look like; a build records it in its metadata (``image_build``)."""
    digest = hashlib.sha256()
    for key, value in txn.cursor():
        if key != META_KEY:
            for part in (key, value):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
    return digest.hexdigest()[:16]


_OPEN: dict[tuple[str, int], tuple[lmdb.Environment, tuple]] = {}  # and the data.mdb it opened (``_file_id``)
_DIGESTS: dict[tuple, str] = {}  # stores built before their metadata held a digest: computed once per process


def _file_id(path: Path) -> tuple | None:
    """Which ``data.mdb`` is at ``path`` now (None: none): a store rebuilt or copied in place is another."""
    try:
        data = os.stat(path / "data.mdb")
    except OSError:
        return None
    return data.st_ino, data.st_dev, data.st_size, data.st_mtime_ns


def _open_readonly(path: Path) -> lmdb.Environment:
    """One handle per (path, process): LMDB refuses to open a path twice in one process. A store replaced on
    disk since (``iisan build-lmdb --overwrite`` in another process, a copy) is opened again: the old handle
    would go on reading the replaced file."""
    key, now = (str(path.resolve()), os.getpid()), _file_id(path)
    if key in _OPEN and _OPEN[key][1] != now:
        log.warning("%s was replaced on disk since this process opened it: reading the store there now (what this "
                    "process read before, an earlier point of a sweep, read the one it replaced)", path)
        close_reader(path)
    if key not in _OPEN and any(opened == key[0] for opened, _ in _OPEN):  # (py-lmdb: "already open" otherwise)
        raise ImageStoreError(f"{path} was opened before this process was forked, and an LMDB handle cannot cross a "
                              "fork: start the processes that read it with multiprocessing's 'spawn' method")
    if key not in _OPEN:
        if not (path / "data.mdb").is_file():
            raise ImageStoreError(f"{path} is not an LMDB (no data.mdb); build it with `iisan build-lmdb`")
        try:  # readahead: a record spans tens of contiguous pages; read page by page, a cold store read 4x slower
            opened = lmdb.open(key[0], readonly=True, lock=False, readahead=True, meminit=False, max_readers=512)
        except lmdb.Error as err:
            raise ImageStoreError(f"{path} is not a readable LMDB ({err}); build it with `iisan build-lmdb`") from None
        _check_whole(path, opened)
        _OPEN[key] = opened, now
    return _OPEN[key][0]


def _check_whole(path: Path, opened: lmdb.Environment) -> None:
    """Refuse a ``data.mdb`` shorter than the pages its metadata names (an interrupted copy): reading a page
    past the end of the file through the memory map kills the process with SIGBUS, with no message. A
    build writes into a temporary folder renamed into place when complete, so a reader never sees one
    half-written."""
    try:
        have = os.path.getsize(path / "data.mdb")
        need = (opened.info()["last_pgno"] + 1) * opened.stat()["psize"]
    except (OSError, lmdb.Error, KeyError) as err:
        opened.close()
        raise ImageStoreError(f"{path} is not a readable LMDB ({err}); build it with `iisan build-lmdb`") from None
    if have < need:
        opened.close()
        raise ImageStoreError(f"{path} is not a whole LMDB (data.mdb is {have} bytes, its pages need {need}): "
                              "copy it again, or move it away and rebuild it with `iisan build-lmdb`")


@contextmanager
def damage_named(path: Path) -> Iterator[None]:
    """An LMDB error while reading the store at ``path`` (a damaged page: ``MDB_CORRUPTED``) as one line. Damage
    inside an image's own bytes is not seen: LMDB keeps no checksums."""
    try:
        yield
    except lmdb.Error as err:
        if "closed/deleted/dropped" in str(err):  # our handle, closed under a reader (``_open_readonly``)
            raise ImageStoreError(f"{path} was replaced on disk while this process read it; run again to read the "
                                  "store there now") from None
        raise ImageStoreError(f"{path} is a damaged LMDB ({err}); move it away and rebuild it with `iisan build-lmdb` "
                              "(or copy it again)") from None


def close_reader(path: Path) -> None:
    """Drop this process's handle on ``path`` (before the store there is replaced)."""
    stale = _OPEN.pop((str(Path(path).resolve()), os.getpid()), None)
    if stale is not None:
        stale[0].close()


def read_meta(path: Path) -> dict | None:
    """The metadata record of the image LMDB at ``path``: None when there is none (not one of ours)."""
    opened = _open_readonly(path)
    with damage_named(path), opened.begin() as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        return None
    try:
        meta = parse_json(bytes(raw))
        meta["size"] = int(meta["size"])
        if not 1 <= meta["size"] <= MAX_SIZE:
            raise ValueError(meta["size"])
    except (ValueError, KeyError, TypeError, OverflowError):
        raise ImageStoreError(f"{path}: the metadata record {META_KEY.decode()!r} is damaged; rebuild the store with "
                              "`iisan build-lmdb --overwrite`") from None
    if meta.get("format", FORMAT) != FORMAT:
        raise ImageStoreError(f"{path}: the metadata record says format {meta['format']!r}, not {FORMAT!r} (a store "
                              "of another version or tool); rebuild it with `iisan build-lmdb --overwrite`")
    return meta


def own_meta(path: Path) -> dict | None:
    """The metadata record of the image LMDB this project wrote at ``path``; None when ``path`` is none (not an
    LMDB, another tool's, a link) or its metadata is damaged."""
    if path.is_symlink() or not path.is_dir() or not (path / "data.mdb").is_file():
        return None
    try:
        return read_meta(path)
    except ImageStoreError:
        return None


def decode_record(value, where: str | Path, item_id: str,
                  shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, bool]:
    """One stored record -> ``(pixels (h, w, c) uint8, a view of value; blank flag)``. ``shape``: the
    only shape accepted (the store's). Reads nothing beyond the header when only the flag is wanted."""
    if len(value) < HEADER.size:
        raise ImageStoreError(f"{where}: image {item_id!r} is truncated ({len(value)} bytes, shorter than its "
                              f"{HEADER.size}-byte header); rebuild the store with `iisan build-lmdb --overwrite`")
    magic, flags, h, w, c = HEADER.unpack_from(value)
    if magic != MAGIC or len(value) != HEADER.size + h * w * c or (shape is not None and (h, w, c) != shape):
        raise ImageStoreError(f"{where}: image {item_id!r} is not a{f' {shape}' if shape else 'n'} IISAN image "
                              "record")
    return np.frombuffer(value, dtype=np.uint8, offset=HEADER.size).reshape(h, w, c), bool(flags & FLAG_BLANK)


def store_digest(path: str | Path, compute: bool = False) -> str | None:
    """The ``records_digest`` of the image LMDB at ``path``, as its metadata records it; for a store built
    before builds recorded it, None, or with ``compute`` (a cache build, which reads every image anyway)
    computed, once per process and version of the files. A handle opened for this alone is closed after
    it: a process forked later (a test's child) could not open the store again."""
    path = Path(path)
    held = (str(path.resolve()), os.getpid()) in _OPEN
    try:
        meta = read_meta(path)
        if meta is None:
            raise ImageStoreError(f"{path} is not an IISAN image LMDB (no {META_KEY.decode()} record)")
        if isinstance(recorded := meta.get("digest"), str):
            return recorded
        if not compute:
            return None
        data = os.stat(path / "data.mdb")
        key = (str(path.resolve()), data.st_size, data.st_mtime_ns, data.st_ino)
        if key not in _DIGESTS:
            log.info("%s: reading every image once more to name its content (a store built before builds "
                     "recorded it)", path)
            with damage_named(path), _open_readonly(path).begin(buffers=True) as txn:
                _DIGESTS[key] = records_digest(txn)
        return _DIGESTS[key]
    finally:
        if not held:
            close_reader(path)


class ImageStore:
    """Read-only access by item id, from any number of threads.

    One LMDB handle per process: a spawned process opens its own; a forked one is refused in one line (an LMDB
    handle must not cross a fork, and py-lmdb will not open the parent's path again). Reads copy
    each record once, straight from the memory map into the caller's array (which may be pinned)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ImageStoreError(f"image LMDB {self.path} is a file; expected the folder `iisan build-lmdb` writes")
        if not self.path.is_dir():
            raise ImageStoreError(f"image LMDB {shown(self.path)} does not exist (build it with `iisan build-lmdb`)")
        self._env = None  # this process's handle (``_open_readonly``), taken at the first read
        self._key = str(self.path.resolve())  # its key in ``_OPEN`` (with the process id): resolved once
        meta = read_meta(self.path)
        if meta is None:
            raise ImageStoreError(f"{self.path} is not an IISAN image LMDB (no {META_KEY.decode()} record)")
        self.meta = meta
        self.size = meta["size"]

    @property
    def blank_by_design(self) -> bool:
        """Whether the store holds no images on purpose: no records and source ``BLANK_SOURCE``, as written
        by ``experiments.offline.blank_image_store`` where no images are available, so that every item is
        served as a blank. ``iisan build-lmdb`` never writes one (it refuses to store no image); its digest,
        that of no records, is no other store's."""
        return self.meta.get("source") == BLANK_SOURCE and self.meta.get("count") == 0

    @contextmanager
    def _txn(self):
        """A read transaction whose values are buffers into the map (zero-copy), valid inside the block."""
        held = _OPEN.get((self._key, os.getpid()))
        if self._env is None or held is None or held[0] is not self._env:  # a new process, or a store replaced
            self._env = _open_readonly(self.path)
        with damage_named(self.path), self._env.begin(buffers=True) as txn:
            yield txn

    def digest(self) -> str:
        """The store's digest, computed when its metadata lacks it (``store_digest``)."""
        return store_digest(self.path, compute=True)

    def __getstate__(self):  # a spawned process opens its own handle
        state = dict(self.__dict__)
        state["_env"] = None
        return state

    def get(self, item_ids: list[str], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels (n, size, size, 3) uint8, blank (n,) bool)``; ids absent from the store are blanks.
        ``out``, if given, is filled in place (e.g. a view of a pinned tensor)."""
        shape = (len(item_ids), self.size, self.size, 3)
        out = np.empty(shape, dtype=np.uint8) if out is None else out
        if out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        blank = np.zeros(len(item_ids), dtype=bool)
        with self._txn() as txn:
            for i, item_id in enumerate(item_ids):
                value = txn.get(item_id.encode("utf-8")) if item_id else None
                if value is None:  # padding ("") or an item the store lacks: see ``blank_ids``
                    out[i] = 0
                    blank[i] = True
                    continue
                pixels, blank[i] = decode_record(value, self.path, item_id, shape[1:])
                np.copyto(out[i], pixels)
        return out, blank

    def blank_ids(self, item_ids: list[str]) -> tuple[list[str], list[str]]:
        """``(missing, flagged)``: ids (padding "" excluded) with no record, and ids stored as blanks.

        Both are served as zeros. Reads only the record headers (zero-copy), so it is cheap.
        """
        missing, flagged = [], []
        with self._txn() as txn:
            for item_id in item_ids:
                if not item_id:
                    continue
                value = txn.get(item_id.encode("utf-8"))
                if value is None:
                    missing.append(item_id)
                elif decode_record(value, self.path, item_id)[1]:
                    flagged.append(item_id)
        return missing, flagged


def recorded_digest(path: str | Path) -> str | None:
    """The digest the image LMDB at ``path`` records (``store_digest``); None where there is no LMDB or it
    records none."""
    return store_digest(path) if (Path(path) / "data.mdb").is_file() else None
