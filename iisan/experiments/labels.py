"""How a table of runs names what it compares: runs by their folder's name, with the folders above it
where two runs share one (``run_labels``), encoders by their folder's name, with its parent's where two
encoders share one (``encoder_labels``), and data sets by the users file's folder, with a digest of the
files' contents where runs of one name read other files (``data_labels``)."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import PurePath

import pandas as pd

log = logging.getLogger(__name__)

# Folder names that say where a model's files are, not which model they are: the folder above names it.
PLACE_NAMES = frozenset({"model", "models", "weights", "checkpoint", "checkpoints", "pretrained", "hf", "final",
                         "best", "main"})


def run_labels(folders: list[str]) -> list[str]:
    """The label of each run folder in a table and a figure of runs: its name, or where runs share that
    name (a copy of a run, ``a/seed1`` beside ``b/seed1``) as many folders above it as tell them apart."""
    paths = [PurePath(f) for f in folders]
    labels = [p.name for p in paths]
    for depth in range(2, max((len(p.parts) for p in paths), default=0) + 1):
        shared = Counter(labels)
        repeated = [i for i, label in enumerate(labels) if shared[label] > 1]
        if not repeated:
            break
        for i in repeated:
            labels[i] = str(PurePath(*paths[i].parts[-depth:]))
    return labels


def encoder_name(path: PurePath) -> tuple[str, PurePath]:
    """What names the encoder at ``path``, and the folder above that name: the folder's name; for a folder
    named for a place (``PLACE_NAMES``: ``.../all-MiniLM-L6-v2/model``) its parent's name too; for a
    Hugging Face cache snapshot (``models--org--name/snapshots/<commit>``) the Hub id ``org/name``."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), path.parents[2]
    if path.name.lower() in PLACE_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}", path.parent.parent
    return path.name, path.parent


def encoder_labels(paths: Iterable[str]) -> dict[str, str]:
    """The label of each encoder path, by which the table shows and compares encoders: its name
    (``encoder_name``), or ``parent/name`` where encoders in differently named parent folders share that
    one-folder name (``.../bert/enc`` and ``.../vit/enc``); a bare name (``bert-base-uncased``) is the same
    encoder as any ``.../bert-base-uncased``. Paths that end in the same two folder names are one encoder, so a
    copy under another root (another machine, a relative path) is one experiment: a guess from names, not
    a proof (a Hub id, ``org/name``, has just those two parts)."""
    named = {path: encoder_name(PurePath(path)) for path in set(paths)}
    parents: dict[str, set[str]] = {}
    for name, above in named.values():
        parents.setdefault(name, set()).update({above.name} - {""})  # a bare name matches any parent

    def label(name: str, above: PurePath) -> str:
        if "/" in name or len(parents[name]) <= 1 or not above.name:  # two names already: one encoder
            return name
        return f"{above.name}/{name}"

    return {path: label(*named[path]) for path in named}


def weights_apart(frame: pd.DataFrame, key: str, labels: pd.Series) -> pd.Series:
    """``labels`` (an encoder column's ``encoder_labels``) with ``@`` and a digest where runs of one label
    recorded other weights (two folders named alike, a folder whose weights were replaced between seeds), so
    that no table or average joins them; said in a warning. A run that recorded none keeps the bare label (it
    joins the others where they all hold one weights)."""
    weights = frame[key.replace("_model", "_weights")]
    labels = labels.copy()
    for name, rows in labels.groupby(labels, sort=False).groups.items():
        if weights[rows][weights[rows] != ""].nunique() > 1:
            labels[rows] = [f"{name}@{w[:6]}" if isinstance(w, str) and w else name for w in weights[rows]]
            log.warning("%s %r names encoders of other weights in these runs: shown apart as %s", key, name,
                        ", ".join(sorted(set(labels[rows]))))
    return labels


def data_labels(frame: pd.DataFrame) -> pd.Series:
    """The data column: the users file's folder name, with ``@`` and a digest of the files' contents where
    runs of one name read other files (two folders named alike, a file edited between seeds, other images
    of the runs that read images), so that no table or average joins them; said in a warning. A run that
    reads no image (SASRec-ID, a text tower) differs from the others only in its users and items files."""
    labels = frame["data"].copy()
    for name, rows in frame.groupby("data", sort=False).groups.items():
        images = frame.loc[rows, "image_files"]
        apart = images[images != ""].nunique() > 1  # an image ablation: each image store its own data
        files = [f"{f}:{i}" if apart and i else f for f, i in zip(frame.loc[rows, "data_files"], images, strict=True)]
        if len(set(files)) > 1:
            labels[rows] = [f"{name}@{hashlib.sha256(f.encode()).hexdigest()[:6]}" for f in files]
            log.warning("data %r names files of other contents in these runs: shown apart as %s", name,
                        ", ".join(sorted(set(labels[rows]))))
    return labels
