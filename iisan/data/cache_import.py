"""Importing the authors' stored hidden states as this project's cache.

The authors' ``Code_Cached/preprocess_vectors.py`` wrote one ``torch.save`` file per item and modality:
``<DIR>/bert_outputs/bert_<item_id>.pt`` and ``<DIR>/vit_outputs/vit_<item_id>.pt``, each a plain
(13, 768) fp32 tensor, the CLS state of every hidden layer of BERT-base and ViT-B/16 (index 0 = the
embedding output). Here each file is read with ``torch.load(weights_only=True)`` only, so a file that
would need any object unpickled is refused, never loaded. The selected layers are stacked in the data
set's item order and written with ``cache_build.write_together``, with metadata that records the
import and its source.

Every file is checked before anything is written: missing files, files that are not a plain tensor
(or would need unpickling), of another shape, not floating-point, holding NaN or infinite values, or values
beyond the stored precision's range (fp16 tops at 65504) are counted by kind, named in
``<cache_dir>/import-report.tsv``, and end the import with one line; no cache is written. A file of that
name that is not such a report is refused before any file is read.
``allow_missing`` stores absent items as zero rows instead (counted, logged, and recorded in the
metadata as ``imported_missing``).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..claims import claim_output
from ..console import progress_bar
from ..digests import stat_digest
from ..errors import CacheError, parse_json
from ..files import atomic_path, remove, stale_temporaries, starts_with
from .cache import VOLATILE, cache_file, read_metadata, require_cache_space
from .cache_build import write_together

log = logging.getLogger(__name__)
# A raw pickle (not torch.save's zip) makes torch warn of its pickle protocol before refusing it: the
# report says what the file is (set once: catch_warnings around loads in threads would not be safe).
warnings.filterwarnings("ignore", message=r"Detected pickle protocol \d+ in the checkpoint", category=UserWarning,
                        module=r"torch\._weights_only_unpickler")

# modality -> (folder, file-name prefix) in the authors' layout
AUTHORS_LAYOUT = {"text": ("bert_outputs", "bert_"), "image": ("vit_outputs", "vit_")}
REPORT = "import-report.tsv"
REPORT_HEAD = "modality\titem_id\tfile\tproblem\n"  # the first line of every report ``write_report`` writes


def state_file(src: Path, modality: str, item_id: str) -> Path:
    folder, prefix = AUTHORS_LAYOUT[modality]
    return src / folder / f"{prefix}{item_id}.pt"


def read_state(path: Path, shape: tuple[int, int]) -> tuple[torch.Tensor | None, str | None]:
    """The tensor in ``path`` and None, or None and why it cannot be used."""
    if not path.is_file():
        return None, "missing"
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only: UnpicklingError; truncated or foreign files: zip, EOF, runtime errors
        detail = " ".join(str(err.__context__ or err).split())[:160]
        if type(err).__name__ != "UnpicklingError":  # named, not imported: this project imports no pickle
            return None, f"unreadable: {type(err).__name__}: {detail}"
        if detail.startswith("Unsupported operand") or "load key" in detail:  # bytes that are no pickle at all
            return None, f"unreadable: not a torch.save file ({detail})"
        return None, f"refused: needs unpickling of objects ({detail})"
    if not isinstance(value, torch.Tensor):
        return None, f"not a plain tensor ({type(value).__name__})"
    if tuple(value.shape) != tuple(shape):
        return None, f"shape {tuple(value.shape)}, expected {tuple(shape)}"
    if not value.is_floating_point():  # token ids or labels saved by mistake are no hidden states
        return None, f"not floating-point ({str(value.dtype).replace('torch.', '')}: no hidden states)"
    value = value.detach().float()
    if not torch.isfinite(value).all():
        return None, "NaN or infinite values"
    return value, None


def import_table(src: Path, modality: str, item_ids: list[str], layers: list[int], shape: tuple[int, int],
                 dtype: torch.dtype, threads: int = 8,
                 progress: bool = False) -> tuple[torch.Tensor, list[tuple[str, Path, str]]]:
    """``(len(item_ids), len(layers), width)`` states of ``layers`` for items ``item_ids[1:]`` (row 0 is
    padding, zeros) and the problems found, as (item id, file, problem); ``progress``: a bar (log lines)."""
    table = torch.zeros(len(item_ids), len(layers), shape[1], dtype=dtype)
    problems = []
    index = torch.tensor(layers)
    paths = [state_file(src, modality, item_id) for item_id in item_ids[1:]]
    pool = ThreadPoolExecutor(threads, thread_name_prefix="iisan-import")
    try:
        read = progress_bar(zip(paths, pool.map(lambda p: read_state(p, shape), paths)), len(paths),
                            desc=f"importing {modality}", unit="items", enabled=progress, closing=True)
        for row, (path, (states, problem)) in enumerate(read, 1):
            stored = None if problem else states[index].to(dtype)  # (layers, width)
            if stored is not None and not torch.isfinite(stored).all():  # fp16 tops at 65504
                problem = f"values beyond {str(dtype).removeprefix('torch.')} range (import with --dtype bfloat16 " \
                          "or float32)"
            if problem:
                problems.append((item_ids[row], path, problem))
            else:
                table[row] = stored
    finally:  # a Ctrl-C drops the reads still queued (every file of the modality), not waited for: 25 s at 87k
        pool.shutdown(cancel_futures=True)
    return table, problems


def imported_files(src: Path, modality: str, item_ids: list[str]) -> str:
    """What an import of ``item_ids[1:]``' ``modality`` states reads under ``src``, by their files' names, sizes and
    modification times (``digests.stat_digest``): the metadata's ``imported_files``."""
    return stat_digest(list(AUTHORS_LAYOUT[modality]), ((i, state_file(src, modality, i)) for i in item_ids[1:]))


def kept_import(metadata: dict[str, dict[str, str]], out_dir: Path, allow_missing: bool) -> dict[str, Path] | None:
    """The caches in ``out_dir`` when an import of ``metadata`` would write them as they are, as ``make`` would keep
    them: each imported with the same settings from the same files (``imported_files``, unchanged since), its report
    beside it, and no item stored as zeros unless ``allow_missing``. None when it would import again (a cache of
    other settings is ``check_replaced``'s to refuse)."""
    paths = {m: cache_file(out_dir, m) for m in metadata}
    for m, new in metadata.items():
        try:
            old = read_metadata(paths[m])
        except CacheError:  # not there, damaged, or no cache: imported (or refused) as before
            return None
        if any(old.get(k) != v for k, v in new.items() if k not in VOLATILE or k == "imported_files"):
            return None
        if old.get("imported_missing") != "0" and not allow_missing:  # an import without it would refuse them
            return None
    return paths if is_report(out_dir / REPORT) else None


def is_report(path: Path) -> bool:
    """An import report ``write_report`` wrote: its header line."""
    return starts_with(path, REPORT_HEAD)


def claim_report(path: Path) -> None:
    """A file at ``path`` may be replaced only when it is an import report (one line otherwise)."""
    claim_output(path, is_report, "an import report IISAN wrote", "--cache-dir", overwrite=True)


def write_report(path: Path, problems: list[tuple[str, str, Path, str]]) -> None:
    claim_report(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(REPORT_HEAD)
        fh.writelines(f"{m}\t{item_id}\t{file}\t{why}\n" for m, item_id, file, why in problems)


def kind(problem: str) -> str:
    """A problem's kind, for counting: missing, refused, unreadable, not a plain tensor, wrong shape, NaN..."""
    return "wrong shape" if problem.startswith("shape") else problem.split(":")[0].split(" (")[0]


def summary(problems: list[tuple[str, str, Path, str]]) -> str:
    kinds = Counter(kind(why) for *_, why in problems)
    first: dict[str, str] = {}
    for _, _, path, why in problems:
        first.setdefault(kind(why), path.name)
    return ", ".join(f"{n} {k} (e.g. {first[k]})" for k, n in kinds.most_common())


def check_import(src: Path, item_ids: list[str], layers: dict[str, list[int]], shapes: dict[str, tuple[int, int]],
                 out_dir: Path, dtype: torch.dtype) -> None:
    """What refuses an import before any file is read or written: a missing folder of the authors', a report
    file that is not an import's, too little disk for the cache (once a killed import's temporaries, which the
    caller's lock of the folder makes stale, are removed)."""
    for m in layers:
        folder = src / AUTHORS_LAYOUT[m][0]
        if not folder.is_dir():
            raise CacheError(f"{folder} does not exist: --from should name the folder holding the authors' "
                             f"{AUTHORS_LAYOUT[m][0]}/ (e.g. stored_vectors_sci/)")
    claim_report(out_dir / REPORT)
    for stale in [t for m in layers for t in stale_temporaries(cache_file(out_dir, m))]:
        remove(stale)
    require_cache_space(out_dir, len(item_ids) * sum(len(layers[m]) * shapes[m][1] for m in layers) * dtype.itemsize,
                        layers, len(item_ids) - 1, dtype)


def import_caches(src: str | Path, item_ids: list[str], layers: dict[str, list[int]],
                  shapes: dict[str, tuple[int, int]], metadata: dict[str, dict[str, str]], out_dir: str | Path,
                  dtype: torch.dtype, allow_missing: bool = False, progress: bool = False) -> dict[str, Path]:
    """Import every modality of ``layers`` (modality -> hidden-state indices to keep) from the authors'
    files under ``src``; ``shapes`` gives each file's expected (states, width); ``metadata`` each cache's.
    Nothing is written unless every modality imports cleanly."""
    src, out_dir = Path(src), Path(out_dir)
    check_import(src, item_ids, layers, shapes, out_dir, dtype)
    tables, problems = {}, []
    for m in layers:
        log.info("importing %s states of %d items from %s", m, len(item_ids) - 1, src / AUTHORS_LAYOUT[m][0])
        tables[m], found = import_table(src, m, item_ids, layers[m], shapes[m], dtype, progress=progress)
        problems += [(m, *p) for p in found]
    missing = [p for p in problems if p[3] == "missing"]
    fatal = [p for p in problems if p[3] != "missing" or not allow_missing]
    write_report(out_dir / REPORT, problems)  # also when clean: no earlier import's problems stay listed
    if fatal:
        raise CacheError(f"{len(fatal)} of {(len(item_ids) - 1) * len(layers)} files under {src} cannot be "
                         f"imported: {summary(fatal)}; no cache was written; every file is listed in "
                         f"{out_dir / REPORT}")
    if missing:
        log.warning("%d items have no file under %s and are stored as zero states (--allow-missing); list in %s",
                    len(missing), src, out_dir / REPORT)
    paths = {m: cache_file(out_dir, m) for m in tables}
    write_together({paths[m]: ({"states": (dtype, tuple(table.shape))}, [("states", table)],
                               dict(metadata[m], imported_missing=str(sum(p[0] == m for p in missing))))
                    for m, table in tables.items()})
    for m, table in tables.items():
        log.info("wrote %s: %s items x %d layers x %d (%s), imported from %s", paths[m], f"{len(item_ids) - 1:,}",
                 table.shape[1], table.shape[2], parse_json(metadata[m]["layers"]), src)
    return paths
