"""What an image LMDB is built from: an item list none of whose items has a picture is refused; and what it was
built from, so that ``iisan build-lmdb`` run again on the same inputs keeps the store it built, as make would,
where it refused without --overwrite (a script that prepares its data, then trains, stopped at its second run).
The inputs are a digest, kept in the store's metadata (``inputs``), of the picture size, how pictures are read
and their extension, the item ids in order, and each picture file's size and modification time: a picture
rewritten with the same size and time is not seen (--overwrite builds again). A second digest (``contents``) holds
the pictures' bytes: a store whose pictures were copied with new times (``cp -r``, which keeps none) is kept when
their bytes are the same, read to tell."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Callable
from pathlib import Path

from ..digests import stat_digest
from ..errors import ImageStoreError, OutputError
from ..locks import OutputLock
from .images import own_meta


def inputs_digest(image_dir: Path, item_ids: list[str], extension: str, size: int, pixels: str) -> str:
    """The sha256 of what a build of ``item_ids``' pictures in ``image_dir`` reads, as the module docstring says (a
    missing picture is stored as a blank)."""
    return stat_digest([size, pixels, extension], ((i, image_dir / f"{i}{extension}") for i in item_ids))


def contents_digest(image_dir: Path, item_ids: list[str], extension: str, size: int, pixels: str) -> str:
    """As ``inputs_digest``, of each picture's bytes (a sha256 each) for its size and time: what a build that read
    them, in this order, fed to ``contents_head`` with ``contents_line``."""
    digest = contents_head(size, pixels, extension)
    for item_id in item_ids:
        path = image_dir / f"{item_id}{extension}"
        try:
            data = path.read_bytes() if path.is_file() else None  # (not a pipe's, which would wait)
        except (OSError, ValueError):  # unreadable, or a name the system refuses
            data = None
        digest.update(contents_line(item_id, data))
    return digest.hexdigest()


def contents_head(size: int, pixels: str, extension: str):
    """The sha256 that ``contents_line`` of each item, in order, completes into ``contents_digest``."""
    return hashlib.sha256(json.dumps([size, pixels, extension]).encode())


def contents_line(item_id: str, data: bytes | None) -> bytes:
    """An item's line of ``contents_digest``: its picture's sha256, or "-" without one (stored as a blank)."""
    seen = "-" if data is None else hashlib.sha256(data).hexdigest()
    return f"{item_id}\t{seen}\n".encode("utf-8", "surrogateescape")


def kept_store(out_path: Path, report: Path, digest: str, settings: dict, lock: OutputLock,
               contents: Callable[[], str]) -> dict | None:
    """The counts of the image LMDB at ``out_path`` (as ``image_build.build_image_lmdb`` returns them, and
    ``kept``) when it was built from inputs of ``digest`` and its report is beside it. None when ``out_path`` is
    no store of this project's (the build says what it is); one built otherwise is refused, saying how: with other
    ``settings`` (``size``, ``pixels``, ``extension``; where its metadata records them), or from other inputs. Read
    under the build's ``lock``: a build running now would replace it. ``contents()``: the pictures'
    ``contents_digest``, read only where the settings are the same and the pictures' sizes or times are not."""
    if not os.path.lexists(out_path):  # (nothing there: no lock taken, no folder made for one)
        return None
    with lock:
        meta = own_meta(out_path)
    if meta is None:  # (a link, another tool's, damaged: the build says what it is)
        return None
    then = {**settings, "pixels": "authors", **{k: meta[k] for k in settings if k in meta}}  # (formats.md)
    differ = [k for k in settings if then[k] != settings[k]]
    whole = report.is_file() and all(type(meta.get(k)) is int for k in ("count", "blank"))
    if not differ and whole and (meta.get("inputs") == digest or "contents" in meta and meta["contents"] == contents()):
        return {"stored": meta["count"], "blank": meta["blank"], "report": str(report), "path": str(out_path),
                "kept": True}
    was, now = ", ".join(f"--{k} {then[k]}" for k in differ), ", ".join(str(settings[k]) for k in differ)
    if "inputs" not in meta:  # whatever the settings, nothing tells whether its pictures are these: --overwrite
        how = "by a version that did not record its pictures" + (f" (with {was}; {now} now)" if differ else "")
    elif differ:
        how = f"with {was} ({now} now)"
    elif not report.is_file():
        how = f"and its report {report.name} is missing"
    else:
        how = "from other pictures or items" + ("" if "contents" in meta else " (or its pictures changed since: their "
                                                  "sizes or modification times, as a copy without cp -p changes them)")
    raise OutputError(f"--out {out_path} already holds an IISAN image LMDB built {how}; pass --overwrite to replace it")


def refuse_no_pictures(image_dir: Path, item_ids: list[str], extension: str, others) -> None:
    """An item list of which no item has a picture in ``image_dir`` is the wrong list or the wrong folder:
    refused before an LMDB of blanks alone is written (``others()``: ``_other_extensions``)."""
    names = {unicodedata.normalize("NFC", p.name) for p in image_dir.iterdir()}  # macOS writes NFD names
    if any(unicodedata.normalize("NFC", f"{i}{extension}") in names for i in item_ids):
        return
    elsewhere = sum(i in others() for i in item_ids)
    hint = f" ({elsewhere} are there with another extension: see --extension)" if elsewhere else ""
    raise ImageStoreError(f"none of the {len(item_ids)} items listed has a picture {image_dir}/<item_id>{extension}"
                          f"{hint}: is --images the folder of their pictures, and --items their items file?")
