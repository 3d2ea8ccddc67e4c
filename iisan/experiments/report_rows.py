"""The rows of ``iisan results``: one per ``results.json`` found under the given folders (``collect``),
each config key as the table shows and compares it (``config_text``), with the run's curve.

Smoke runs and runs that have not finished (running, stopped: said running but held by no process,
failed, interrupted) are left out, counted in the log, unless asked for (``--include-smoke``,
``--include-running``). A metric that is NaN or infinite is marked ``non-finite`` (a mean over seeds
that includes one is non-finite too, never silently dropped). A results file that cannot be read, or
whose fields are missing or of the wrong type (``results_file.check_results``), is skipped, counted and
named in the log with the field at fault, never a crash. A run given several ways (its folder, a folder
above it, its results.json) counts once. """

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd

from ..bounds import LEARNING_RATES
from ..config import Config
from ..data.images import recorded_digest
from ..digests import file_fingerprint
from ..errors import ConfigError, DataError, UserError
from ..flags import close_match
from ..methods import MAY_CHANGE, METHOD_NAMES, unread_keys
from ..metric_names import SELECTED_BY, TABLED, VALID_COLUMN
from ..spelling import one_spelling
from .labels import run_labels
from .results_file import DamagedResults, find_results, load_results, ran_from, status

log = logging.getLogger(__name__)

NUMBERS = (VALID_COLUMN, *(f"test_{m}" for m in TABLED), "train_s_per_epoch")
CONFIG_KEYS = tuple(k for k in Config.__dataclass_fields__ if k not in ("method", "feed"))  # those two: columns
# ...and how many processes trained the run (torchrun): each process has its own batch of users.
RUN_KEYS = (*CONFIG_KEYS, "processes")
KEYS = (*Config.__dataclass_fields__, "processes")  # what --keys takes (method and feed: columns of every table)
# Keys that never tell two experiments apart (epochs and patience do: they change what a run reports).
NOT_EXPERIMENT = (MAY_CHANGE - {"epochs", "patience"}) | {"seed", "users", "items", "images"}
ENCODER_KEYS = ("text_model", "image_model")  # shown and compared by ``encoder_labels``
LAYER_KEYS = ("text_layers", "image_layers")  # None: layer_groups layers by layer_rule
UNUSED = "-"  # a key the run never reads; a learning rate it trains nothing with (results.json's parameters.by_rate)


def config_text(key: str, value) -> str:
    """A config value as the table shows and compares it: as configured (0.001, not 0.0010), lists as
    ``0,2,4``, layers left to automatic selection (None) as ``auto``, no cap on an epoch's steps (0) as
    ``all``. Encoder paths stay whole here: how much of one the table shows depends on the others
    (``encoder_labels``)."""
    if key in LAYER_KEYS and value is None:
        return "auto"
    if key == "max_steps_per_epoch" and value == 0:
        return "all"  # not "0 steps" beside a smoke run's cap
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _written(path: Path, results: dict) -> float | None:
    """When a run last wrote its results: its last epoch's ``ended_at`` (with its zone: comparable across zones),
    else the file's time (a run stopped before its first epoch; a copy by ``cp`` or ``scp`` stamps it anew)."""
    epochs = results.get("epochs")
    with contextlib.suppress(TypeError, ValueError, AttributeError, KeyError, IndexError):
        return datetime.strptime(epochs[-1]["ended_at"], "%Y-%m-%d %H:%M:%S %z").timestamp()
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def read_row(path: Path, results: dict) -> dict:
    """One row: the run, its status, every config key (as text; a key the file predates at its
    default), the metrics at the best-validation epoch, timings, parameters and memory. ``results``
    has passed ``check_results``."""
    cfg = one_spelling({**Config().to_dict(), **results["config"]})  # (a file saved before -0.0 was 0.0)
    results = {**results, "working_dir": ran_from(path, results, cfg)}
    users = Path(os.path.normpath(os.path.join(results["working_dir"], cfg["users"])))  # relative: from where it ran
    test, valid = results.get("test") or {}, results.get("valid") or {}
    # the training steps' peak, the paper's measure; a file written before phases were told apart has the run's
    memory = (results.get("peak_memory_by_phase") or {}).get("training") or results.get("peak_memory") or {}
    ended = status(path, results)
    built = results["parameters"].get("total") != 0  # (older files may lack it: built)
    row = {
        "run": path.parent.name,
        "method": results["method"],
        "feed": "-" if results["method"] == METHOD_NAMES["id"] else results["feed"],  # no encoder to feed
        "data": users.parent.name or users.stem,  # Dataset/Scientific/... -> Scientific
        # what the data files held, and the images read ('' for none), to tell apart data sets that share a
        # name (``labels.data_labels``)
        "data_files": ":".join(files_read(results, cfg, k) for k in ("users", "items")),
        "image_files": images_read(results, cfg),
        # the encoders' weights as recorded (a cache's, or a live run's folder's): two folders of one name that
        # hold other weights are other encoders (``labels.weights_apart``)
        **{f"{m}_weights": weights_read(results, m) for m in ("text", "image")},
        # a run --nonfinite authors ended at a NaN is finished, with the best epoch before it: said apart
        "status": "finished (NaN)" if results.get("stopped") and ended == "finished" else ended,
        **{k: config_text(k, cfg[k]) for k in CONFIG_KEYS},
        # a run resumed under other counts of processes (torchrun) is shown as such: "2+1"
        "processes": "+".join(map(str, results.get("world_sizes") or [results.get("world_size", 1)])),
        "best_epoch": results["best_epoch"] if results["best_epoch"] >= 0 else None,  # -1: no epoch ended yet
        "epochs_run": len(results["epochs"]),
        VALID_COLUMN: valid.get(SELECTED_BY),
        **{f"test_{m}": test.get(m) for m in TABLED},
        "train_s_per_epoch": (results.get("timing") or {}).get("train_seconds_per_epoch"),
        # a run that failed before its model was built counted nothing: no count, not 0
        "trainable_params": results["parameters"]["trainable"] if built else None,
        "peak_gib": memory.get("max_allocated_gib", memory.get("peak_rss_gib")),
        "device": results["device"],
        "folder": str(path.parent),
        "written": _written(path, results),
    }
    stored = set(((results.get("step") or {}).get("cache_dtypes") or {}).values())
    if cfg["cache_dtype"] == "auto" and stored:  # what auto came to: runs on caches of two precisions differ
        row["cache_dtype"] = ",".join(sorted(stored))
    # a cached run's states were computed by encoders in the precision its cache records: bf16 encoders' states
    # are not fp32 states rounded to bf16, though both caches store bf16
    cache = results.get("cache") if isinstance(results.get("cache"), dict) else {}
    computed = {r["encoder_dtype"] for r in cache.values() if isinstance(r, dict) and r.get("encoder_dtype")}
    if cfg["encoder_dtype"] == "auto" and computed:
        row["encoder_dtype"] = ",".join(sorted(computed))
    if isinstance(ran := (results.get("step") or {}).get("amp"), str) and ran:  # what it trained in: --amp auto
        row["amp"] = ran  # is bf16 on a GPU and fp32 on a CPU, seeds of which no mean may mix
    # keys the run never read (a live run's cache precision; SASRec-ID's encoders and images; FFT's LoRA rank)
    row.update(dict.fromkeys(unread_keys(cfg["method"], cfg["towers"], cfg["feed"]) & set(CONFIG_KEYS), UNUSED))
    # absent from files before 2026-12, or empty as the model was never built: every rate shown
    by_rate = results["parameters"].get("by_rate") if built else None
    row.update({k: UNUSED for k in LEARNING_RATES if by_rate is not None and k not in by_rate})
    row["non_finite"] = ",".join(c for c in NUMBERS if row[c] is not None and not math.isfinite(row[c]))
    return row


def weights_read(results: dict, modality: str) -> str:
    """The digest of the ``modality`` encoder's weights the run recorded ('' where none is: an older file, an
    encoder that was no folder, a run without that tower)."""
    def field(record: str, key: str):
        kept = results.get(record)
        entry = kept.get(modality) if isinstance(kept, dict) else None
        return entry.get(key) if isinstance(entry, dict) else None  # (a damaged file's: none)

    found = field("cache", "encoder_weights") or field("encoders", "digest")
    return found if isinstance(found, str) else ""


def files_read(results: dict, cfg: dict, key: str) -> str:
    """What names the content of the ``key`` file ('users', 'items') a run read: the fingerprint it recorded;
    for results that recorded none (older versions' users files), that of the file its config names, where it still
    is, as a run resumed now would record it (else its path)."""
    if recorded := results.get(f"{key}_fingerprint"):
        return str(recorded)
    where = Path(results.get("working_dir") or "", cfg[key])
    try:
        found = where.stat()
        return fingerprint_now(str(where), found.st_size, found.st_mtime_ns)
    except OSError:  # gone, or not readable here: its path stands for it
        return str(cfg[key])


@functools.lru_cache(maxsize=64)
def fingerprint_now(path: str, size: int, mtime_ns: int) -> str:
    """``file_fingerprint`` of ``path`` once per version of the file (the seeds of a sweep share one)."""
    return file_fingerprint(path)


def images_read(results: dict, cfg: dict) -> str:
    """What names the images a run's image tower read: the digest of its LMDB's records, as its cache or
    its live run recorded it; for older results, that of the LMDB its config names, where it still is and
    records one (else its path); '' without an image tower."""
    if "images" in unread_keys(cfg["method"], cfg["towers"], cfg["feed"]):
        return ""
    for record in (results.get("cache"), results.get("encoders")):
        image = record.get("image") if isinstance(record, dict) else None
        if isinstance(image, dict) and isinstance(image.get("images"), str):
            return image["images"]
    where = Path(results.get("working_dir") or "", cfg["images"])
    try:
        return recorded_digest(where) or str(cfg["images"])
    except UserError:  # not an image LMDB (any more): its path stands for it
        return str(cfg["images"])


def read_curve(results: dict) -> dict[str, list]:
    """The validation metric that chooses epochs (HR@10) and the training loss per epoch of a run, and its
    best-validation epoch."""
    epochs = results["epochs"]
    return {"epoch": [e["epoch"] for e in epochs], VALID_COLUMN: [e["valid"][SELECTED_BY] for e in epochs],
            "loss": [e["loss"] for e in epochs], "best_epoch": results["best_epoch"]}


def collect(folders: list[str], keys: Sequence[str] = (), include_smoke: bool = False,
            include_running: bool = False) -> tuple[pd.DataFrame, dict[str, dict[str, list]]]:
    """A frame of one row per readable, included run, and the curve of each (by its label, ``run_labels``)."""
    unknown = [k for k in keys if k not in KEYS]
    if unknown:
        meant = {k: m for k in unknown if (m := close_match(k, KEYS))}
        hint = f" (did you mean {', '.join(meant.values())}?)" if meant else ""
        raise ConfigError(f"--keys: unknown config key(s) {', '.join(unknown)}{hint}; a key is a config key "
                          f"({', '.join(Config.__dataclass_fields__)}) or processes (how many processes trained "
                          "the run)")
    files = find_results(folders)
    rows, curves, unreadable, smoke, unfinished = [], [], 0, 0, Counter()
    for path in files:
        try:
            results = load_results(path)
        except DamagedResults as err:
            log.warning("skipping %s: %s", path, err)
            unreadable += 1
            continue
        row, curve = read_row(path, results), read_curve(results)
        if row["smoke"] == "True" and not include_smoke:
            smoke += 1
        elif not row["status"].startswith("finished") and not include_running:
            unfinished[row["status"]] += 1
        else:
            rows.append(row)
            curves.append(curve)
    if unreadable == len(files):  # a table of nothing is no answer: a script reading its exit status must know
        raise DataError(f"none of the {len(files):,} results file(s) under {', '.join(map(str, folders))} "
                        "could be read (the warnings above name each and why)")
    if unreadable:
        log.warning("%d of %d results files skipped", unreadable, len(files))
    how = ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items()))
    if left := [f"{n} {kind} run(s){what} ({flag})" for n, kind, what, flag in (
            (smoke, "smoke", "", "--include-smoke"),
            (unfinished.total(), "unfinished", f": {how}", "--include-running")) if n]:  # 1 failed, 2 running
        log.info("left out %s", " and ".join(left))
    for row, label in zip(rows, run_labels([row["folder"] for row in rows]), strict=True):
        row["run"] = label  # two runs of one name (a copy) are told apart by the folders above them
    for row in rows:
        if row["non_finite"]:
            log.warning("%s: non-finite %s", row["run"], row["non_finite"].replace(",", ", "))
    return pd.DataFrame(rows, columns=list(read_row_columns())), dict(zip([r["run"] for r in rows], curves))


def read_row_columns() -> dict:
    """The columns of ``read_row``, in order (for an empty frame)."""
    return dict.fromkeys(["run", "method", "feed", "data", "data_files", "image_files", "text_weights",
                          "image_weights", "status", *RUN_KEYS,
                          "best_epoch", "epochs_run", VALID_COLUMN, *(f"test_{m}" for m in TABLED),
                          "train_s_per_epoch", "trainable_params", "peak_gib", "device", "folder", "written",
                          "non_finite"])
