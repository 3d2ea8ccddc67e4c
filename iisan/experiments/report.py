"""Tables of runs: one row per ``results.json`` found under the given folders (pandas does the
grouping and the CSV).

    iisan results runs/                          # markdown table of every finished run
    iisan results runs/ --keys lr,seed --csv runs.csv
    iisan results runs/ --average-seeds          # mean and standard deviation over seeds
    iisan results runs/ --curves curves.png      # validation HR@10 and loss per epoch of every run

Runs are told apart by every config key whose value differs between them, except those that never make
two experiments: the seed, names and paths of outputs (run name, folders), and how a run was executed
(device, workers, chunk sizes, progress bars; ``checkpoint.MAY_CHANGE``). Data sets are compared by name
(the users file's folder, found from the run's working folder; with a digest of the files' contents, and
of the image LMDB's records, where one name covers other files or images) and encoders by their folder's
name, with its parent's where two encoders share a name (``labels``), so the same data or encoder under two
roots is one experiment. Layers left to automatic selection (``layer_rule``) show as ``auto``; a key the run
never reads (``methods.unread_keys``: SASRec-ID's encoders and images, FFT's LoRA rank) and a learning rate
it trains nothing with (IISAN's adapter rate in an FFT run) as ``-``, which differs from no value. Those differing
keys are columns of the table, in the rows' order (numbers by value, then the run's name; ``--sort``
orders by another column), and ``--average-seeds`` averages only runs that agree on all of them, each
seed once: the same seed run twice (a copy, a rerun under another name) counts once, the others named in
the log (``one_per_seed``).

Smoke runs and runs that have not finished (running, stopped: said running but held by no process,
failed, interrupted) are left out, counted in the log, unless asked for (``--include-smoke``,
``--include-running``). A metric that is NaN or infinite is marked ``non-finite`` (a mean over seeds
that includes one is non-finite too, never silently dropped). A results file that cannot be read, or
whose fields are missing or of the wrong type (``results_file.check_results``), is skipped, counted and
named in the log with the field at fault, never a crash. A run given several ways (its folder, a folder
above it, its results.json) counts once. """

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..bounds import LEARNING_RATES
from ..config import METHOD_NAMES, Config
from ..data.run_data import recorded_digest
from ..errors import ConfigError, UserError
from ..files import atomic_path, claim_output
from ..flags import close_match
from ..methods import unread_keys
from ..train.checkpoint import MAY_CHANGE
from .labels import data_labels, encoder_labels, run_labels
from .results_file import METRICS, DamagedResults, csv_header, find_results, load_results, status

log = logging.getLogger(__name__)

NUMBERS = ("valid_hit@10", *(f"test_{m}" for m in METRICS), "train_s_per_epoch")
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
    ``0,2,4``, layers left to automatic selection (None) as ``auto``. Encoder paths stay whole here: how
    much of one the table shows depends on the others (``encoder_labels``)."""
    if key in LAYER_KEYS and value is None:
        return "auto"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _written(path: Path) -> float | None:
    """When a results file was last written (a run rewrites it as it ends; the file records no time)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def read_row(path: Path, results: dict) -> dict:
    """One row: the run, its status, every config key (as text; a key the file predates at its
    default), the metrics at the best-validation epoch, timings, parameters and memory. ``results``
    has passed ``check_results``."""
    cfg = {**Config().to_dict(), **results["config"]}
    users = Path(results.get("working_dir") or "", cfg["users"])  # a relative path: from where the run ran
    test, valid = results.get("test") or {}, results.get("valid") or {}
    memory = results.get("peak_memory") or {}
    ended = status(path, results)
    row = {
        "run": path.parent.name,
        "method": results["method"],
        "feed": "-" if results["method"] == METHOD_NAMES["id"] else results["feed"],  # no encoder to feed
        "data": users.parent.name or users.stem,  # Dataset/Scientific/... -> Scientific
        # what the data files held (older results: their paths), and the images read ('' for none), to tell
        # apart data sets that share a name (``labels.data_labels``)
        "data_files": ":".join(str(results.get(f"{k}_fingerprint") or cfg[k]) for k in ("users", "items")),
        "image_files": images_read(results, cfg),
        # a run --nonfinite authors ended at a NaN is finished, with the best epoch before it: said apart
        "status": "finished (NaN)" if results.get("stopped") and ended == "finished" else ended,
        **{k: config_text(k, cfg[k]) for k in CONFIG_KEYS},
        # a run resumed under other counts of processes (torchrun) is shown as such: "2+1"
        "processes": "+".join(map(str, results.get("world_sizes") or [results.get("world_size", 1)])),
        "best_epoch": results["best_epoch"] if results["best_epoch"] >= 0 else None,  # -1: no epoch ended yet
        "epochs_run": len(results["epochs"]),
        "valid_hit@10": valid.get("hit@10"),
        **{f"test_{m}": test.get(m) for m in METRICS},
        "train_s_per_epoch": (results.get("timing") or {}).get("train_seconds_per_epoch"),
        "trainable_params": results["parameters"]["trainable"],
        "peak_gib": memory.get("max_allocated_gib", memory.get("peak_rss_gib")),
        "device": results["device"],
        "folder": str(path.parent),
        "written": _written(path),
    }
    stored = set(((results.get("step") or {}).get("cache_dtypes") or {}).values())
    if cfg["cache_dtype"] == "auto" and stored:  # what auto came to: runs on caches of two precisions differ
        row["cache_dtype"] = ",".join(sorted(stored))
    # keys the run never read (a live run's cache precision; SASRec-ID's encoders and images; FFT's LoRA rank)
    row.update(dict.fromkeys(unread_keys(cfg["method"], cfg["towers"], cfg["feed"]) & set(CONFIG_KEYS), UNUSED))
    by_rate = results["parameters"].get("by_rate")  # absent from files before 2026-12: every rate shown
    row.update({k: UNUSED for k in LEARNING_RATES if by_rate is not None and k not in by_rate})
    row["non_finite"] = ",".join(c for c in NUMBERS if row[c] is not None and not math.isfinite(row[c]))
    return row


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
    """Validation HR@10 and training loss per epoch of a run, and its best-validation epoch."""
    epochs = results["epochs"]
    return {"epoch": [e["epoch"] for e in epochs], "valid_hit@10": [e["valid"]["hit@10"] for e in epochs],
            "loss": [e["loss"] for e in epochs], "best_epoch": results["best_epoch"]}


def collect(folders: list[str], keys: list[str] = (), include_smoke: bool = False,
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
    rows, curves, unreadable, smoke, unfinished = [], [], 0, 0, 0
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
            unfinished += 1
        else:
            rows.append(row)
            curves.append(curve)
    if unreadable:
        log.warning("%d of %d results files skipped", unreadable, len(files))
    if smoke or unfinished:
        log.info("left out %d smoke run(s) (--include-smoke) and %d unfinished run(s) (--include-running)",
                 smoke, unfinished)
    for row, label in zip(rows, run_labels([row["folder"] for row in rows]), strict=True):
        row["run"] = label  # two runs of one name (a copy) are told apart by the folders above them
    for row in rows:
        if row["non_finite"]:
            log.warning("%s: non-finite %s", row["run"], row["non_finite"].replace(",", ", "))
    return pd.DataFrame(rows, columns=list(read_row_columns())), dict(zip([r["run"] for r in rows], curves))


def read_row_columns() -> dict:
    """The columns of ``read_row``, in order (for an empty frame)."""
    return dict.fromkeys(["run", "method", "feed", "data", "data_files", "image_files", "status", *RUN_KEYS,
                          "best_epoch", "epochs_run", "valid_hit@10", *(f"test_{m}" for m in METRICS),
                          "train_s_per_epoch", "trainable_params", "peak_gib", "device", "folder", "written",
                          "non_finite"])


def differing_keys(frame: pd.DataFrame, ignored: frozenset = NOT_EXPERIMENT) -> list[str]:
    """Config keys (and ``processes``) whose values differ between the runs that use them, except the
    ``ignored`` ones: IISAN's adapter rate beside FFT, which has no adapters, is not a difference."""
    return [k for k in RUN_KEYS if k not in ignored and frame[k][frame[k] != UNUSED].nunique(dropna=False) > 1]


def _order(value) -> tuple:
    """How ``in_order`` sorts a cell: numbers by value (``1e-05`` before ``0.0002``), before any text."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    return (0, number, text) if not math.isnan(number) else (1, 0.0, text)


def in_order(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The rows ordered by ``columns`` (by the first, ties by the next, ...), each cell by ``_order``."""
    order = sorted(range(len(frame)), key=lambda i: tuple(_order(frame[c].iat[i]) for c in columns))
    return frame.iloc[order].reset_index(drop=True)


def one_per_seed(frame: pd.DataFrame, group: list[str]) -> pd.DataFrame:
    """The runs, one per seed of each configuration (the ``group`` columns): the same configuration and
    seed in two folders (a copy; a stopped run rerun under another name) is one experiment, not two
    seeds. The run kept is the one whose results.json was written last; each left out is named in a
    warning with the run kept in its place."""
    frame = frame.reset_index(drop=True)
    kept, left_out = [], []
    for _, runs in frame.groupby([*group, "seed"], sort=False, dropna=False):
        newest = runs.sort_values("written", kind="stable", na_position="first").index[-1]
        kept.append(newest)
        left_out += [f"{frame.at[i, 'folder']} (seed {frame.at[i, 'seed']}; kept {frame.at[newest, 'folder']})"
                     for i in runs.index if i != newest]
    if not left_out:
        return frame
    log.warning("--average-seeds: left out %d run(s) that repeat a seed of their configuration, keeping the one "
                "whose results.json was written last: %s", len(left_out), ", ".join(left_out))
    return frame.loc[sorted(kept)]


def table(frame: pd.DataFrame, keys: list[str] = (), average_seeds: bool = False) -> pd.DataFrame:
    """The runs (or, with ``average_seeds``, one row per configuration over one run per seed:
    ``one_per_seed``), with the ``keys`` asked for and every differing key as columns, the rows in
    order of those columns (``in_order``; the seed last), then of the run's name. ``attrs["runs"]``: the
    runs the table counts (their curves are the ones to draw)."""
    frame = frame.assign(data=data_labels(frame), **{k: frame[k].map(encoder_labels(frame[k])) for k in ENCODER_KEYS})
    # One row per run shows the seed too when it differs; averaging groups by the rest.
    ignored = NOT_EXPERIMENT if average_seeds else NOT_EXPERIMENT - {"seed"}
    fixed = ("method", "feed", "data")  # columns of every table already
    shown = [k for k in dict.fromkeys([*keys, *differing_keys(frame, ignored)]) if k not in fixed]
    status = ["status"] if (frame["status"] != "finished").any() else []
    if not average_seeds:
        shown = [k for k in shown if k != "device"]  # where each run ran: a column of every such table
        runs = frame[["run", "method", "feed", "data", *status, *shown, "best_epoch", "epochs_run", *NUMBERS,
                      "trainable_params", "peak_gib", "device", "non_finite"]]
        # The seeds of one configuration side by side: the seed orders after every other key.
        runs = in_order(runs, [*fixed, *sorted(shown, key=lambda k: k == "seed"), "run"])
        runs.attrs["runs"] = runs["run"].tolist()
        return runs
    group = ["method", "feed", "data", *status, *(k for k in shown if k != "seed")]
    counted = one_per_seed(frame, group)
    grouped = counted.groupby(group, sort=False, dropna=False)
    numbers = grouped[list(NUMBERS)]
    out = grouped.size().rename("seeds").to_frame()
    out = out.join(numbers.agg(lambda s: s.mean(skipna=False)))  # one non-finite member: a non-finite mean
    spread = numbers.agg(lambda s: s.std(ddof=1) if len(s) > 1 else np.nan)  # no spread from one seed
    out = out.join(spread.add_suffix("_std"))
    out["trainable_params"] = grouped["trainable_params"].first()
    out["non_finite"] = grouped["non_finite"].agg(lambda s: ",".join(sorted(set(",".join(s).split(",")) - {""})))
    out = in_order(out.reset_index(), [c for c in group if c != "status"])
    out.attrs["runs"] = counted["run"].tolist()
    return out


def sorted_by(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """``table``'s rows by ``column``, descending (missing values last); any column but the non-finite
    marks, which the table shows in the cells they mark."""
    columns = [c for c in frame.columns if c != "non_finite"]
    if column not in columns:
        raise ConfigError(f"--sort {column}: not a column; columns are {', '.join(columns)}")
    return frame.sort_values(column, ascending=False, kind="stable", na_position="last")


def average_rows(rows: list[dict]) -> list[dict]:
    """``table(..., average_seeds=True)`` of ``read_row`` rows, as dicts; a spread that cannot be
    computed (one seed) is None."""
    frame = table(pd.DataFrame(rows, columns=list(read_row_columns())), [], average_seeds=True)
    return [{k: None if k.endswith("_std") and not (isinstance(v, float) and math.isfinite(v)) else v
             for k, v in row.items()} for row in frame.to_dict("records")]


# One format for every number of a column, whatever its size (not 65.4 beside 7.3691).
FORMATS = {**dict.fromkeys(NUMBERS, ".4f"), "train_s_per_epoch": ".1f", "peak_gib": ".2f",
           "best_epoch": ".0f", "epochs_run": ".0f"}  # counts: a column of None and ints is float in pandas


def _cell(value, column: str, non_finite: bool) -> str:
    if non_finite:
        return "non-finite"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in FORMATS and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return format(value, FORMATS[column])
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no runs to show)\n"
    columns = [c for c in frame.columns if not c.endswith("_std") and c != "non_finite"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.to_dict("records"):
        bad = set(filter(None, row["non_finite"].split(",")))
        cells = []
        for c in columns:
            std = row.get(f"{c}_std")
            spread = f" ± {std:.4f}" if c in NUMBERS and c != "train_s_per_epoch" and std is not None and \
                math.isfinite(std) and c not in bad else ""
            cells.append(_cell(row[c], c, c in bad) + spread)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Every column a table of runs can have (``table``): one row per run, or one per configuration over seeds.
TABLE_COLUMNS = frozenset([*read_row_columns(), *KEYS, "seeds", *(f"{c}_std" for c in NUMBERS)])


def _is_table(path: Path) -> bool:
    names = (path.is_file() and csv_header(path)) or [""]
    return names[0] in ("run", "method") and set(names) <= TABLE_COLUMNS


def claim_csv(path: str | Path) -> None:
    """A file already at ``path`` may be replaced only when it is a table this command wrote: a header row
    (``csv_header``) of ``TABLE_COLUMNS`` alone, ``run`` or ``method`` first. Checked before any reading."""
    claim_output(path, _is_table, "a results table IISAN wrote", "--csv", overwrite=True)


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """All columns (standard deviations and the non-finite marks included), written atomically
    (``claim_csv`` first)."""
    claim_csv(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)
