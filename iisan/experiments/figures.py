"""Figures and markdown tables of efficiency benchmark results (``efficiency.run_benchmark``'s JSON):
time per epoch, peak memory, trainable parameters and TPME per method."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from ..files import atomic_path  # noqa: E402
from .bench import memory_gib  # noqa: E402


def memory_label(payload: dict) -> str:
    rows = [r for r in payload["rows"] if "memory" in r]
    if rows and "max_allocated_gib" in rows[0]["memory"]:
        return "peak GPU memory allocated (GiB)"
    return "peak process resident memory (GiB)"


def table(payload: dict) -> str:
    gpu = any("max_allocated_gib" in r.get("memory", {}) for r in payload["rows"])
    head = "| method | batch | items / step | s / epoch | model TFLOP/s | " + \
        ("allocated GiB | reserved GiB" if gpu else "peak RSS GiB") + " | trainable params | trainable % | TPME |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | | | failed: {r['error']} | | | | | |")
            continue
        mem = r["memory"]
        memory = f"{mem['max_allocated_gib']:.2f} | {mem['max_reserved_gib']:.2f}" if gpu else \
            f"{mem['peak_rss_gib']:.2f}"
        share = 100 * r["trainable_params"] / r["total_params"]
        items = f"{r['items_per_step']:.0f}" if "items_per_step" in r else ""  # older results lack them
        rate = f"{r['model_tflops_per_second']:.3g}" if "model_tflops_per_second" in r else ""
        lines.append(f"| {r['label']} | {r['batch_size']} | {items} | {r['epoch_seconds']:.2f} | {rate} | {memory} | "
                     f"{r['trainable_params'] / 1e6:.2f} M | {share:.2f} | {r['tpme']:.3f} |")
    cache = payload.get("cache_build") or {}
    notes = [f"Device: {payload['device']}. Setting: {payload['description']}. "
             f"{payload['timed_steps']} timed steps after {payload['warmup_steps']} warm-up steps, extrapolated "
             "to a full epoch (ceil(users / batch) steps); training only, no evaluation. Items / step: the "
             "non-padding items the item encoder runs on per timed step (distinct ones when deduplicated). Model "
             "TFLOP/s: the step's matmul, convolution and attention FLOPs (forward and backward, counted with "
             "torch.utils.flop_counter on the timed batches) per second of the timed steps.",
             f"Command: `{payload['command']}` (commit {payload['git_commit']})."]
    if "cache_build_seconds" in cache:
        parts = [f"{name} {cache[key]:.1f} s" for name, key in (("loading data and encoders", "load_seconds"),
                 ("encoding", "encode_seconds"), ("assembling the files", "assemble_seconds")) if key in cache]
        notes.append(f"Building the cache once took {cache['cache_build_seconds']:.1f} s"
                     + (f" ({', '.join(parts)})." if parts else "."))
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def figure(payload: dict, path: Path) -> None:
    rows = [r for r in payload["rows"] if "error" not in r]
    labels = [r["label"].replace(" (", "\n(") for r in rows]
    panels = [
        ("training time per epoch (s)", [r["epoch_seconds"] for r in rows], False),
        (memory_label(payload), [memory_gib(r) for r in rows], False),
        ("trainable parameters", [r["trainable_params"] for r in rows], True),
        ("TPME (lower is better)", [r["tpme"] for r in rows], False),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    colours = ["#c44e52" if r["method"] == "IISAN" else "#4c72b0" for r in rows]
    for ax, (title, values, log_scale) in zip(axes, panels):
        ax.bar(range(len(values)), values, color=colours)
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"{payload['device']} | {payload['description']} | {payload['backbones']} encoders, "
                 f"{payload['data']} data", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_reports(results: list[Path], figs: Path) -> list[Path]:
    """For each JSON in ``results`` (files, or folders of them): ``<name>.md`` beside it (the table, with
    the command and device that produced it) and ``figs/efficiency-<name>.png``. Returns what it wrote."""
    files: list[Path] = []
    for entry in map(Path, results):
        files += sorted(entry.glob("*.json")) if entry.is_dir() else [entry]
    made = []
    for path in files:
        payload = json.loads(path.read_text())
        md = path.with_suffix(".md")
        with atomic_path(md) as tmp:
            tmp.write_text(f"# Efficiency: {path.stem}\n\n" + table(payload))
        run = path.parent.name if path.parent.name != "efficiency" else ""
        png = Path(figs) / f"efficiency-{run + '-' if run else ''}{path.stem}.png"
        figure(payload, png)
        made += [md, png]
    return made
