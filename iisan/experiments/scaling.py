"""How the host-side stages grow with the data (``scripts/benchmark_scale.py``): reading a pairs CSV, ranking
every user over every item on a CPU, checking a loaded cache for NaN and inf, naming a sweep's grid beside
earlier run folders, tokenizing a live feed's title table and encoding evaluation's item table. Each measurement
runs in a process of its own, so that its peak memory is its own, on synthetic inputs of ``size`` times a stage's
base count. Linear growth shows as a flat time per unit; a stage whose memory should not grow with its count
(evaluation, over users) shows a flat peak.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

from ..claims import claim_output
from ..console import progress_bar
from ..errors import UserError, parse_json
from ..files import atomic_path, starts_with, write_json_atomic, write_text_atomic
from ..metric_names import SELECTED_BY
from .curves import LINES, run_styles

log = logging.getLogger(__name__)

# stage: (what grows, its base count, what stays the same)
STAGES = {
    "csv": ("interactions", 50_000, "10 a user, over a tenth as many items"),
    "evaluation": ("users", 4_096, "over 32,000 items of width 64, 10 inputs a user"),
    "cache-check": ("items", 8_192, "x 7 layers x 768, float16"),
    "grid": ("run folders", 500, "beside a grid of 100 points"),
    "title-table": ("titles", 125_000, "of 3 to 12 words, 30 tokens, a tiny BERT's tokenizer"),
    "item-table": ("items", 125_000, "of width 64 from a stub encoder, 256 a chunk"),
}
EVAL_ITEMS, WIDTH, LAYERS, GRID_SIDE = 32_000, 768, 7, 10
TITLE_TOKENS, TITLE_WORDS, ITEM_WIDTH, ITEM_CHUNK = 30, 2_000, 64, 256  # the live feed's defaults but the words
MARKERS = ("o", "s", "^", "D", "v", "P")  # one a stage (LINES' four styles come round again past the fourth)
FORMAT, CREATOR = "iisan-scale/1", "IISAN benchmark_scale"  # in the JSON, and in the figure's PNG metadata
TABLE_HEAD = "| stage | what grows | count |"  # the first line of the table
FLOOR_MIB = 0.01  # a peak rise below it is drawn there, hollow (a log axis has no 0)


def is_own(path: Path) -> bool:
    """A JSON, table (.md) or figure (.png) ``benchmark`` wrote, which a rerun may replace."""
    if path.suffix == ".md":
        return starts_with(path, TABLE_HEAD)
    try:
        if path.suffix == ".png":
            from PIL import Image  # (imported to read a figure, as drawing one imports matplotlib)

            with Image.open(path, formats=["PNG"]) as image:
                return image.info.get("Creator") == CREATOR
        return parse_json(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except Exception:  # unreadable, not JSON or not an object, a damaged PNG (PIL raises assorted types): not ours
        return False


def measure(stage: str, count: int, scratch: Path) -> dict:
    """Make ``stage``'s input of ``count`` units in ``scratch``, then time the stage: seconds, the peak's rise
    over the resident memory at its start (the peak reset there: Linux), and what it found (a check that it did
    the work)."""
    # imported when run: this module's --help and its parent process need no torch
    import psutil
    import torch

    from ..memory import own_peak_rss, release_free_memory, reset_peak_memory  # (torch: imported when run)

    work, found = INPUTS[stage](count, scratch)
    release_free_memory(torch.device("cpu"))
    if not reset_peak_memory(torch.device("cpu")):
        raise UserError("the peak memory cannot be reset on this system (Linux's /proc/self/clear_refs)")
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    return {"stage": stage, "count": count, "seconds": seconds, "peak_rise_bytes": max(0, own_peak_rss() - before),
            "found": found(result)}


def _csv(count: int, scratch: Path):
    from ..data.csv_files import read_pairs_csv  # imported when run (each stage loads only what it measures)

    path = scratch / "pairs.csv"
    with open(path, "w") as fh:
        fh.write("user,item,timestamp\n")
        for n in range(count):  # 10 interactions a user, items spread over count / 10 ids
            fh.write(f"A{n // 10:012d},B{(n * 7919) % max(1, count // 10):010d},{1_400_000_000 + n}\n")
    return lambda: read_pairs_csv(path), lambda users: sum(len(items) for _, items in users)


def _evaluation(count: int, scratch: Path):
    # imported when run (each stage loads only what it measures)
    import numpy as np
    import torch

    from ..evaluate import metrics_from_ranks, split_ranks, users_per_chunk  # (torch: imported when run)

    torch.manual_seed(0)
    table, mix = torch.randn(EVAL_ITEMS + 1, 64), torch.randn(64, 64)
    rows = np.random.default_rng(0).integers(1, EVAL_ITEMS + 1, size=(count, 12))
    inputs, targets = rows[:, :10], rows[:, 11]
    chunk = users_per_chunk(torch.device("cpu"), EVAL_ITEMS)
    ranks = lambda: split_ranks(lambda t, x: t[x].mean(1) @ mix, table, inputs, targets, inputs, chunk)  # noqa: E731
    return ranks, lambda r: {"users_ranked": len(r), SELECTED_BY: metrics_from_ranks(r)[SELECTED_BY]}


def _cache_check(count: int, scratch: Path):
    # imported when run (each stage loads only what it measures)
    import torch

    from ..data.cache import nonfinite_rows  # (torch: imported when run)

    table = torch.empty(count, LAYERS, WIDTH, dtype=torch.float16).uniform_(-1, 1)
    table[count // 2, 3, 5] = float("nan")
    return lambda: nonfinite_rows(table), lambda bad: bad.tolist()


def _grid(count: int, scratch: Path):
    # imported when run (each stage loads only what it measures)
    from ..train import checkpoint  # noqa: F401 (what naming a run loads, transformers too: before the clock starts)
    from .sweep import parse_script_args

    out = scratch / "runs"
    for n in range(count):
        (out / f"iisan-cached-Other-lr{n}-{n:08x}").mkdir(parents=True)
    values = [str(1e-4 * (n + 1)) for n in range(GRID_SIDE)], [str(n) for n in range(GRID_SIDE)]
    argv = ["--users", str(scratch / "users.tsv"), "--items", str(scratch / "items.tsv"), "--cache-dir",
            str(scratch / "cache"), "--out-dir", str(out), "--lr", *values[0], "--seed", *values[1]]
    parse = lambda: parse_script_args({"method": "iisan", "feed": "cached"}, {"lr": [1e-4], "seed": [0]}, argv)  # noqa: E731
    return parse, lambda parsed: len(parsed[0])


def _title_table(count: int, scratch: Path):
    # imported when run (each stage loads only what it measures)
    import numpy as np

    from ..model.backbones import load_text_encoder  # (torch, transformers: imported when run)
    from ..model.tiny import vocabulary, write_bert

    words = [f"w{n}ord" for n in range(TITLE_WORDS)]  # one wordpiece each: 5 to 14 tokens a title, none cut
    encoder = load_text_encoder(str(write_bert(scratch / "bert", vocabulary(words), hidden=16)), (1, 2))
    rng = np.random.default_rng(0)
    picks, lengths = rng.integers(0, TITLE_WORDS, size=(count, 12)), rng.integers(3, 13, size=count)
    titles = [""] + [" ".join(words[w] for w in row[:k]) for row, k in zip(picks.tolist(), lengths.tolist())]
    tokenize = lambda: encoder.title_inputs(titles, TITLE_TOKENS)  # noqa: E731 (what a live feed's model holds)
    return tokenize, lambda table: {"shape": list(table[0].shape), "dtypes": [str(t.dtype) for t in table],
                                    "bytes": sum(t.nbytes for t in table), "tokens": int(table[1].sum())}


def _item_table(count: int, scratch: Path):
    # imported when run (each stage loads only what it measures)
    import torch

    from ..evaluate import item_table  # (torch: imported when run)

    class Stub(torch.nn.Module):  # an item encoder of little work: row n is n in every column, a new tensor
        def item_encoder(self, batch):  # (as a model's output is: not a view of the ids)
            return batch.ids.to(torch.float32)[:, None].repeat(1, ITEM_WIDTH)

    encode = lambda: item_table(Stub(), count, ITEM_CHUNK, None, torch.device("cpu"))  # noqa: E731
    return encode, lambda table: {"shape": list(table.shape), "dtype": str(table.dtype), "in_order": bool(
        torch.equal(table[:, -1], torch.arange(count + 1, dtype=torch.float32)))}


INPUTS = {"csv": _csv, "evaluation": _evaluation, "cache-check": _cache_check, "grid": _grid,
          "title-table": _title_table, "item-table": _item_table}


def run_one(stage: str, count: int, scratch: Path) -> dict:
    """``measure`` in a fresh process (``isolate``); its failure one line."""
    from ..isolate import in_fresh_process  # imported when run, not for --help (its logging loads torch)

    scratch.mkdir(parents=True)
    row = in_fresh_process(measure, stage, count, scratch)
    if "error" in row:
        raise UserError(f"{stage} of {count:,} failed: {row['error']}")
    return row


def benchmark(stages: list[str], sizes: list[int], scale: float, out: Path, progress: bool = True) -> dict:
    """Every stage at every size (``scale`` times its base count, at least 1), in a temporary folder removed
    after; the JSON to ``out``, the table beside it (.md) and the figure (.png). A file there that is not one of
    these is refused first."""
    from ..provenance import provenance  # imported when run (torch)

    for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):  # before any work
        claim_output(path, is_own, "a result of benchmark_scale.py", "--out", overwrite=True)
    plan = [(stage, max(1, round(STAGES[stage][1] * scale * size))) for stage in stages for size in sizes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="iisan-scale-") as scratch:
        for n, (stage, count) in enumerate(progress_bar(plan, len(plan), desc="measuring", unit="measurements",
                                                        enabled=progress)):
            rows.append(with_rates(run_one(stage, count, Path(scratch) / str(n))))
            log.info("%s, %s %s: %.2f s, peak rise %.0f MiB", stage, f"{count:,}", STAGES[stage][0],
                     rows[-1]["seconds"], rows[-1]["peak_rise_bytes"] / 2**20)
    payload = {"format": FORMAT, **provenance("cpu"), "stages": {s: STAGES[s] for s in stages}, "sizes": sizes,
               "scale": scale, "threads": os.environ.get("OMP_NUM_THREADS", "torch's default"), "rows": rows}
    write_json_atomic(out, payload)
    write_text_atomic(out.with_suffix(".md"), table(rows) + "\n")
    with atomic_path(out.with_suffix(".png")) as tmp:
        tmp.write_bytes(figure(rows, f"{payload['device']} | commit {payload['git_commit']} | scale {scale}"))
    return payload


def with_rates(row: dict) -> dict:
    """``row`` with its time (microseconds) and peak rise (bytes) per unit counted."""
    return {**row, "microseconds_per_unit": 1e6 * row["seconds"] / row["count"],
            "peak_rise_bytes_per_unit": row["peak_rise_bytes"] / row["count"]}


def table(rows: list[dict]) -> str:
    """The markdown table of ``rows``, in the order measured."""
    lines = [TABLE_HEAD + " seconds | µs per unit | peak rise (MiB) | bytes per unit |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {STAGES[r['stage']][0]} | {r['count']:,} | {r['seconds']:.2f} | "
                     f"{r['microseconds_per_unit']:.1f} | {r['peak_rise_bytes'] / 2**20:.0f} | "
                     f"{r['peak_rise_bytes_per_unit']:.0f} |")
    return "\n".join(lines)


def spaced(ticks: list[float], apart: float = 1.6) -> set[float]:
    """The ``ticks`` (ascending) labelled on a log axis: the first, the last, and between them each at least
    ``apart`` times the one labelled before it and the last (so that no two labels meet)."""
    shown = [ticks[0]]
    for tick in ticks[1:-1]:
        if tick >= shown[-1] * apart and ticks[-1] >= tick * apart:
            shown.append(tick)
    return {*shown, ticks[-1]}


def figure(rows: list[dict], title: str) -> bytes:
    """The PNG of ``drawn(rows, title)``."""
    import io  # (with matplotlib: imported when drawn)

    buffer = io.BytesIO()
    drawn(rows, title).savefig(buffer, format="png", dpi=110, metadata={"Creator": CREATOR})
    return buffer.getvalue()


def drawn(rows: list[dict], title: str):
    """Time and peak rise against the count, each stage on log-log axes (a straight line of slope 1: linear), in
    its own colour and marker and a line style of four, the same in every figure (by its place in ``STAGES``);
    no two tick labels meet."""
    from matplotlib.figure import Figure  # drawn without pyplot: no backend is chosen (a notebook's stays its own)
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter, NullLocator

    styles = {stage: {**style, "linestyle": LINES[i % len(LINES)][0], "marker": MARKERS[i % len(MARKERS)]}
              for i, (stage, style) in enumerate(zip(STAGES, run_styles(len(STAGES))))}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    scales = set()
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        scale = [r["count"] / mine[0]["count"] for r in mine]
        scales.update(scale)
        for ax, key in zip(axes, ("seconds", "peak_rise_bytes")):
            floor = 0 if key == "seconds" else FLOOR_MIB
            values = [r[key] if key == "seconds" else r[key] / 2**20 for r in mine]
            ax.plot(scale, [max(v, floor) for v in values], markersize=5, label=f"{stage} ({STAGES[stage][0]})",
                    **styles[stage])
            if low := [(s, floor) for s, v in zip(scale, values) if v < floor]:  # a log axis has no 0
                ax.plot(*zip(*low), linestyle="none", marker=styles[stage]["marker"], markersize=5,
                        markerfacecolor="white", markeredgecolor=styles[stage]["color"])
    ticks = sorted(scales)
    shown = spaced(ticks)
    titles = ("time", f"peak memory rise (hollow: under {FLOOR_MIB:g} MiB)")
    for ax, title_, label in zip(axes, titles, ("seconds (log scale)", "MiB over the stage's start (log scale)")):
        ax.set(xscale="log", yscale="log", xlabel="count / the stage's base count (log scale)", ylabel=label,
               title=title_)
        ax.set_xticks(ticks, [f"{s:g}x" if s in shown else "" for s in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        low, high = ax.dataLim.intervaly
        decades = math.log10(high / low) if low > 0 else 9
        labelled = tuple(range(1, 10)) if decades <= 0.5 else (1, 2, 5) if decades <= 2.5 else (1,)  # none crowded
        ax.yaxis.set_major_locator(LogLocator(subs=labelled))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(LogLocator(subs=tuple(range(1, 10))))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8, ncols=len(STAGES))
    fig.suptitle(f"how each stage's time and peak memory grow with its count | {title}", fontsize=9)
    return fig
