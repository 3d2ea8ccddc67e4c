"""``iisan fetch data``: one of the paper's data sets from where its authors published it, in five
resumable steps, each recorded in ``Dataset/<name>/fetch-manifest.json`` with every file's size and
sha256:

1. ``tsv``: the users and items TSVs from the authors' repository at a pinned commit (``sources``),
   checked against the size, sha256 and git blob id known for them;
2. ``archive``: the image archive from Google Drive (through a ``DriveClient``: gdown by default, a
   stand-in in tests), saved as ``Dataset/<archive>.zip``;
3. ``images``: the archive unpacked into ``Dataset/<am_image_xx>/`` (members checked, unpacked beside
   the target and renamed into place);
4. ``lmdb``: the image LMDB (``image_build.build_image_lmdb``), ``Dataset/<name>/images.lmdb``;
5. ``stats``: users, items and interactions after the paper's protocol, against the paper's.

A recorded step is skipped after its files are checked against the manifest (a changed file ends the
run with one line naming it). Files put in place by hand (the TSVs, the zip, the unpacked folder, the
LMDB) are used and recorded as found, never overwritten; the TSVs must still match the authors'.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Protocol

from ..claims import refuse_link
from ..errors import DataError, FetchError, OutputError, UserError
from ..files import disk_failure, failure_reason, remove, require_space, write_failure
from .datasets import LMDB
from .download import Expected, http_download, mismatch
from .image_build import build_image_lmdb
from .interactions import load_dataset, read_items
from .manifest import Manifest, folder_files
from .sources import AUTHORS_COMMIT, AUTHORS_REPO, SOURCES, DataSource

log = logging.getLogger(__name__)

MANIFEST = "fetch-manifest.json"
Downloader = Callable[[str, Path, Expected], Path]


class DriveClient(Protocol):
    def download(self, file_id: str, dest: Path) -> None:
        """Write the whole file to ``dest`` (continuing a partial download where it can) or raise."""


class GdownDrive:
    """Google Drive through gdown (it handles Drive's confirmation page for large files and resumes)."""

    def download(self, file_id: str, dest: Path) -> None:
        import gdown  # deferred: only `iisan fetch` needs it, and it pulls in requests and bs4

        # its bar on a terminal only: gdown draws one into a batch job's log too, a carriage return at a time
        gdown.download(id=file_id, output=str(dest), quiet=not sys.stderr.isatty(), resume=True)


def fetch_tsvs(src: DataSource, root: Path, manifest: Manifest, download: Downloader) -> None:
    files = []
    for repo_file in (src.users, src.items):
        dest = root / repo_file.path
        if dest.is_file():
            problem = mismatch(dest, repo_file.expected)
            if problem:
                raise FetchError(f"{dest} is not the authors' file ({problem}; {AUTHORS_REPO} at "
                                 f"{AUTHORS_COMMIT[:12]}); move it away and run the fetch again")
            log.info("%s is in place and matches the authors' file", dest)
        else:
            log.info("downloading %s", repo_file.url())
            download(repo_file.url(), dest, repo_file.expected)
        files.append(dest)
    manifest.record("tsv", files, repository=AUTHORS_REPO, commit=AUTHORS_COMMIT)


ARCHIVER_JUNK = ("__MACOSX", ".DS_Store")


def unpack_images(archive: Path, target: Path) -> None:
    """Unzip ``archive`` so that ``target`` (not there yet) holds the images. The archive may hold them at its
    top level or in one folder; a member that would land outside the folder is refused, and the ``__MACOSX/``
    and ``.DS_Store`` that macOS's archiver adds at the top level are left out. It unpacks beside ``target``
    into a folder of its own (a link or a file at that name is refused, never written through), once the
    disk is known to hold the members' sizes; a failed unpack leaves nothing behind."""
    tmp = target.with_name(f".{target.name}.unpacking")
    refuse_link(tmp, f"the members of {archive.name}")
    if tmp.exists() and not tmp.is_dir():
        raise FetchError(f"{tmp} is a file where IISAN unpacks {archive.name}: move it away and run the fetch again")
    if os.path.lexists(target):  # (``fetch_images`` uses a folder there as it is)
        raise FetchError(f"{target} is in the way of the images of {archive.name}: move it away and run the fetch "
                         "again")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an interrupted unpack
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            check_members(archive, target, [m.filename for m in members])
            require_space(target.parent, sum(m.file_size for m in members),  # what the members say they hold
                          f"the {len(members)} files of {archive.name}")
            zf.extractall(tmp)  # checks every member's CRC, and its size, as it reads it
        junk = [p for p in tmp.iterdir() if p.name in ARCHIVER_JUNK]  # what macOS's archiver adds
        entries = [p for p in tmp.iterdir() if p not in junk and not p.name.startswith(".")]
        inner = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        for path in junk if inner == tmp else ():  # unpacked here a moment ago: ours to remove
            remove(path)
        os.replace(inner, target)
    except UserError:  # refused above, in one line
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:  # cut short; damaged compressed data
        raise FetchError(f"{archive} is not a complete zip archive ({err}); delete it and run the fetch "
                         "again") from None
    except (NotImplementedError, RuntimeError) as err:  # a compression method zipfile lacks; a password
        raise FetchError(f"{archive} cannot be unpacked here ({err}); unzip it by hand into {target}/ and run the "
                         "fetch again") from None
    except OSError as err:  # a full disk; a member both a file and a folder
        where = f"{err.filename}: " if err.filename else ""
        raise OutputError(f"could not unpack {archive} beside {target}: {where}{failure_reason(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_members(archive: Path, target: Path, names: list[str]) -> None:
    """Refuse a member that would be written outside ``target``; say how many names come twice (zipfile
    keeps the last of each)."""
    for member in names:
        name = PurePosixPath(member)
        if name.is_absolute() or ".." in name.parts:
            raise FetchError(f"{archive}: member {member!r} would be written outside {target}; refusing to unpack it")
    counts = Counter(names)
    if twice := len(names) - len(counts):
        first = next(n for n, count in counts.items() if count > 1)
        log.warning("%s: %d members repeat an earlier one's name (the first: %r); the last of each is unpacked",
                    archive, twice, first)


def shortened(text: str, limit: int = 300) -> str:
    """``text`` in at most ``limit`` characters: its head (the error's type) and its tail (where a
    client's message says the cause: "... Failed to resolve 'drive.google.com'"), cut at spaces, joined by
    " … "; a word longer than its part is cut inside."""
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 3  # a third for the head, two for the tail
    head = text[:keep + 1].rsplit(" ", 1)[0] if " " in text[:keep + 1] else text[:keep]
    tail = text[-2 * keep - 1:].split(" ", 1)[-1] if " " in text[-2 * keep - 1:] else text[-2 * keep:]
    return f"{head.rstrip()} … {tail.lstrip()}"


def fetch_images(src: DataSource, base: Path, manifest: Manifest, drive: DriveClient) -> None:
    target, archive = base / src.images.folder, base / src.images.name
    if target.is_dir():
        log.info("%s is in place (unpacked before); using it as it is", target)
        manifest.record("images", folder_files(target), source="found in place")
        return
    if manifest.done("archive"):
        manifest.verify("archive")
    else:
        if archive.is_file():
            log.info("%s is in place; using it", archive)
        else:
            log.info("downloading %s from Google Drive (%s)", archive.name, src.images.url())
            try:
                drive.download(src.images.drive_id, archive)
            except FetchError:
                raise
            except Exception as err:  # the client's own errors (gdown, requests, OS): one line each
                if disk_failure(err):
                    raise write_failure(archive, err) from None
                reason = shortened(" ".join(f"{type(err).__name__}: {err}".split()))
                raise FetchError(f"cannot download {archive.name} from Google Drive ({src.images.url()}): "
                                 f"{reason}; download it by hand and put it at {archive} (or unzip it into "
                                 f"{target}/), then run the fetch again") from None
            if not archive.is_file():
                raise FetchError(f"the Drive client reported success but {archive} does not exist")
    log.info("unpacking %s into %s", archive, target)
    unpack_images(archive, target)
    if not manifest.done("archive"):  # recorded once it unpacks: a broken archive is fetched again
        manifest.record("archive", [archive], drive_id=src.images.drive_id, url=src.images.url())
    manifest.record("images", folder_files(target), source=str(archive.name))


def build_lmdb(src: DataSource, base: Path, manifest: Manifest) -> None:
    folder = base / src.folder
    lmdb_path, items = folder / LMDB, folder / PurePosixPath(src.items.path).name
    report = lmdb_path.with_name(lmdb_path.name + ".report.tsv")
    if lmdb_path.is_dir():
        log.info("%s is in place; using it as it is (delete it to rebuild it)", lmdb_path)
        found = "found in place"
    else:
        ids = read_items(items, allow_empty_titles=True).ids
        result = build_image_lmdb(base / src.images.folder, lmdb_path, ids)
        found = f"built: {result['stored']:,} images, {result['blank']:,} missing or unreadable"
    manifest.record("lmdb", folder_files(lmdb_path) + ([report] if report.is_file() else []), source=found)


def paper_stats(name: str, src: DataSource, root: Path) -> dict:
    """The data set's size after the paper's protocol, refused unless it is the paper's data set's."""
    found = load_dataset(root / src.users.path, root / src.items.path).stats()
    want = dict(zip(("users", "items", "interactions"), src.stats))
    if found != want:
        raise DataError(f"{name}: {found['users']:,} users / {found['items']:,} items / "
                        f"{found['interactions']:,} interactions after the paper's protocol; the paper's "
                        f"data set has {want['users']:,} / {want['items']:,} / {want['interactions']:,}")
    return found


def check_stats(name: str, src: DataSource, root: Path, manifest: Manifest) -> dict:
    found = paper_stats(name, src, root)
    manifest.record("stats", [], **found)
    return found


def fetch_dataset(name: str, root: str | Path, drive: DriveClient | None = None,
                  download: Downloader = http_download, sources: dict[str, DataSource] = SOURCES) -> dict:
    """Fetch (or check) one data set under ``root/Dataset``; returns its statistics. ``sources``: where
    data sets come from (``sources.SOURCES``; tests serve small ones)."""
    if name not in sources:
        raise FetchError(f"--dataset {name}: not one of {', '.join(sources)} (or all)")
    root, src = Path(root), sources[name]
    base = root / "Dataset"
    manifest = Manifest(base / src.folder / MANIFEST, root, f"`iisan fetch data --dataset {name}`")
    drive = drive or GdownDrive()
    archive = base / src.images.name
    runners = {"tsv": lambda: fetch_tsvs(src, root, manifest, download),
               "archive": lambda: fetch_images(src, base, manifest, drive),
               "images": lambda: fetch_images(src, base, manifest, drive),
               "lmdb": lambda: build_lmdb(src, base, manifest),
               "stats": lambda: check_stats(name, src, root, manifest)}
    made: set[str] = set()  # steps done by this run (not checked again)
    for step, run in runners.items():
        if step in made:
            continue
        if step == "archive" and manifest.done("images") and not (manifest.done(step) and archive.is_file()):
            log.info("%s: %s is not needed (the images are unpacked)", name, archive.name)
        elif manifest.done(step):
            checked = manifest.verify(step)
            log.info("%s: step %s was done before%s", name, step,
                     f"; its {checked:,} file(s) are unchanged" if checked else " (it wrote no file)")
        else:
            before = set(manifest.data["steps"])
            run()
            made |= set(manifest.data["steps"]) - before
    log.info("%s: complete; manifest %s", name, manifest.path)
    return {k: manifest.info("stats")[k] for k in ("users", "items", "interactions")}
