"""Building the image LMDB (``images`` holds the record format and the reader).

A store is built beside its target under a fresh hidden name and renamed into place when complete, by
one process at a time (a lock beside the target). The target is replaced only when it is an image LMDB
this project wrote and ``overwrite`` is set, never when it is, or contains, an input; anything else at
that path is refused, so a mistyped ``--out`` never deletes a folder. Missing, unreadable or corrupt images,
and those over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``: gigabytes to decode, a damaged or
hostile file), are stored as flagged blanks (zeros), counted and listed in a report file; the machine's own
failures (memory, file descriptors, I/O errors) stop the build instead, to be run again.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path

import lmdb
import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..bounds import PIXELS, not_utf8
from ..claims import claim_output, refuse_inputs
from ..console import progress_bar
from ..errors import ConfigError, DataError, ImageStoreError, OutputError, machine_failure
from ..files import (
    atomic_path,
    put_back_on_failure,
    remove,
    require_space,
    stale_temporaries,
    usual_permissions,
    write_failure,
    write_text_atomic,
)
from ..locks import OutputLock
from .image_inputs import contents_digest, contents_head, contents_line, inputs_digest, kept_store, refuse_no_pictures
from .images import (
    FORMAT,
    HEADER,
    IMAGE_SIZE,
    MAX_SIZE,
    META_KEY,
    close_reader,
    encode_record,
    own_meta,
    records_digest,
    stored_bytes,
)
from .textfile import check_item_id

log = logging.getLogger(__name__)

REPORT_HEADER = "item_id\tproblem\n"
LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})  # all an image LMDB folder holds (the report is beside it)


def check_size(size: int) -> None:
    if not 1 <= size <= MAX_SIZE:
        raise ConfigError(f"--size {size}: stored images are size x size pixels, with size from 1 to {MAX_SIZE}")


def build_lock(out_path: Path) -> OutputLock:
    """The lock beside ``out_path`` that a build holds: one at a time, and no store kept while one runs."""
    return OutputLock(out_path.with_name(f".{out_path.name}.iisan-lock"), f"image LMDB {out_path}",
                      "another build is writing it; wait for it to finish")


def is_image_lmdb(path: Path) -> bool:
    """Whether ``path`` is an image LMDB this project wrote (an LMDB with its metadata record)."""
    return own_meta(path) is not None


def refuse_foreign_files(path: Path) -> None:
    """Replacing an image LMDB swaps its whole folder: refuse when it holds anything a build did not write
    there (a user's notes), which the swap would delete."""
    foreign = sorted(p.name for p in path.iterdir() if p.name not in LMDB_FILES or not p.is_file() or p.is_symlink())
    if foreign:
        shown_names = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"--out {path} holds files IISAN did not write ({shown_names}); move them away to "
                          "replace it")


class TooLarge(Exception):
    """An image over PIL's pixel limit, refused before it is decoded."""


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # one channel of more than 8 bits
# What ``displayed`` may change, as the build's log counts it.
CHANGES = {"rotated": "turned upright by their EXIF orientation", "transparent": "with transparent areas put on "
           "white", "scaled": "of 16-bit or float grey values scaled to 8 bits"}


def load_image(path: Path, size: int = IMAGE_SIZE, pixels: str = "displayed") -> tuple[np.ndarray, str]:
    """RGB, squashed to size x size with bilinear resampling (authors' ``Resize((224, 224))``), and what
    ``displayed`` changed ('' for nothing: a JPEG without an orientation tag, as the paper's data). An image
    over PIL's pixel limit raises ``TooLarge`` (PIL would warn and decode it, or fail at twice the limit).

    ``pixels``: 'displayed', the picture as a viewer shows it (``displayed``); 'authors', PIL's
    ``convert('RGB')`` alone, as their build_lmdb.py: no EXIF rotation, transparent areas in whatever colour
    lies under them, 16-bit and float grey values clipped at 255."""
    with warnings.catch_warnings():  # PIL warns over the limit (checked below) and raises over twice it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as err:  # over twice the limit: PIL says its size, not its sides
            count = re.search(r"\((\d+) pixels\)", str(err))
            said = " ".join(str(err).split(",")[0].split())
            raise TooLarge(f"{int(count.group(1)):,} pixels, over PIL's decompression-bomb limit of "
                           f"{Image.MAX_IMAGE_PIXELS:,}" if count else said) from None
    with img:
        width, height = img.size
        if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise TooLarge(f"{width} x {height} pixels, over PIL's decompression-bomb limit of "
                           f"{Image.MAX_IMAGE_PIXELS:,}")
        changed = ""
        if pixels == "displayed":
            img, changed = displayed(img)
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8), changed


def displayed(img: Image.Image) -> tuple[Image.Image, str]:
    """``img`` as a viewer shows it, and what that changed: turned upright by its EXIF orientation,
    transparent areas on white (a shop's page: an alpha channel, or a palette's or colour key's transparent
    colour), one channel of more than 8 bits scaled to 0..255: integers from 0..65535 (16 bits), floats
    from 0..1 (else from their own lowest to highest value)."""
    changed = []
    if img.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1):
        img = ImageOps.exif_transpose(img)
        changed.append("rotated")
    if img.mode in WIDE_MODES:
        values = np.asarray(img, dtype=np.float64)
        low, high = 0.0, 65535.0  # integers: the file's 16 bits, whatever this picture's brightest pixel
        if img.mode == "F" and values.size:  # floats: 0..1 by convention, else stretched over their own range
            low, high = float(values.min()), float(values.max())
            low, high = (0.0, 1.0) if low >= 0 and high <= 1 else (low, high)
        scaled = (values - low) * (255 / max(high - low, 1e-12))
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
        changed.append("scaled")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # an alpha channel, or a colour key
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            changed.append("transparent")
    return img, ",".join(changed)


def _fill(path: Path, item_ids: list[str], pixels_of, size: int, progress: bool, source: str,
          recorded: dict | None = None) -> list:
    record = HEADER.size + size * size * 3
    map_size = int(len(item_ids) * (record + 512) * 1.2) + (64 << 20)
    problems: list[tuple[str, str]] = []
    env = lmdb.open(str(path), map_size=map_size, subdir=True, lock=False, readahead=False, meminit=False)
    try:
        txn = env.begin(write=True)
        # a bar on a terminal; where none shows (a batch log, a pipe) a line at most every 30 s
        for n, item_id in enumerate(progress_bar(item_ids, len(item_ids), desc="images", unit="images",
                                                 enabled=progress, closing=True), 1):
            pixels, problem = pixels_of(item_id)
            if problem:
                problems.append((item_id, problem))
                pixels = np.zeros((size, size, 3), dtype=np.uint8)
            txn.put(item_id.encode("utf-8"), encode_record(pixels, blank=problem is not None))
            if n % 2000 == 0:
                txn.commit()
                txn = env.begin(write=True)
        meta = {"format": FORMAT, "count": len(item_ids), "size": size, "blank": len(problems), "source": source,
                **{k: v() if callable(v) else v for k, v in (recorded or {}).items()}, "digest": records_digest(txn)}
        txn.put(META_KEY, json.dumps(meta).encode())
        txn.commit()
    finally:
        env.close()
    return problems


def write_image_lmdb(out_path: str | Path, item_ids: list[str], pixels_of, size: int = IMAGE_SIZE,
                     progress: bool = True, source: str = "", overwrite: bool = False,
                     inputs: tuple = (), recorded: dict | None = None,
                     report: Callable[[list], None] | None = None,
                     kept: tuple[Path, ...] = ()) -> list[tuple[str, str]]:
    """Write one record per id, ``pixels_of(item_id) -> (uint8 (size, size, 3), problem or None)``; a
    record with a problem is stored as a flagged blank. Built beside the target and renamed into place;
    an existing target must be an image LMDB and ``overwrite`` set (module docstring). ``recorded``: more
    metadata fields (``pixels``; a callable's value is taken once all are written); ``report(problems)`` writes
    their list before the store is renamed into place (a store in place always has its report), to ``kept``: put back
    as it was if the build fails, its killed writers' temporaries removed. Returns the (item_id, problem) list."""
    out_path = Path(out_path)
    check_size(size)
    if (spelt := not_utf8(str(out_path))) is not None:  # lmdb.open would fail on it, after all the work before
        raise OutputError(f"image LMDB {spelt} is not valid UTF-8, which LMDB cannot open: "
                          "rename it, or give another")
    refuse_inputs(out_path, inputs, "--out")
    with build_lock(out_path):
        if claim_output(out_path, is_image_lmdb, "an IISAN image LMDB", "--out", overwrite):
            refuse_foreign_files(out_path)
        for stale in [t for path in (out_path, *kept) for t in stale_temporaries(path)]:  # killed builds' (locked)
            remove(stale)
        require_space(out_path, len(item_ids) * stored_bytes(HEADER.size + size * size * 3) + (1 << 16),  # (+ its meta)
                      f"{len(item_ids):,} images of {size}x{size} pixels")
        try:
            with put_back_on_failure(*kept), atomic_path(out_path) as tmp:  # an old store back if the rename fails
                problems = _fill(tmp, item_ids, pixels_of, size, progress, source, recorded)
                usual_permissions(tmp, *tmp.iterdir())
                if report is not None:
                    report(problems)
                close_reader(out_path)  # a reader of the old store in this process must not keep the old files
        except lmdb.Error as err:  # OSError: atomic_path's one line already
            raise write_failure(out_path, err) from None
    return problems


def build_image_lmdb(image_dir: str | Path, out_path: str | Path, item_ids: list[str] | None = None,
                     size: int = IMAGE_SIZE, extension: str = ".jpg", progress: bool = True,
                     overwrite: bool = False, inputs: tuple | list = (), pixels: str = "displayed") -> dict:
    """Build ``out_path`` from ``image_dir/<item_id><extension>``, each picture as ``load_image`` reads it
    (``pixels``; how many it turned upright, put on white or scaled is logged).

    ``item_ids`` defaults to every ``*<extension>`` in the folder (files whose names are not valid
    item ids are skipped, counted and logged). Returns counts; the list of bad items goes to
    ``<out_path>.report.tsv``. A store built from these very inputs is kept, unless ``overwrite`` (counts and
    ``kept``: ``image_inputs``). ``inputs``: other input paths (the items file) the output must not be."""
    image_dir, out_path = Path(image_dir), Path(out_path)
    check_size(size)
    if not extension.startswith(".") or "/" in extension or "\\" in extension:
        raise ConfigError(f"--extension {extension!r} must be a file extension such as .jpg")
    if image_dir.exists() and not image_dir.is_dir():
        raise ImageStoreError(f"--images {image_dir} is a file; expected a folder of <item_id>{extension} images")
    if not image_dir.is_dir():
        raise ImageStoreError(f"image folder {image_dir} does not exist")
    report = out_path.with_name(out_path.name + ".report.tsv")
    refuse_inputs(report, [image_dir, *inputs], "--out")
    claim_output(report, _is_report, "a build report of IISAN", "--out", overwrite=True)
    listed, item_ids = item_ids is not None, _listed_ids(image_dir, extension) if item_ids is None else item_ids
    for item_id in item_ids:
        check_item_id(item_id, f"item list for {image_dir}")
    if not item_ids:
        raise ImageStoreError(f"no images to store: {image_dir} has no *{extension} files and no item list")

    others = functools.cache(lambda: _other_extensions(image_dir, extension))  # listed once, if a picture is missing
    if listed:
        refuse_no_pictures(image_dir, item_ids, extension, others)

    if pixels not in PIXELS:
        raise ConfigError(f"--pixels {pixels!r} is not one of {', '.join(PIXELS)}")
    digest = inputs_digest(image_dir, item_ids, extension, size, pixels)
    settings = {"size": size, "pixels": pixels, "extension": extension}
    contents = functools.partial(contents_digest, image_dir, item_ids, extension, size, pixels)  # (read if asked)
    if not overwrite and (kept := kept_store(out_path, report, digest, settings, build_lock(out_path), contents)):
        return kept  # built from these very inputs (``image_inputs``)
    changes: collections.Counter = collections.Counter()
    read = contents_head(size, pixels, extension)  # the pictures' bytes as the build reads them, in item order

    def pixels_of(item_id: str):
        path, data = image_dir / f"{item_id}{extension}", None
        if not path.is_file():
            read.update(contents_line(item_id, None))
            found = others().get(item_id)
            why = "a folder" if path.is_dir() else "missing"
            if found:
                return None, f"{why} (but {item_id}{found} is there: --extension {found})"
            if spelt := next((f for form in ("NFC", "NFD") if (f := unicodedata.normalize(form, path.name)) != path.name
                              and (image_dir / f).is_file()), None):  # macOS writes names decomposed (NFD)
                return None, f"{why} (but {spelt!r} is there: the same name in another Unicode normal form; rename it)"
            return None, why
        try:
            data = path.read_bytes()  # (then decoded from the page cache: the disk is read once)
            array, changed = load_image(path, size, pixels)
            changes.update(filter(None, changed.split(",")))
            return array, None
        except TooLarge as err:
            return None, f"too large: {err}"
        except Exception as err:  # a decoder's failure is a bad image; the machine's stop the build
            if stop := machine_failure(err, path):  # memory, file descriptors, a disk's I/O: a rerun reads it
                raise stop from None
            return None, f"unreadable: {type(err).__name__}: {err}".replace("\t", " ").replace("\n", " ")
        finally:
            read.update(contents_line(item_id, data))

    def write_report(problems: list[tuple[str, str]]) -> None:
        write_text_atomic(report, REPORT_HEADER + "".join(f"{item_id}\t{why}\n" for item_id, why in problems))

    problems = write_image_lmdb(out_path, item_ids, pixels_of, size, progress, str(image_dir), overwrite,
                                (image_dir, *inputs), report=write_report, kept=(report,),
                                recorded={"pixels": pixels, "extension": extension, "inputs": digest,
                                          "contents": lambda: read.hexdigest()})  # (once every picture is read)
    if changes:
        log.info("stored as a viewer shows them: %s (--pixels authors: as the authors' build_lmdb.py read them)",
                 ", ".join(f"{n} {CHANGES[kind]}" for kind, n in sorted(changes.items())))
    if problems:
        elsewhere = sum(item_id in others() for item_id, _ in problems)
        hint = f" ({elsewhere} of them are there with another extension: see --extension)" if elsewhere else ""
        log.warning("%d of %d images missing or unreadable, stored as flagged blanks%s; list in %s",
                    len(problems), len(item_ids), hint, report)
    return {"stored": len(item_ids), "blank": len(problems), "report": str(report), "path": str(out_path)}


def _other_extensions(image_dir: Path, extension: str) -> dict[str, str]:
    """Item id -> the extension of a file ``<id>.<other>`` in the folder, for ids without ``<id><extension>``:
    what a report of missing images can point at (one listing of the folder)."""
    found = {}
    for p in image_dir.iterdir():
        stem, dot, suffix = p.name.rpartition(".")
        if dot and stem and f".{suffix}" != extension:
            found.setdefault(stem, f".{suffix}")
    return found


UNREAD_KINDS = {"folder": "subfolder(s)", "link": "broken link(s)", "other": "special file(s)"}  # (not plain files)


def _listed_ids(image_dir: Path, extension: str) -> list[str]:
    """Item ids of the folder's ``*<extension>`` files; names that are not valid ids are skipped, counted."""
    ids, skipped = [], []
    paths = list(image_dir.iterdir())
    files = {p.name: p.is_file() for p in paths}  # one listing; a stat a name (more for what is no file)
    kinds = {p.name: "folder" if p.is_dir() else "link" if not p.exists() else "other"
             for p in paths if not files[p.name]}
    unread = collections.Counter(Path(name).suffix or "no extension" if is_file else kinds[name]
                                 for name, is_file in files.items()
                                 if not (is_file and name.endswith(extension)) and not name.startswith("."))
    if unread:  # a camera's .JPG beside .jpg, a subfolder: not read, and said so (an item without one is a blank)
        log.warning("%s: not read: %s (only *%s files are: --extension)", image_dir,
                    ", ".join(f"{n} {UNREAD_KINDS.get(kind, kind + ' file(s)')}" for kind, n in sorted(unread.items())),
                    extension)
    for name in sorted(n[: -len(extension)] for n, is_file in files.items() if is_file and n.endswith(extension)):
        try:
            check_item_id(name, str(image_dir))
        except DataError:
            skipped.append(name)
            continue
        ids.append(name)
    if skipped:
        log.warning("%s: skipped %d files whose names are not valid item ids (e.g. %r%s)", image_dir, len(skipped),
                    skipped[0] + extension, "; item ids hold no whitespace, '/', '\\' or control characters")
    return ids


def _is_report(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline() == REPORT_HEADER
    except (OSError, UnicodeDecodeError):
        return False
