"""Figures and markdown tables of efficiency benchmark results (``benchmark.run_benchmark``'s JSON):
time per step and epoch, items and padding per step, peak memory, trainable parameters and TPME per
method, the authors'-way rows beside the default ones, the cache build and the evaluation, and a text
that says what each row measures. A table or figure already at its path is replaced only when this
module wrote it (the table's first line, the figure's Creator metadata); anything else there is refused
before anything is written."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.patches
from matplotlib.figure import Figure  # drawn without pyplot: no backend is chosen (a notebook's stays its own)
from PIL import Image

from ..claims import claim_output
from ..errors import DataError
from ..files import atomic_path, starts_with
from .report_checks import EXPECTED, read_benchmark
from .report_notes import notes, quick_check
from .rows import MIN_STEPS, MIN_WARMUP, memory_gib


def plain(value: float) -> str:
    """Three significant digits without e-notation, which a time of 1,000 s or more, or ms, took: 1,140 (not
    1.14e+03), 43.5, 0.0673."""
    return f"{value:,.0f}" if abs(value) >= 999.5 else f"{value:.3g}"


def millions(count: float) -> str:
    """A parameter count as a figure labels it: 8.03 B (an LLM's FFT), 195 M, 4.97 M, 797 k (the table says
    194.90 M)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale * 0.9995:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f}"


def memory_label(payload: dict) -> str:
    rows = [r for r in payload["rows"] if "memory" in r]
    if rows and "max_allocated_gib" in rows[0]["memory"]:
        return "peak GPU memory allocated (GiB)"
    return "peak process resident memory (GiB)"


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.0f} %"


def training_line(r: dict, gpu: bool, columns: int) -> str:
    """One row of the training table; fields older results lack are left empty."""
    if "error" in r:
        return f"| {r['label']} | | | failed: {r['error']} |" + " |" * (columns - 4)
    mem = r["memory"]
    memory = f"{mem['max_allocated_gib']:.2f} | {mem['max_reserved_gib']:.2f}" if gpu else f"{mem['peak_rss_gib']:.2f}"
    items = f"{r['items_per_step']:.0f}" if "items_per_step" in r else ""
    rows = f"{r['encoded_rows_per_step']:.0f}" if "encoded_rows_per_step" in r else items
    if "distinct_rows_per_step" in r:  # the towers that take each distinct item once: their own count
        items, rows = f"{items} / {r['distinct_items_per_step']:.0f}", f"{rows} / {r['distinct_rows_per_step']:.0f}"
    padding = " / ".join(percent(r[k]) for k in ("padding_overhead_items", "padding_overhead_flops")
                         if r.get(k) is not None)
    if r.get("distinct_padding_overhead_items") is not None:  # the rows of the towers by item, padded apart
        padding += f" (by item: rows {percent(r['distinct_padding_overhead_items'])})"
    p90 = f"{r['p90_seconds_per_step']:.4g}" if "p90_seconds_per_step" in r else ""
    full = f"{r['full_epoch_seconds']:.2f}" if "full_epoch_seconds" in r else ""
    rate = f"{r['model_tflops_per_second']:.3g}" if "model_tflops_per_second" in r else ""
    tpme = f"{r['tpme']:.3f}" if "tpme" in r else ""
    return (f"| {r['label']} | {r.get('encodes', '')} | {r['batch_size']} | {items} | {rows} | {padding} | "
            f"{r['seconds_per_step']:.4g} | {p90} | {r['epoch_seconds']:.2f} | {full} | {rate} | {memory} | "
            f"{r['trainable_params'] / 1e6:.2f} M | {tpme} |")


def tasks_table(payload: dict) -> list[str]:
    """The cache build and the full-ranking evaluation of every user, as rows of their own."""
    lines = []
    evaluation, cache = payload.get("evaluation") or {}, payload.get("cache_build") or {}
    if "evaluation_seconds" in evaluation:
        runs = (evaluation.get("evaluation_times") or {}).get("count", "")  # older JSONs: unrecorded
        lines.append(f"| {evaluation['label']}: every one of {evaluation['users']:,} users ranked over all "
                     f"{evaluation['items']:,} items, item table included | {runs} | "
                     f"{evaluation['evaluation_seconds']:.3g} | {evaluation['p90_evaluation_seconds']:.3g} | "
                     f"{memory_gib(evaluation):.2f} |")
    elif evaluation:
        lines.append(f"| evaluation | | failed: {evaluation.get('error')} | | |")
    if "cache_build_seconds" in cache:
        parts = [f"{name} {plain(cache[key])} s" for name, key in (("loading data and encoders", "load_seconds"),
                 ("encoding", "encode_seconds"), ("assembling the files", "assemble_seconds")) if key in cache]
        parts = f" ({', '.join(parts)})" if parts else ""
        stored = f", stored in {cache['cache_dtype']}" if "cache_dtype" in cache else ""  # older JSONs: unrecorded
        lines.append(f"| cache build, both towers{stored}{parts} | 1 | {cache['cache_build_seconds']:.1f} | "
                     f"| {memory_gib(cache):.2f} |")  # one run: its time, no p90
    elif cache:
        lines.append(f"| cache build | | failed: {cache.get('error')} | | |")
    head = "| task | runs | s (median of the runs) | s (p90) | memory GiB |"
    return [head, "|---|---|---|---|---|", *lines] if lines else []


def table(payload: dict) -> str:
    gpu = any("max_allocated_gib" in r.get("memory", {}) for r in payload["rows"])
    memory = "allocated GiB | reserved GiB" if gpu else "peak RSS GiB"
    head = ("| method | encodes | batch | items / step | rows / step | padding (rows / FLOPs) | s / step | "
            f"p90 s / step | s / epoch | full epoch s | model TFLOP/s | {memory} | trainable params | TPME |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns] + [training_line(r, gpu, columns) for r in payload["rows"]]
    tasks = tasks_table(payload)
    return "\n".join(lines) + "\n\n" + ("\n".join(tasks) + "\n\n" if tasks else "") + "\n".join(notes(payload)) + "\n"


TABLE_HEAD = "# Efficiency: "  # the first line of every table ``write_reports`` writes
CREATOR = "IISAN efficiency figures"  # in the PNG metadata of every figure ``figure`` draws
SIZE = (1980, 462)  # pixels of ``figure``'s PNG (18 x 4.2 in at 110 dpi)


def is_table(path: Path) -> bool:
    """A markdown table ``write_reports`` wrote: its first line names the benchmark."""
    return starts_with(path, TABLE_HEAD)


def is_figure(path: Path) -> bool:
    """A PNG ``figure`` drew: its Creator metadata, or (drawn before the figures carried one) a matplotlib
    PNG of exactly this figure's size."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 24:
        return False
    try:  # the Creator text chunk itself, not the words anywhere in the file
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:  # the bytes read above, not the file again
            if image.info.get("Creator") == CREATOR:
                return True
    except Exception:  # a damaged PNG (PIL raises assorted types): not ours
        return False
    size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
    return size == SIZE and b"Software\x00Matplotlib" in data


def is_benchmark(path: Path) -> bool:
    """A benchmark JSON ``benchmark.run_benchmark`` wrote (``read_benchmark`` takes it)."""
    try:
        read_benchmark(path)
    except (DataError, OSError):
        return False
    return True


def claim_table(path: Path, flag: str) -> None:
    """A file at ``path`` may be replaced only when it is a table this module wrote (``flag``: the option
    that chose the path)."""
    claim_output(path, is_table, "a benchmark table IISAN wrote", flag, overwrite=True)


def claim_figure(path: Path) -> None:
    claim_output(path, is_figure, "a benchmark figure IISAN drew", "--figs", overwrite=True)


def claim_benchmark(path: Path, flag: str = "--out") -> None:
    claim_output(path, is_benchmark, "a benchmark JSON IISAN wrote", flag, overwrite=True)


def report_paths(path: Path, figs: Path | None) -> tuple[Path, Path | None]:
    """Where ``write_reports`` puts the table and the figure of the benchmark JSON ``path``."""
    path = Path(path)
    if figs is None:
        return path.with_suffix(".md"), None
    run = path.parent.name if path.parent.name != "efficiency" else ""
    return path.with_suffix(".md"), Path(figs) / f"efficiency-{run + '-' if run else ''}{path.stem}.png"


def claim_reports(path: Path, figs: Path | None, flag: str = "--results") -> None:
    """Refuse, in one line, a table or figure ``write_reports`` would replace that IISAN did not write."""
    md, png = report_paths(path, figs)
    claim_table(md, flag)
    if png is not None:
        claim_figure(png)


def figure_title(payload: dict) -> str:
    """Device, setting, encoders and data; for a quick check (--few-steps) also its step counts, so that
    it is not taken for the benchmark's timing."""
    quick = (f"\nquick check: {payload['timed_steps']} timed steps after {payload['warmup_steps']} warm-up (the "
             f"benchmark's timing: {MIN_STEPS} after {MIN_WARMUP})" if quick_check(payload) else "")
    return (f"{payload['device']} | {payload['description']} | {payload['backbones']} encoders, "
            f"{payload['data']} data{quick}")


IISAN_COLOUR, OTHER_COLOUR = "#c44e52", "#4c72b0"


def p90_epochs(rows: list[dict]) -> dict[int, float]:
    """``{position: epoch time at the p90 step}`` of the rows that have both times (older results have no
    p90): the epoch's steps scaled from the median step to the p90 one."""
    return {i: r["p90_seconds_per_step"] * r["epoch_seconds"] / r["seconds_per_step"] for i, r in enumerate(rows)
            if "error" not in r and r.get("p90_seconds_per_step") and r.get("seconds_per_step")}


def figure(payload: dict) -> bytes:
    """The PNG of ``payload``'s default rows, drawn in memory (``write_reports`` writes it): bars on the
    linear panels, points on the parameters' log axis (a bar there starts where the axis happens to, so
    its length says nothing). The time bars are the median step, their whiskers the p90 step (where the
    results hold one). A row that failed keeps its place, marked ``failed``: TPME compares the others only."""
    rows = [r for r in payload["rows"] if r.get("measured", "default") == "default" and ("tpme" in r or "error" in r)]
    labels = [r["label"].replace(" (", "\n(") + ("\n(failed)" if "error" in r else "") for r in rows]
    p90 = p90_epochs(rows)
    panels = [  # title, values, log scale, whiskers' tops, the values' labels (as the tables show them)
        ("training time per epoch (s), training only\nmedian step × steps per epoch"
         + ("; whisker: p90 step" if p90 else ""), [r.get("epoch_seconds") for r in rows], False, p90, plain),
        (memory_label(payload), [memory_gib(r) if "error" not in r else None for r in rows], False, {},
         "{:.2f}".format),
        ("trainable parameters (log scale)", [r.get("trainable_params") for r in rows], True, {}, millions),
        ("TPME, lower is better\n(0: the best of these methods, 1: the worst)", [r.get("tpme") for r in rows], False,
         {}, "{:.3f}".format),
    ]
    fig = Figure(figsize=(18, 4.6), layout="constrained")
    axes = fig.subplots(1, 4)
    colours = [IISAN_COLOUR if r.get("method") == "IISAN" else OTHER_COLOUR for r in rows]
    for ax, (title, values, log_scale, whiskers, label) in zip(axes, panels):
        shown = [(i, v) for i, v in enumerate(values) if v is not None]
        xs, ys = [i for i, _ in shown], [v for _, v in shown]
        if log_scale:
            ax.scatter(xs, ys, s=60, c=[colours[i] for i in xs], zorder=3)
            ax.set_yscale("log")
            ax.margins(y=0.25)
        else:
            ax.bar(xs, ys, color=[colours[i] for i in xs])
            ax.margins(y=0.15)  # room for the values above the bars
        if whiskers:
            ax.errorbar(list(whiskers), [values[i] for i in whiskers],
                        yerr=[[0] * len(whiskers), [top - values[i] for i, top in whiskers.items()]],
                        fmt="none", ecolor="black", elinewidth=1, capsize=3, zorder=3)
        for i, v in shown:  # the value above its bar or point, and above its whisker
            ax.annotate(label(v), (i, max(v, whiskers.get(i, v))), xytext=(0, 4), textcoords="offset points",
                        ha="center", fontsize=7)
        for i, r in enumerate(rows):
            if "error" in r:
                ax.annotate("failed", (i, 0.03), xycoords=("data", "axes fraction"), rotation=90, ha="center",
                            va="bottom", fontsize=8, color="dimgrey")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    legend = [matplotlib.patches.Patch(color=colour, label=label) for colour, label in
              ((IISAN_COLOUR, "IISAN"), (OTHER_COLOUR, "the other methods")) if colour in colours]  # those drawn
    fig.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(figure_title(payload), fontsize=10)
    png = io.BytesIO()
    fig.savefig(png, dpi=110, format="png", metadata={"Creator": CREATOR})
    return png.getvalue()


def benchmark_files(results: list[Path]) -> list[Path]:
    """The JSONs of ``results`` (files, or folders of them, their subfolders included: one per run, as the
    committed ``results/efficiency/h200-run1/``); a ``DataError`` for a path that does not exist or a folder
    without any."""
    files: list[Path] = []
    for entry in map(Path, results):
        if entry.is_dir():
            found = sorted(entry.rglob("*.json"))
            if not found:
                raise DataError(f"no benchmark JSON found under {entry}; {EXPECTED}")
            files += found
        elif entry.exists():
            files.append(entry)
        else:
            raise DataError(f"{entry} does not exist; {EXPECTED}, or a folder of them")
    return files


def write_reports(results: list[Path], figs: Path | None, flag: str = "--results") -> list[Path]:
    """For each JSON in ``results`` (files, or folders of them): ``<name>.md`` beside it (the table, with
    the command and device that produced it) and, unless ``figs`` is None, ``figs/efficiency-<name>.png``.
    Every JSON is read (``read_benchmark`` checks each field), every path to write claimed
    (``claim_reports``; ``flag``: the option that chose the tables' folder), and every table and figure
    made, before anything is written. Returns what it wrote."""
    payloads = {path: read_benchmark(path) for path in benchmark_files(results)}
    for path in payloads:
        claim_reports(path, figs, flag)
    made: dict[Path, bytes] = {}
    for path, payload in payloads.items():
        md, png = report_paths(path, figs)
        made[md] = (f"{TABLE_HEAD}{path.stem}\n\n" + table(payload)).encode()
        if png is not None:
            made[png] = figure(payload)
    for target, data in made.items():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return list(made)
