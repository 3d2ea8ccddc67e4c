"""What a fetch made, step by step: every file's size and sha256, so that a second run can skip a
finished step after checking that nothing it made has changed since.

A manifest is one JSON file, ``{"format", "steps": {step: {"files": {relative path: {"size",
"sha256"}}, ...facts}}}``, rewritten atomically after each step. A step is done when it is recorded;
``verify`` then checks its files and ends with one line naming the first file that differs (and how
many do), never silently redoing a step over files someone changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FetchError
from ..files import sha256, write_json_atomic
from .download import digests

FORMAT = "iisan-fetch-manifest/1"


def file_record(path: str | Path) -> dict:
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, so that a folder is recorded file by file."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


class Manifest:
    """The manifest at ``path``; file names in it are relative to ``root``."""

    def __init__(self, path: str | Path, root: str | Path, rerun: str = ""):
        self.path, self.root, self.rerun = Path(path), Path(root), rerun
        self.data: dict = {"format": FORMAT, "steps": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise FetchError(f"{self.path} is not a readable manifest ({type(err).__name__}); "
                                 f"move it away and run {rerun or 'the fetch'} again") from None
            if self.data.get("format") != FORMAT:
                raise FetchError(f"{self.path} is not an IISAN fetch manifest (format "
                                 f"{self.data.get('format')!r}, expected {FORMAT})")

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def info(self, step: str) -> dict:
        return self.data["steps"][step]

    def record(self, step: str, files: list[Path], **facts) -> None:
        """Record ``step`` as done, with the size and sha256 of ``files`` (paths under ``root``)."""
        records = {p.relative_to(self.root).as_posix(): file_record(p) for p in files}
        self.data["steps"][step] = {**facts, "files": records}
        write_json_atomic(self.path, self.data)

    def verify(self, step: str) -> int:
        """Check every file of a recorded step; returns how many were checked."""
        files = self.info(step)["files"]
        problems = []
        for name, want in files.items():
            path = self.root / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif (size := path.stat().st_size) != want["size"]:
                problems.append(f"{path} has {size:,} bytes, the manifest says {want['size']:,}")
            elif (found := sha256(path)) != want["sha256"]:
                problems.append("{} has sha256 {}, the manifest says {}".format(path, *digests(found, want["sha256"])))
        if problems:
            more = f" (and {len(problems) - 1} more files of step {step!r})" if len(problems) > 1 else ""
            rerun = self.rerun or "the fetch"
            advice = f"restore it, or delete the manifest and run {rerun} again" if "is missing" in problems[0] \
                else f"restore it, or delete it and run {rerun} again"
            raise FetchError(f"{problems[0]}{more}: it changed since it was fetched (manifest {self.path}); {advice}")
        return len(files)
