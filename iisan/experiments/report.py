"""Tables of runs, from the rows ``report_rows.collect`` reads, one per ``results.json`` (pandas does the
grouping and the CSV).

    iisan results runs/                          # markdown table of every finished run
    iisan results runs/ --keys lr,seed --csv runs.csv
    iisan results runs/ --average-seeds          # mean and standard deviation over seeds
    iisan results runs/ --curves curves.png      # validation HR@10 and loss per epoch of every run

Runs are told apart by every config key whose value differs between them, except those that never make
two experiments: the seed, names and paths of outputs (run name, folders), and how a run was executed
(device, workers, chunk sizes, progress bars; ``methods.MAY_CHANGE``). Data sets are compared by name
(the users file's folder, found from the run's working folder; with a digest of the files' contents, and
of the image LMDB's records, where one name covers other files or images) and encoders by their folder's
name, with its parent's where two encoders share a name (``labels``), so the same data or encoder under two
roots is one experiment. Layers left to automatic selection (``layer_rule``) show as ``auto``; a key the run
never reads (``methods.unread_keys``: SASRec-ID's encoders and images, FFT's LoRA rank) and a learning rate
it trains nothing with (IISAN's adapter rate in an FFT run) as ``-``, which differs from no value. Those differing
keys are columns of the table, in the rows' order (numbers by value, then the run's name; ``--sort``
orders by another column), and ``--average-seeds`` averages only runs that agree on all of them, each
seed once: the same seed run twice (a copy, a rerun under another name) counts once, the others named in
the log (``one_per_seed``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..claims import claim_output
from ..console import fixed
from ..errors import ConfigError
from ..files import atomic_path
from ..metric_names import stored
from .labels import data_labels, encoder_labels, weights_apart
from .report_rows import ENCODER_KEYS, KEYS, NOT_EXPERIMENT, NUMBERS, RUN_KEYS, UNUSED, read_row_columns
from .results_file import csv_header

log = logging.getLogger(__name__)

# Averaged only over seeds that ran on one device (the metrics are, where they ran in one precision: ``amp``
# shows what each run trained in, so seeds of two precisions are two rows)
ON_ONE_DEVICE = ["train_s_per_epoch", "train_s_per_epoch_std", "peak_gib"]


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
    seeds. The run kept is the one that ended last (its last epoch's ``ended_at``; without one, its results.json's
    time); each left out is named in a warning with the run kept in its place."""
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
                "that ended last: %s", len(left_out), ", ".join(left_out))
    return frame.loc[sorted(kept)]


def table(frame: pd.DataFrame, keys: Sequence[str] = (), average_seeds: bool = False) -> pd.DataFrame:
    """The runs (or, with ``average_seeds``, one row per configuration over one run per seed:
    ``one_per_seed``), with the ``keys`` asked for and every differing key as columns, the rows in
    order of those columns (``in_order``; the seed last), then of the run's name. ``attrs["runs"]``: the
    runs the table counts (their curves are the ones to draw)."""
    frame = frame.assign(data=data_labels(frame), **{k: weights_apart(frame, k, frame[k].map(encoder_labels(frame[k])))
                                                     for k in ENCODER_KEYS})
    # One row per run shows the seed too when it differs; averaging groups by the rest.
    ignored = NOT_EXPERIMENT if average_seeds else NOT_EXPERIMENT - {"seed"}
    always = ("method", "feed", "data")  # columns of every table already
    shown = [k for k in dict.fromkeys([*keys, *differing_keys(frame, ignored)]) if k not in always]
    status = ["status"] if (frame["status"] != "finished").any() else []
    if not average_seeds:
        shown = [k for k in shown if k != "device"]  # where each run ran: a column of every such table
        runs = frame[["run", "method", "feed", "data", *status, *shown, "best_epoch", "epochs_run", *NUMBERS,
                      "trainable_params", "peak_gib", "device", "non_finite"]]
        # The seeds of one configuration side by side: the seed orders after every other key.
        runs = in_order(runs, [*always, *sorted(shown, key=lambda k: k == "seed"), "run"])
        runs.attrs["runs"] = runs["run"].tolist()
        say_still_improving(frame, averaged=False)
        return runs
    if "seed" in keys:
        log.warning("--keys seed: --average-seeds averages over the seeds, so no row has one (the seeds column "
                    "counts them)")
    group = ["method", "feed", "data", *status, *(k for k in shown if k != "seed")]
    counted = one_per_seed(frame, group)
    say_still_improving(counted, averaged=True)
    grouped = counted.groupby(group, sort=False, dropna=False)
    numbers = grouped[list(NUMBERS)]
    out = grouped.size().rename("seeds").to_frame()
    out = out.join(numbers.agg(lambda s: s.mean(skipna=False)))  # one non-finite member: a non-finite mean
    spread = numbers.agg(lambda s: s.std(ddof=1) if len(s) > 1 else np.nan)  # no spread from one seed
    out = out.join(spread.add_suffix("_std"))
    out["trainable_params"] = grouped["trainable_params"].first()
    if (counts := grouped["trainable_params"].nunique()).gt(1).any():  # seeds of one model count alike: not so here
        out.loc[counts > 1, "trainable_params"] = np.nan
        log.warning("--average-seeds: %d row(s) average runs of different parameter counts, so of different "
                    "models: the table without --average-seeds shows each run's", int((counts > 1).sum()))
    out["peak_gib"] = grouped["peak_gib"].mean()  # memory: the paper's third axis of efficiency, beside time
    if "device" not in group:  # (--keys device: a row per device already)
        kinds = grouped["device"].nunique(dropna=False)
        out["device"] = grouped["device"].first().where(kinds == 1, kinds.astype(str) + " devices")
        out.loc[kinds > 1, ON_ONE_DEVICE] = np.nan  # no one device's: a CPU's resident memory beside a GPU's peak
        if (kinds > 1).any():
            log.warning("--average-seeds: %d row(s) average seeds run on different devices: their time per epoch "
                        "and peak memory are left out (the table without --average-seeds shows each run's)",
                        int((kinds > 1).sum()))
    out["non_finite"] = grouped["non_finite"].agg(lambda s: ",".join(sorted(set(",".join(s).split(",")) - {""})))
    out = in_order(out.reset_index(), [c for c in group if c != "status"])
    out.attrs["runs"] = counted["run"].tolist()
    return out


def say_still_improving(frame: pd.DataFrame, averaged: bool) -> None:
    """Count the finished runs of ``frame`` (those a table counts) that chose their last epoch as the best."""
    finished = frame[frame["status"] == "finished"]
    if improving := int((finished["best_epoch"] == finished["epochs_run"] - 1).sum()):  # --epochs ran out first
        log.info("%d of %d finished run(s) chose their last epoch as the best: still improving when their epochs "
                 "ran out, so more epochs may change these numbers and their order%s", improving, len(finished),
                 " (the table without --average-seeds shows each run's best_epoch and epochs_run)" * averaged)


def sorted_by(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """``table``'s rows by ``column``, descending (missing values last); any column but the non-finite
    marks, which the table shows in the cells they mark."""
    columns = [c for c in frame.columns if c != "non_finite"]
    given, column = column, stored(column)  # the paper's names too: valid_HR@10 is valid_hit@10, in any case
    column = next((c for c in columns if c.lower() == column.lower()), column)
    if column not in columns:
        meant = [c for c in columns if c.endswith(f"_{column}")]  # HR@10: valid_hit@10 or test_hit@10?
        hint = f"did you mean {' or '.join(meant)}? " if meant else ""
        raise ConfigError(f"--sort {given or repr(given)}: not a column; {hint}columns are {', '.join(columns)}")
    return frame.sort_values(column, ascending=False, kind="stable", na_position="last")


def average_rows(rows: list[dict]) -> list[dict]:
    """``table(..., average_seeds=True)`` of ``read_row`` rows, as dicts; a spread that cannot be
    computed (one seed) is None."""
    frame = table(pd.DataFrame(rows, columns=list(read_row_columns())), [], average_seeds=True)
    return [{k: None if k.endswith("_std") and not (isinstance(v, float) and math.isfinite(v)) else v
             for k, v in row.items()} for row in frame.to_dict("records")]


def seconds(value: float) -> str:
    """Seconds with one decimal, and below 1 s as many as keep two significant digits ('0.045', not '0.0')."""
    if not math.isfinite(value) or value == 0 or abs(value) >= 0.95:
        return f"{value:.1f}"
    return f"{value:.{1 - math.floor(math.log10(abs(value)))}f}"


def count(value: float) -> str:
    """A count, also where pandas made its column float (None beside ints): 262,351, not 262351.0; 7,936 too, as a
    column holds one format (not 7936 above 11,840)."""
    if not math.isfinite(value):
        return str(value)
    return f"{int(value):,}"


# One format for every number of a column, whatever its size (not 65.4 beside 7.3691); seconds keep small ones.
FORMATS = {**dict.fromkeys(NUMBERS, fixed), "train_s_per_epoch": seconds, "peak_gib": ".2f",
           **dict.fromkeys(("best_epoch", "epochs_run", "trainable_params"), count)}


def _cell(value, column: str, non_finite: bool) -> str:
    if non_finite:
        return "non-finite"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in FORMATS and isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        how = FORMATS[column]
        return how(value) if callable(how) else format(value, how)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value).replace("|", "\\|")  # a run named a|b is one cell, not two


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
            spread = f" ± {fixed(std)}" if c in NUMBERS and c != "train_s_per_epoch" and std is not None and \
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
    (``claim_csv`` first). A key a run never reads (the table's ``-``) is an empty cell, so that a column of
    learning rates reads back as numbers."""
    claim_csv(path)
    keys = [c for c in frame.columns if c in RUN_KEYS]
    frame = frame.assign(**{c: frame[c].replace(UNUSED, "") for c in keys})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)
