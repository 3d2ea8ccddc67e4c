"""Tables of finished runs: one row per ``results.json`` found under the given folders.

    iisan results runs/                          # markdown table of every run
    iisan results runs/ --keys lr,seed --csv runs.csv
    iisan results runs/ --average-seeds          # mean and standard deviation over seeds
    iisan results runs/ --curves curves.png      # validation HR@10 and loss per epoch of every run

A sweep writes one run folder per grid point; this turns the folders into the table a paper reports.
A results file that cannot be read is skipped, counted and named in the log, never a crash.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ConfigError
from ..files import atomic_path

log = logging.getLogger(__name__)

METRICS = ("hit@10", "ndcg@10", "hit@20", "ndcg@20")


def find_results(folders: list[str]) -> list[Path]:
    """Every results.json under ``folders`` (a results.json itself is accepted too), sorted."""
    found: list[Path] = []
    for folder in map(Path, folders):
        if folder.is_file() and folder.name == "results.json":
            found.append(folder)
        elif folder.is_dir():
            found += sorted(folder.rglob("results.json"))
        else:
            raise ConfigError(f"{folder} is neither a run folder nor a results.json")
    if not found:
        raise ConfigError(f"no results.json under {', '.join(folders)} (runs write one when they finish)")
    return found


def read_row(path: Path, results: dict, keys: list[str]) -> dict:
    """One table row from the results of a run; ``keys``: config keys shown as extra columns."""
    cfg, test, valid = results["config"], results["test"], results["valid"]
    memory = results.get("peak_memory", {})
    return {
        "run": path.parent.name,
        "method": results["method"],
        "feed": results["feed"],
        "data": Path(cfg["users"]).parent.name or Path(cfg["users"]).stem,  # Dataset/Scientific/... -> Scientific
        **{k: str(cfg[k]) for k in keys},  # as configured (0.001, not 0.0010)
        "best_epoch": results["best_epoch"],
        "epochs": len(results["epochs"]),
        "valid_hit@10": valid["hit@10"],
        **{f"test_{m}": test[m] for m in METRICS},
        "train_s_per_epoch": results["timing"]["train_seconds_per_epoch"],
        "trainable_params": results["parameters"]["trainable"],
        "peak_gib": memory.get("max_allocated_gib", memory.get("peak_rss_gib")),
        "device": results["device"],
    }


def read_curve(results: dict) -> dict[str, list]:
    """Validation HR@10 and training loss per epoch of a run, and its best-validation epoch."""
    epochs = results["epochs"]
    return {"epoch": [e["epoch"] for e in epochs], "valid_hit@10": [e["valid"]["hit@10"] for e in epochs],
            "loss": [e["loss"] for e in epochs], "best_epoch": results["best_epoch"]}


def collect(folders: list[str], keys: list[str]) -> tuple[list[dict], dict[str, dict[str, list]]]:
    """The table row and the curve (by run name) of every readable results file, each file read once."""
    unknown = [k for k in keys if k not in Config.__dataclass_fields__]
    if unknown:
        raise ConfigError(f"--keys: unknown config key(s) {', '.join(unknown)}; see `iisan train --help`")
    files = find_results(folders)
    rows, curves = [], {}
    for path in files:
        try:
            results = json.loads(path.read_text())
            row, curve = read_row(path, results, keys), read_curve(results)
        except (OSError, ValueError, KeyError, TypeError) as err:  # ValueError covers bad JSON
            log.warning("skipping %s: %s", path, f"{type(err).__name__}: {err}".splitlines()[0])
            continue
        rows.append(row)
        curves[path.parent.name] = curve
    if len(rows) < len(files):
        log.warning("%d of %d results files skipped", len(files) - len(rows), len(files))
    return rows, curves


def average_seeds(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows that differ only in their seed (and run name) become one: metrics and times as mean and
    sample standard deviation (none for a single seed), with the number of seeds."""
    group_by = ["method", "feed", "data"] + [k for k in keys if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row[k]) for k in group_by), []).append(row)
    out = []
    for members in groups.values():
        merged = {k: members[0][k] for k in group_by}
        merged["seeds"] = len(members)
        for name in ["valid_hit@10", *(f"test_{m}" for m in METRICS), "train_s_per_epoch"]:
            values = np.array([m[name] for m in members], dtype=float)
            merged[name] = float(values.mean())
            merged[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None  # no spread from one
        merged["trainable_params"] = members[0]["trainable_params"]
        out.append(merged)
    return out


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no readable results)\n"
    columns = [c for c in rows[0] if not c.endswith("_std")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            std = row.get(f"{c}_std")
            cells.append(_cell(row[c]) + (f" ± {std:.4f}" if std is not None and c != "train_s_per_epoch" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """All columns (standard deviations included), written atomically."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def plot_curves(folders: list[str], path: str | Path) -> dict[str, dict[str, list]]:
    """``draw_curves`` of every readable run under ``folders``; returns the plotted series."""
    _, curves = collect(folders, [])
    draw_curves(curves, path)
    return curves


def draw_curves(curves: dict[str, dict[str, list]], path: str | Path) -> None:
    """Validation HR@10 and training loss per epoch, one line per run, the best-validation epoch
    marked; written atomically to ``path`` (PNG)."""
    import matplotlib  # deferred: heavy, and only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg back end (no display here)

    fig, (hit_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, s in curves.items():
        (line,) = hit_ax.plot(s["epoch"], s["valid_hit@10"], marker=".", label=name)
        if s["best_epoch"] in s["epoch"]:
            best = s["epoch"].index(s["best_epoch"])
            hit_ax.plot(s["best_epoch"], s["valid_hit@10"][best], "*", markersize=12, color=line.get_color())
        loss_ax.plot(s["epoch"], s["loss"], marker=".", label=name, color=line.get_color())
    hit_ax.set(title="validation HR@10 (star: best epoch, where test is reported)", xlabel="epoch")
    loss_ax.set(title="training loss", xlabel="epoch")
    hit_ax.legend(fontsize=7)
    for ax in (hit_ax, loss_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
