"""The paper's data sets, one row each: where the users and items files lie under ``Dataset/``, the
cache folder under ``Code_Cached/``, and where ``iisan fetch data`` downloads it from (``sources``).

A fetched data set's folder and file names are read from its source, so they are written once; its
statistics after the protocol are its source's (``DataSource.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..config import REPOSITORY
from .sources import SOURCES, DataSource

LMDB = "images.lmdb"  # a data set's pictures, in its folder (built by ``iisan fetch data`` or build_lmdb.py)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str  # Dataset/<folder>
    users_file: str  # in the folder
    items_file: str  # in the folder
    cache_folder: str  # Code_Cached/<cache_folder>
    source: DataSource | None = None  # where `iisan fetch data` gets it; None: put there by hand


def _fetched(name: str, cache_folder: str) -> DatasetSpec:
    """The row of a data set in ``sources.SOURCES``: its folder and file names are its source's."""
    source = SOURCES[name]
    return DatasetSpec(name, source.folder, PurePosixPath(source.users.path).name,
                       PurePosixPath(source.items.path).name, cache_folder, source)


DATASETS = {spec.name: spec for spec in (
    _fetched("Scientific", "stored_vectors_sci"),
    _fetched("Instrument", "stored_vectors_ins"),
    _fetched("Office", "stored_vectors_off"),
    # IISAN-Versa's MicroLens-100k (numeric ids, some empty titles; data.csv_files): --allow-empty-titles
    DatasetSpec("MicroLens", "MicroLens", "MicroLens-100k_pairs.tsv", "MicroLens-100k_title_en.tsv",
                "stored_vectors_micro"),
)}

FETCHABLE = tuple(name for name, spec in DATASETS.items() if spec.source)  # table order


def dataset_paths(name: str, root: Path = REPOSITORY) -> dict[str, str]:
    """users, items, images (LMDB) and cache_dir of one of the paper's data sets, under ``root`` (the
    repository: ``Dataset/<folder>`` and ``Code_Cached/<cache folder>``)."""
    spec = DATASETS[name]
    base = root / "Dataset" / spec.folder
    return {"users": str(base / spec.users_file), "items": str(base / spec.items_file),
            "images": str(base / LMDB), "cache_dir": str(root / "Code_Cached" / spec.cache_folder)}
