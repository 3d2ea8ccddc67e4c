"""Item images in an LMDB: each value is a small fixed header plus raw uint8 HWC bytes, never a pickle.

Images are stored already converted to RGB and resized to ``size x size`` (the authors resize at train
time with bilinear squashing, aspect ratio not kept; we do the same once, at build time), so training
decodes no JPEG. Missing, unreadable or corrupt images are stored as a flagged blank (zeros), counted,
listed in a report file, and never stop the build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ImageStoreError

log = logging.getLogger(__name__)

MAGIC = b"IIM1"
HEADER = struct.Struct("<4sBHHB")  # magic, flags, height, width, channels
FLAG_BLANK = 1
META_KEY = b"__meta__"
IMAGE_SIZE = 224


def encode_record(pixels: np.ndarray, blank: bool = False) -> bytes:
    h, w, c = pixels.shape
    return HEADER.pack(MAGIC, FLAG_BLANK if blank else 0, h, w, c) + np.ascontiguousarray(pixels, np.uint8).tobytes()


def decode_record(value: bytes, key: str = "?") -> tuple[np.ndarray, bool]:
    if len(value) < HEADER.size:
        raise ImageStoreError(f"image record {key!r} is truncated ({len(value)} bytes)")
    magic, flags, h, w, c = HEADER.unpack_from(value)
    if magic != MAGIC or len(value) != HEADER.size + h * w * c:
        raise ImageStoreError(f"image record {key!r} is not an IISAN image record")
    pixels = np.frombuffer(value, dtype=np.uint8, offset=HEADER.size).reshape(h, w, c)
    return pixels, bool(flags & FLAG_BLANK)


def load_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB, squashed to size x size with bilinear resampling (authors' ``Resize((224, 224))``)."""
    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def write_image_lmdb(out_path: str | Path, item_ids: list[str], pixels_of, size: int = IMAGE_SIZE,
                     progress: bool = True, source: str = "") -> list[tuple[str, str]]:
    """Write one record per id, ``pixels_of(item_id) -> (uint8 (size, size, 3), problem or None)``; a
    record with a problem is stored as a flagged blank. Built beside the target and renamed into place.
    Returns the (item_id, problem) list."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    record = HEADER.size + size * size * 3
    map_size = int(len(item_ids) * (record + 512) * 1.2) + (64 << 20)
    problems: list[tuple[str, str]] = []
    env = lmdb.open(str(tmp), map_size=map_size, subdir=True, lock=False, readahead=False, meminit=False)
    try:
        txn = env.begin(write=True)
        bar = tqdm(item_ids, desc="images", unit="img", disable=None if progress else True)
        for n, item_id in enumerate(bar, 1):
            pixels, problem = pixels_of(item_id)
            if problem:
                problems.append((item_id, problem))
                pixels = np.zeros((size, size, 3), dtype=np.uint8)
            txn.put(item_id.encode("utf-8"), encode_record(pixels, blank=problem is not None))
            if n % 2000 == 0:
                txn.commit()
                txn = env.begin(write=True)
        meta = {"format": "iisan-images/1", "count": len(item_ids), "size": size, "blank": len(problems),
                "source": source}
        txn.put(META_KEY, json.dumps(meta).encode())
        txn.commit()
    finally:
        env.close()
    stale = _OPEN.pop((str(out_path.resolve()), os.getpid()), None)
    if stale is not None:  # a reader of the old store in this process must not keep the old files
        stale.close()
    if out_path.exists():
        shutil.rmtree(out_path)
    os.replace(tmp, out_path)
    return problems


def build_image_lmdb(image_dir: str | Path, out_path: str | Path, item_ids: list[str] | None = None,
                     size: int = IMAGE_SIZE, extension: str = ".jpg", progress: bool = True) -> dict:
    """Build ``out_path`` from ``image_dir/<item_id><extension>``.

    ``item_ids`` defaults to every ``*<extension>`` in the folder. Returns counts; the list of bad
    items goes to ``<out_path>.report.tsv``."""
    image_dir, out_path = Path(image_dir), Path(out_path)
    if not image_dir.is_dir():
        raise ImageStoreError(f"image folder {image_dir} does not exist")
    if item_ids is None:
        item_ids = sorted(p.name[: -len(extension)] for p in image_dir.iterdir() if p.name.endswith(extension))
    if not item_ids:
        raise ImageStoreError(f"no images to store: {image_dir} has no *{extension} files and no item list")

    def pixels_of(item_id: str):
        path = image_dir / f"{item_id}{extension}"
        if not path.is_file():
            return None, "missing"
        try:
            return load_image(path, size), None
        except Exception as err:  # any decoder failure is a bad image, never a stop
            return None, f"unreadable: {type(err).__name__}: {err}".replace("\t", " ").replace("\n", " ")

    problems = write_image_lmdb(out_path, item_ids, pixels_of, size, progress, str(image_dir))
    report = out_path.with_name(out_path.name + ".report.tsv")
    with open(report, "w", encoding="utf-8") as fh:
        fh.write("item_id\tproblem\n")
        fh.writelines(f"{item_id}\t{why}\n" for item_id, why in problems)
    if problems:
        log.warning("%d of %d images missing or unreadable, stored as flagged blanks; list in %s",
                    len(problems), len(item_ids), report)
    return {"stored": len(item_ids), "blank": len(problems), "report": str(report), "path": str(out_path)}


_OPEN: dict[tuple[str, int], lmdb.Environment] = {}


def _open_readonly(path: Path) -> lmdb.Environment:
    """One handle per (path, process): LMDB refuses to open a path twice in one process."""
    key = (str(path.resolve()), os.getpid())
    if key not in _OPEN:
        _OPEN[key] = lmdb.open(key[0], readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
    return _OPEN[key]


class ImageStore:
    """Read-only access by item id, from any number of threads.

    One LMDB handle per process (re-opened after a fork: LMDB handles must not cross one). Reads copy
    each record once, straight from the memory map into the caller's array (which may be pinned)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ImageStoreError(f"image LMDB {self.path} does not exist (build it with `iisan build-lmdb`)")
        self._env = None
        self._pid = None
        with self._txn() as txn:
            raw = txn.get(META_KEY)
        if raw is None:
            raise ImageStoreError(f"{self.path} is not an IISAN image LMDB (no {META_KEY.decode()} record)")
        self.meta = json.loads(bytes(raw))
        self.size = int(self.meta["size"])

    @contextmanager
    def _txn(self, buffers: bool = False):
        if self._env is None or self._pid != os.getpid():
            self._env, self._pid = _open_readonly(self.path), os.getpid()
        with self._env.begin(buffers=buffers) as txn:
            yield txn

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
        record = HEADER.size + self.size * self.size * 3
        with self._txn(buffers=True) as txn:
            for i, item_id in enumerate(item_ids):
                value = txn.get(item_id.encode("utf-8")) if item_id else None
                if value is None:  # padding ("") or an item the store lacks: see ``blank_ids``
                    out[i] = 0
                    blank[i] = True
                    continue
                magic, flags, h, w, c = HEADER.unpack_from(value)
                if magic != MAGIC or len(value) != record or (h, w, c) != shape[1:]:
                    raise ImageStoreError(f"{self.path}: image {item_id!r} is not a {shape[1:]} IISAN image record")
                np.copyto(out[i], np.frombuffer(value, dtype=np.uint8, offset=HEADER.size).reshape(h, w, c))
                blank[i] = bool(flags & FLAG_BLANK)
        return out, blank

    def blank_ids(self, item_ids: list[str]) -> tuple[list[str], list[str]]:
        """``(missing, flagged)``: ids (padding "" excluded) with no record, and ids stored as blanks.

        Both are served as zeros. Reads only the record headers (zero-copy), so it is cheap.
        """
        missing, flagged = [], []
        with self._txn(buffers=True) as txn:
            for item_id in item_ids:
                if not item_id:
                    continue
                value = txn.get(item_id.encode("utf-8"))
                if value is None:
                    missing.append(item_id)
                elif HEADER.unpack_from(value)[1] & FLAG_BLANK:
                    flagged.append(item_id)
        return missing, flagged
