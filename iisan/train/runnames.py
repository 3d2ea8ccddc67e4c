"""What a run folder is called. A run's default name comes from what it computes (method, feed, data set and a
short hash of the config), never from the clock, so running the same command again finds the same folder: a
run with checkpoints resumes, a finished one is skipped (``runfolder``).

The hash leaves out the keys that may change between a checkpoint and the run resuming it
(``methods.MAY_CHANGE``: where and how fast things run, how long, how they are reported), so that a
longer ``--epochs`` or another ``--device`` continues the same run, and every key at its field default,
so that a field added to ``Config`` later leaves the names of earlier runs as they were. The data counts by
what it holds (the users and items files' fingerprints, an image LMDB's digest or, where a cached run's LMDB is
not here, its image cache's record of it), not by where it is: the same
command on a copy of the data (on a node's own disk, in a moved project) finds the same run folder, also one
under another folder's name (``data_name``: ``Scientific`` of ``Scientific/users.tsv``): by the hash alone, where
one folder has it (``known_run_name``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from .. import once
from ..bounds import MAX_NAME_BYTES
from ..config import Config
from ..distributed import launched_processes
from ..files import path_component
from ..methods import unread_keys
from ..spelling import one_spelling
from .checkpoint import DATA_PATHS, MAY_CHANGE, data_content, same_paths

log = logging.getLogger(__name__)


# How versions of this library hashed a config, newest first: a cached run's images also by what its image cache
# records of them where the LMDB is not here (a node holding the cache alone; after commit 9cada80); a data file or
# image LMDB by what it holds where that can be told (``checkpoint.data_content``), so that a copy elsewhere names
# the same run (a node's own disk, a moved project; after commit b583a5a); an encoding by Python's name for it too
# (latin1 as iso8859-1; after commit b6b659d); each value in one spelling (-0.0 as 0.0, "query, value" as
# query,value: ``spelling.one_spelling``; an encoder folder's spelling: ``same_paths``'s ``spelling``; after commit
# fe0d88d); keys the method never reads left out (``methods.unread_keys``; added after commit 134175e); paths by
# where they are, a value at its default's place left out (since commit 825c7d5); the same, but a default left out
# only as spelt (a script's absolute path to the default encoder counted); each path as spelt. Runs named by an
# earlier one are found.
HASHES = ("cached-images", "data-content", "encoding-names", "one-spelling", "read", "canonical", "defaults-as-spelt",
          "as-spelt")


def config_hash(cfg: Config, scheme: str = HASHES[0]) -> str:
    """Eight hex digits naming what ``cfg`` computes (see the module docstring). A users or items file or an
    image LMDB counts by what it holds where that can be told (``checkpoint.data_content``; a cached run's images
    also by its image cache's record, where the LMDB is not here), so a copy of the
    data elsewhere names the same run; other paths count by where they are (``same_paths``): ``users.tsv``
    and ``/work/users.tsv`` from ``/work`` name one run (also where the file is not there), and so do
    ``iisan train``'s default encoders and a script's absolute path to them; keys the method never reads do not
    count (an ID run's encoder folders). ``scheme``: one of ``HASHES``."""
    def since(first: str) -> bool:  # whether ``scheme`` is ``first`` or newer: each scheme keeps the older ones' steps
        return HASHES.index(scheme) <= HASHES.index(first)

    defaults, values, spelling = Config().to_dict(), cfg.to_dict(), since("one-spelling")
    values = one_spelling(values, encodings=since("encoding-names")) if spelling else values
    if since("canonical"):
        defaults, values = same_paths(defaults, spelling=spelling), same_paths(values, spelling=spelling)
    unread = unread_keys(cfg.method, cfg.towers, cfg.feed) if since("read") else frozenset()
    values = {k: v for k, v in values.items() if k not in MAY_CHANGE | unread and v != defaults[k]}
    if since("data-content"):
        cache = cfg.cache_dir if cfg.cached and since("cached-images") else None  # (None: an LMDB by its digest alone)
        values = {k: {"content": found} if k in DATA_PATHS and (found := data_content(k, v, cache)) else v
                  for k, v in values.items()}
    if scheme == "defaults-as-spelt":
        values = same_paths(values, spelling=False)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def data_name(cfg: Config, scheme: str = HASHES[0]) -> str:
    """The data set's name: the users file's folder (``Dataset/Scientific/...tsv`` -> ``Scientific``), also
    when the path is relative (``users.tsv`` from that folder; the ``as-spelt`` scheme: as spelt)."""
    users = Path(os.path.abspath(cfg.users) if scheme != "as-spelt" and cfg.users else cfg.users)
    return path_component(users.parent.name or users.stem or "nodata")


def default_run_name(cfg: Config, tag: str = "", scheme: str = HASHES[0]) -> str:
    """``iisan-cached-Scientific-3fa2c1d0``; ``tag`` (a sweep's varying values, e.g. ``lr0.0001``) and
    ``smoke`` are added before the hash, to be read by people; the hash alone keeps runs apart, with the
    number of processes under torchrun (``-4proc``): each process has its own batch of users, so a run
    of 4 processes computes something else than one of 1 (``--run-name`` resumes across counts)."""
    head, tail = name_ends(cfg, scheme)
    name = f"{head}-{path_component(tag)}-{tail}" if tag else f"{head}-{tail}"
    if len(name) <= MAX_NAME_BYTES:  # (ASCII: path_component's)
        return name
    return f"{name[:MAX_NAME_BYTES - len(tail) - 1].rstrip('-._')}-{tail}"  # a long data folder's name, cut


def name_ends(cfg: Config, scheme: str = HASHES[0]) -> tuple[str, str]:
    """The two ends of ``cfg``'s default run name, around a tag: ``iisan-cached-Scientific[-smoke]`` and
    ``[4proc-]3fa2c1d0``."""
    processes = launched_processes()
    head = [cfg.method, cfg.feed, data_name(cfg, scheme), "smoke" if cfg.smoke else ""]
    tail = [f"{processes}proc" if processes > 1 else "", config_hash(cfg, scheme)]
    return "-".join(p for p in head if p), "-".join(p for p in tail if p)


def known_run_name(cfg: Config, tag: str = "", listed: Callable[[Path], dict] | None = None) -> str:
    """``default_run_name``, or the one folder under ``out_dir`` where an earlier sweep put the same
    computation under other varying values (the hash names what a run computes; the tag only what that
    sweep varied): a sweep extended along one axis, or a point rerun alone, finds its finished and
    interrupted runs instead of training them again in a new folder; last, the one folder of this config's hash
    under any data folder's name (its data copied under another folder's name). ``listed``: ``folder_names``,
    kept by a caller naming many runs (a sweep's grid lists each out_dir once, not once per point)."""
    name, out = default_run_name(cfg, tag), Path(cfg.out_dir)
    if os.path.lexists(out / name) or not out.is_dir():
        return name
    names = (listed or folder_names)(out)
    for scheme in HASHES:  # the newest first, then the names of runs of earlier versions
        if scheme != HASHES[0] and os.path.lexists(out / (earlier := default_run_name(cfg, tag, scheme))):
            return earlier
        head, tail = name_ends(cfg, scheme)
        found = same_hash(names, out, head, tail)
        if len(found) == 1:
            log.debug("%s: this config's run, named by the values an earlier sweep varied", out / found[0])
        if found:  # several: none is this config's for sure
            return found[0] if len(found) == 1 else name
    # the same data under another folder's name (a flat copy: $TMPDIR/users.tsv): the hash alone says the run
    if len(found := same_hash(names, out, f"{cfg.method}-{cfg.feed}", name_ends(cfg)[1])) == 1:
        if once.first("named by its data folder then", str(out / found[0])):  # (a run names its folder thrice)
            log.info("%s: this config's run, named by the folder its data was in then", out / found[0])
        return found[0]
    return name


def same_hash(names: dict[str, list[str]], out: Path, head: str, tail: str) -> list[str]:
    """The folders of ``names`` (``folder_names``) under ``out`` named ``{head}-...-{tail}`` but of another number
    of processes."""
    return [n for n in names.get(tail.rsplit("-", 1)[-1], ())
            if n.startswith(f"{head}-") and n.endswith(f"-{tail}")
            and not re.search(r"(^|-)\d+proc$", n[len(head) + 1:-len(tail) - 1]) and (out / n).is_dir()]


def folder_names(out: Path) -> dict[str, list[str]]:
    """The names of what is in ``out`` by their last part (in a run folder's name, its config hash)."""
    names = {}
    with os.scandir(out) as entries:
        for entry in entries:
            names.setdefault(entry.name.rsplit("-", 1)[-1], []).append(entry.name)
    return names


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / (cfg.run_name or known_run_name(cfg))
