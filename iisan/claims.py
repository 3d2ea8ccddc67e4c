"""What an output may be, before it is written: never one of the command's inputs, never a link, a file or a
folder of someone else's. An output path that exists is replaced only when it is this project's own artifact
and the user asked for it (``--overwrite``, ``claim_output``); a folder this project fills by name is made
with a marker in it (``claim_folder``). How the outputs are then written: ``files``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import OutputError
from .files import only_temporaries_of, write_text_atomic


def refuse_inputs(output: str | Path, inputs: Iterable[str | Path | None], flag: str) -> None:
    """An ``OutputError`` when ``output`` is, or contains, one of ``inputs`` (empty ones are skipped)."""
    out = Path(output).expanduser().resolve()
    for given in inputs:
        if not given:
            continue
        source = Path(given).expanduser().resolve()
        if source == out or out in source.parents:
            relation = "is" if source == out else "contains"
            raise OutputError(f"{flag} {output} {relation} the input {given}; write the output somewhere else")


def refuse_inside_inputs(output: str | Path, inputs: Iterable[str | Path | None], flag: str) -> None:
    """An ``OutputError`` when the folder ``output`` is, or is inside, one of ``inputs`` (an encoder's
    folder, whose weights digest covers every file in it; the images LMDB; a data file)."""
    here = Path(output).expanduser().resolve()
    for given in filter(None, inputs):
        source = Path(given).expanduser().resolve()
        if here.is_relative_to(source):
            where = "the" if here == source else "inside the"
            raise OutputError(f"{flag} {output} is {where} input {given}; writing there would change that input: "
                              "choose a folder of its own")


def claim_output(path: str | Path, owned: Callable[[Path], bool], what: str, flag: str, overwrite: bool) -> bool:
    """Whether ``path`` exists and may be replaced. It may when it is this project's own ``what``
    (``owned(path)``) and ``overwrite`` is set; anything else that exists is refused with one line."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    if path.is_symlink():
        raise OutputError(f"{flag} {path} is a symbolic link; give the path it points to")
    if not owned(path):
        raise OutputError(f"{flag} {path} exists and is not {what}; IISAN replaces only what it wrote itself, "
                          "so choose another path or move that one away")
    if not overwrite:
        raise OutputError(f"{flag} {path} already holds {what}; pass --overwrite to replace it")
    return True


def claim_folder(path: str | Path, marker: str, what: str, flag: str) -> Path:
    """A folder this project fills with files of fixed names (the demo's, a tiny model's). It is made with
    the ``marker`` file in it, or reused when it holds that marker or is empty (but for the marker's temporary,
    left by a writer that died before renaming it); a file or a folder of other things is refused with one line,
    so that nothing of someone else's is overwritten. A link to a folder is that folder, as a run folder's is;
    a link to anything else is refused."""
    path = Path(path)
    if path.is_symlink() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a symbolic link to no folder; give the path of a folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, expected a folder")
    if path.is_dir() and not (path / marker).is_file() and not only_temporaries_of(path, marker):
        raise OutputError(f"{flag} {path} exists and is not {what} (no {marker} in it); IISAN writes only into "
                          "empty folders or folders it made, so choose another path or move that one away")
    path.mkdir(parents=True, exist_ok=True)
    if not (path / marker).is_file():
        write_text_atomic(path / marker, f"{what}, written by IISAN; it may replace the files it wrote here\n")
    return path


def nearest_existing(path: str | Path) -> Path | None:
    """``path``, or the nearest folder above it, that exists (a link to nothing counts): what making ``path``
    as a folder would meet first."""
    return next((part for part in (Path(path), *Path(path).parents) if os.path.lexists(part)), None)


def refuse_broken_link(path: str | Path, what: str) -> None:
    """An ``OutputError`` when the folder ``path`` to write into, or the nearest part of its path that exists, is a
    symbolic link to nothing (the OS would say 'File exists' when making the folder). ``what``: ``--out-dir``."""
    part = nearest_existing(path)
    if part is not None and part.is_symlink() and not part.exists():
        where = "is" if part == Path(path) else f"is inside {part},"
        raise OutputError(f"{what} {path} {where} a symbolic link to no folder; give the path of a folder")


def expect_folders(**folders: Path | None) -> None:
    """An ``OutputError`` naming the flag (``--<key>``) when a folder to write into, or the nearest part of
    its path that exists, is a file or a link to nothing: said before any work, not as a failed write after it."""
    for key, path in folders.items():
        if path is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        refuse_broken_link(path, flag)
        if (part := nearest_existing(path)) is not None and not part.is_dir():
            what = "is a file" if part == Path(path) else f"is inside the file {part}"
            raise OutputError(f"{flag} {path} {what}; expected a folder")


def refuse_link(path: str | Path, what: str) -> None:
    """Refuse a symbolic link at ``path``, where IISAN opens ``what`` of its own to append or write in place:
    it would write through the link into whatever file or folder it names."""
    if Path(path).is_symlink():
        raise OutputError(f"{path} is a symbolic link where IISAN writes {what}; it would write through it: move "
                          "it away")
