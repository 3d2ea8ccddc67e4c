"""Writing a run's checkpoints (the layout: ``checkpoint``): each into a hidden temporary folder renamed into
place once complete, then pruning the older ones. Nothing is removed that is not a checkpoint of this run: a
refused one is left in place or, when its name is needed again, set aside under another name, and a checkpoint
folder holding anything else is left whole."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..digests import sha256
from ..errors import CheckpointError
from ..files import WRITE_ERRORS, failure_reason, fsync, json_text, usual_permissions
from .checkpoint import (
    FILES,
    FORMAT,
    MANIFEST,
    MODEL,
    NAME,
    NEW_RUN,
    STATE,
    TRAIN_STATE,
    checked_state,
    checkpoint_order,
    checkpoints,
)

log = logging.getLogger(__name__)

# The checkpoints of this process's runs a prune found to be their run's (``checked_state``), with their files as they
# were then: one whose files are unchanged since is not read and checked again at the next epoch's prune (each
# state.json holds the run's history, so that check cost more each epoch). Another config or working folder, or a
# file added, removed, replaced or written to since, and it is checked again. The one just written is checked at the
# prune after it, as before: this version may write what it would refuse to resume from.
_FOUND: dict[Path, tuple] = {}


def write_checkpoint(root: Path, name: str, model: dict[str, torch.Tensor],
                     train_state: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    """Write ``root/name`` atomically, then keep only the newest ``keep`` complete checkpoints."""
    final, tmp = root / name, root / f".{name}.tmp"
    going = root / f".{name}.pruned.tmp"  # a checkpoint of this name that the new one replaces, until it is in place
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # our own leftover (the run folder is locked and ours)
        tmp.mkdir()
        save_file(model, str(tmp / MODEL), metadata={"format": FORMAT})
        save_file(train_state, str(tmp / TRAIN_STATE), metadata={"format": FORMAT})
        usual_permissions(tmp / MODEL, tmp / TRAIN_STATE)
        (tmp / STATE).write_text(json_text(state, default=str) + "\n", encoding="utf-8")
        manifest = {"format": FORMAT, "files": {}}
        for file in FILES:
            fsync(tmp / file)
            manifest["files"][file] = {"bytes": (tmp / file).stat().st_size, "sha256": sha256(tmp / file)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        fsync(tmp / MANIFEST)
        fsync(tmp)
        if os.path.lexists(final) and replaced(final, state.get("config") or {}):
            shutil.rmtree(going, ignore_errors=True)
            os.rename(final, going)  # (removed once the new one is in place: a stop between keeps it)
        if os.path.lexists(final):  # a refused checkpoint of that name, now redone: kept, under another name
            aside = set_aside(final)
            log.warning("%s, which this run could not resume from, is kept as %s (IISAN removes no checkpoint it "
                        "cannot read as this run's: remove it once it is not needed)", final, aside)
        os.replace(tmp, final)
    except WRITE_ERRORS as err:
        put_back(going, final)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = next((p for p in checkpoints(root) if (p / MANIFEST).is_file()), None)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final}: {failure_reason(err)}; {kept}") from None
    except BaseException:  # a second Ctrl-C inside the write: no partial (large) checkpoint left hidden
        put_back(going, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(going, ignore_errors=True)
    try:
        fsync(root)  # the rename made durable
    except OSError as err:
        raise CheckpointError(f"wrote checkpoint {final}, but could not sync the folder {root} after renaming it into "
                              f"place ({failure_reason(err)}): the disk may be failing") from None
    prune(root, keep, state.get("config") or {}, final)
    return final


def replaced(path: Path, config: dict) -> bool:
    """Whether ``path``, a mid-epoch checkpoint of the name one about to be written takes (or of its epoch and
    newer), is this run's (``config``'s) and intact: of an epoch the run restarted (resumed by another number of
    processes: ``progress.Progress.load``), or stopped again while evaluating, whose steps the new one holds. It
    goes like an older one; a damaged one is left, as any refused checkpoint."""
    return NAME.match(path.name)[2] is not None and isinstance(checked_state(path, config), dict)


def put_back(going: Path, final: Path) -> None:
    """A checkpoint moved aside for a new one of its name, put back when the new one did not take its place (only a
    kill between the two renames leaves it hidden, for the next prune to remove as a leftover)."""
    with contextlib.suppress(OSError):  # (the error in flight is the one to report)
        if os.path.lexists(going) and not os.path.lexists(final):
            os.rename(going, final)


def set_aside(path: Path) -> Path:
    """Rename ``path`` to a free ``<name>.set-aside[-N]`` beside it (no checkpoint's name: never read nor pruned)."""
    for n in range(1, 10_000):
        aside = path.with_name(f"{path.name}.set-aside" + (f"-{n}" if n > 1 else ""))
        if not os.path.lexists(aside):
            os.rename(path, aside)
            return aside
    raise FileExistsError(errno.EEXIST, "no free name to set it aside under", str(path))


LEFT_IN_PLACE: set[Path] = set()  # refused checkpoints pruning has named (once each)


def left_in_place(path: Path, why: str) -> None:
    """Pruning leaves the checkpoint ``path`` where it is: said once in this process."""
    if path not in LEFT_IN_PLACE:
        LEFT_IN_PLACE.add(path)
        log.info("pruning leaves %s in place, as %s", path, why)


def prune(root: Path, keep: int, config: dict, written: Path | None, dry: bool = False) -> int:
    """Keep the newest ``keep`` checkpoints this run can resume from (complete and of ``config``: ``checked_state``)
    and delete the older ones, and leftover temporary folders. ``written``, just written, counts unchecked and is
    never deleted, nor is a newer one; a refused checkpoint (copied in from another run, damaged) is neither counted
    nor deleted, as it may not be this run's: it is named once, and left in place. A mid-epoch checkpoint older
    than ``written`` (a Ctrl-C's, resumed since) is deleted uncounted: it was kept only to resume from, and so is
    one of ``written``'s epoch that is newer (of an epoch restarted under another number of processes, whose
    steps the run trains again: ``replaced``). With no ``written`` (a finished run's, ``keep`` 0) every one is
    older. Returns how many were deleted; ``dry``: how many would be, temporary folders included, deleting none."""
    kept = removed = 0
    here = checkpoints(root)
    for path in set(_FOUND) - set(here):
        if path.parent == root:
            del _FOUND[path]
    config_key = hashlib.sha256(json_text([config, os.getcwd()], sort_keys=True, default=str).encode()).hexdigest()
    for path in here:
        found = (config_key, files_now(path))  # (no files to tell: checked, and not remembered)
        known = found[1] is not None and _FOUND.get(path) == found
        refused = None if path == written or known else checked_state(path, config, digests=False)
        if isinstance(refused, dict) and found[1] is not None:
            _FOUND[path] = found
        older = written is None or checkpoint_order(path) < checkpoint_order(written)
        within = NAME.match(path.name)[2] is not None  # (a mid-epoch one)
        restarted = within and written is not None and path != written and \
            checkpoint_order(path)[0] == checkpoint_order(written)[0] and replaced(path, config)  # (newer)
        if isinstance(refused, str):
            if not dry:
                left_in_place(path, f"this run cannot resume from it: {refused.removesuffix(f'; {NEW_RUN}')}")
        elif (older and (kept >= keep or within)) or restarted:
            removed += all(p.name in (*FILES, MANIFEST) for p in path.iterdir()) if dry else remove_checkpoint(path)
        else:
            kept += 1
    for leftover in root.glob(".epoch-*.tmp"):
        if dry:
            removed += 1
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


def prune_finished(root: Path, keep: int, config: dict) -> None:
    """Once a run's results.json says finished: its checkpoints under ``root`` pruned as its last write prunes them
    (``prune`` with no ``written``: the newest ``keep``, no mid-epoch one, no temporary folder), so that an attempt
    killed before it pruned leaves no more than one that was not; with ``keep`` 0 every one (its best weights are
    in best.safetensors), and the folder where that empties it."""
    removed = prune(root, keep, config, None)
    if keep == 0:
        with contextlib.suppress(OSError):  # the folder too, when nothing else is left in it
            root.rmdir()
        if removed:
            log.info("removed %d checkpoint(s) of the finished run (--keep-checkpoints 0); best.safetensors holds "
                     "its best epoch's weights, and a longer run cannot go on from this one", removed)
    elif removed:
        log.info("removed %d checkpoint(s) of the finished run that an attempt killed before pruning left "
                 "(--keep-checkpoints %d)", removed, keep)


def recorded_keep(results: dict, default: int) -> int:
    """The --keep-checkpoints a run's results.json (``results``) says it ran with (``default`` where it says
    none): what its own pruning keeps, whatever a later command asks for."""
    config = results.get("config")
    keep = config.get("keep_checkpoints") if isinstance(config, dict) else None
    return keep if type(keep) is int and keep >= 0 else default


def files_now(path: Path) -> tuple | None:
    """The name, inode, size and times of each entry of the folder ``path`` (of what a link points to); None when
    it cannot be read."""
    try:
        with os.scandir(path) as entries:
            stats = [(entry.name, entry.stat()) for entry in entries]
    except OSError:
        return None
    return tuple(sorted((name, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for name, s in stats))


def remove_checkpoint(path: Path) -> bool:
    """Delete a checkpoint folder of this run: the files a checkpoint holds, then the folder. One that holds
    anything else (a note put there) is left whole, and named once. Whether it is gone from its name."""
    others = sorted(p.name for p in path.iterdir() if p.name not in (*FILES, MANIFEST))
    if others:
        left_in_place(path, "it holds files a checkpoint does not: " + ", ".join(others[:3])
                      + (", ..." if len(others) > 3 else ""))
        return False
    # Renamed in one step to a leftover's hidden name first: a removal cut short (a file that cannot go now)
    # leaves no half checkpoint under its own name, and the next prune finishes it with the other leftovers.
    going = path.with_name(f".{path.name}.pruned.tmp")
    try:
        os.rename(path, going)
    except OSError as err:
        left_in_place(path, f"it cannot be renamed to be removed: {err.strerror or err}")
        return False
    shutil.rmtree(going, ignore_errors=True)
    return True
