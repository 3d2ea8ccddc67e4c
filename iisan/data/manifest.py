"""What a fetch made, step by step: every file's size and sha256, so that a second run can skip a
finished step after checking that nothing it made has changed since.

A manifest is one JSON file, ``{"format", "steps": {step: {"files": {relative path: {"size",
"sha256"}}, ...facts}}}``, rewritten atomically after each step. A step is done when it is recorded;
``verify`` then checks its files and ends with one line naming the first file that differs (and how
many do), never silently redoing a step over files someone changed. A manifest read from disk is checked
whole first (``damage``): one of another shape is refused in one line, never a traceback, and left where
it is (it may be the user's).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from ..digests import sha256
from ..errors import FetchError, parse_json
from ..files import write_json_atomic
from .download import digests

FORMAT = "iisan-fetch-manifest/1"
# the facts of a step that a later run reads (experiments/encoders.py, fetch.py), with their types
FACTS = {"download": {"repo_id": str, "revision": str},
         "stats": {"users": int, "items": int, "interactions": int}}


def file_record(path: str | Path) -> dict:
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, so that a folder is recorded file by file."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def is_record(record: object) -> bool:
    return isinstance(record, dict) and type(record.get("size")) is int and record["size"] >= 0 \
        and isinstance(record.get("sha256"), str)


def damage(data: dict) -> str | None:
    """What makes ``data`` (an object with our format) other than a manifest this module wrote, or None:
    every step an object with a ``files`` object of relative path -> {size, sha256}, and the facts that a
    later run reads (``FACTS``) of their types."""
    steps = data.get("steps")
    if not isinstance(steps, dict):
        return "no 'steps' object"
    for step, info in steps.items():
        if not isinstance(info, dict):
            return f"step {step!r} is not an object"
        if not isinstance(files := info.get("files"), dict):
            return f"step {step!r} has no 'files' object"
        for name, record in files.items():
            parts = PurePosixPath(name).parts
            if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
                return f"step {step!r} names {name!r}, not a path inside the folder it records"
            if not is_record(record):
                return f"step {step!r} records {name!r} without an integer size and a sha256 string"
        for fact, kind in FACTS.get(step, {}).items():
            if type(info.get(fact)) is not kind:
                return f"step {step!r} has no {fact} ({'an integer' if kind is int else 'a string'})"
    return None


class Manifest:
    """The manifest at ``path``; file names in it are relative to ``root``. ``rerun``: the command that
    fetches again; ``holder``: what to move away for it when the manifest is damaged (the manifest itself
    unless a folder's files are only usable with it)."""

    def __init__(self, path: str | Path, root: str | Path, rerun: str = "", holder: str | Path | None = None):
        self.path, self.root, self.rerun = Path(path), Path(root), rerun
        self.holder = Path(holder) if holder is not None else None
        self.data: dict = {"format": FORMAT, "steps": {}}
        if self.path.is_file():
            try:
                self.data = parse_json(self.path.read_text(encoding="utf-8"))
            except ValueError as err:  # not JSON or not UTF-8, a 4300-digit integer, nesting
                raise self.damaged(f"not a readable manifest ({type(err).__name__})") from None
            if not isinstance(self.data, dict):
                raise self.damaged("damaged (not a JSON object)")
            if self.data.get("format") != FORMAT:
                raise self.damaged(f"not an IISAN fetch manifest (format {self.data.get('format')!r}, "
                                   f"expected {FORMAT})")
            if problem := damage(self.data):
                raise self.damaged(f"damaged ({problem})")

    def damaged(self, what: str) -> FetchError:
        """One line: the manifest is ``what``, and how to fetch again (the manifest is left in place)."""
        holder = "it" if self.holder is None else str(self.holder)
        return FetchError(f"{self.path} is {what}; move {holder} away and run {self.rerun or 'the fetch'} again")

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def info(self, step: str) -> dict:
        if step not in self.data["steps"]:  # a run reads only a step it expects recorded
            raise self.damaged(f"damaged (no step {step!r})")
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
