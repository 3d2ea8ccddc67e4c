"""The text under a benchmark table: what its rows measure, said only from the fields the rows themselves
carry (per row, or per distinct value with the rows that hold it). A results file written before a field
existed says nothing about that field.

``figures.table`` writes these lines; ``read_benchmark`` has checked every field read here."""

from __future__ import annotations

from .rows import MIN_STEPS, MIN_WARMUP, authors_label, memory_gib

# What each value of a row's ``encodes`` field means (``bench.ENCODES``).
ENCODING_MEANS = {
    "distinct items": "each distinct item of a batch runs through the item encoder once",
    "every slot with an item": "each slot of the batch that holds an item runs through the item encoder (a "
                               "repeated item once per slot, so each gets its own dropout mask), padding once",
    "every slot": "every slot of the batch runs through the item encoder, padding slots included",
}


def encoding_means(value: str) -> str:
    """What an ``encodes`` value says: 'every slot with an item; image: distinct items' is a row per slot for
    the towers that drop out and each distinct item once for those named (items / step, rows / step: both)."""
    layout, _, towers = value.partition("; ")
    means = ENCODING_MEANS.get(layout, layout)
    if towers.endswith(": distinct items"):
        means += (f"; the {towers.removesuffix(': distinct items')} tower drops nothing out, so it runs on each "
                  "distinct item once (items / step and rows / step give both counts: per slot / per item)")
    return means


def grouped(entries: list[tuple[str, dict]], value) -> dict:
    """``value(entry) -> labels``: each distinct value (None: the entry lacks the field, left out) and the
    labels of the entries that hold it, in their order."""
    groups: dict = {}
    for label, entry in entries:
        key = value(entry)
        if key is not None:
            groups.setdefault(key, []).append(label)
    return groups


def named(labels: list[str]) -> str:
    return ", ".join(labels)


def quick_check(payload: dict) -> bool:
    """Fewer steps than the benchmark's timing: a run with --few-steps."""
    return payload["timed_steps"] < MIN_STEPS or payload["warmup_steps"] < MIN_WARMUP


def timing_note(payload: dict, rows: list[dict]) -> str:
    steps, warmup = payload["timed_steps"], payload["warmup_steps"]
    if any("step_seconds" in r for r in rows):
        timing = ("each step's duration read on the device (CUDA events between steps on a GPU, no wait between "
                  "steps); s / step is their median, p90 their 90th percentile, s / epoch the median x "
                  "ceil(users / batch).")
    else:
        timing = "s / step is their mean (a results file without per-step times), s / epoch that x ceil(users / batch)."
    if full := [r["label"] for r in rows if "full_epoch_seconds" in r]:
        timing += (f" Full epoch ({named(full)}): a real epoch end to end, its image pipeline started cold, the "
                   "last smaller batch included.")
    quick = (f" Fewer steps than the benchmark's timing ({MIN_STEPS} timed after {MIN_WARMUP} warm-up; fewer "
             "only with --few-steps, for a quick check)." if quick_check(payload) else "")
    return (f"Device: {payload['device']}. Setting: {payload['description']}. Training only, no evaluation: "
            f"{steps} timed steps after {warmup} warm-up steps, {timing}{quick}")


def layout_notes(rows: list[dict]) -> list[str]:
    """What each row's item encoder runs on, its static shapes and titles, as its fields say."""
    entries = [(r["label"], r) for r in rows]
    out = [f"Encodes '{value}' ({named(labels)}): {encoding_means(value)}."
           for value, labels in grouped(entries, lambda r: r.get("encodes")).items()]
    static = grouped(entries, lambda r: (r.get("encodes") == "every slot", titles(r)) if r.get("static_shapes")
                     is True else None)
    for (every_slot, cut), labels in static.items():
        shape = ("a batch's rows are its slots, a fixed count" if every_slot else "the encoded rows padded up to a "
                 "bucket size (rows / step), the padding rows masked, never reaching the loss")
        out.append(f"Static shapes ({named(labels)}): {shape}; {cut}.")
    if plain := [r["label"] for r in rows if r.get("static_shapes") is False]:
        out.append(f"No static shapes ({named(plain)}): each batch runs at its own row count.")
    if cached := [r["label"] for r in rows if r.get("feed") == "cached" and "encoded_rows_per_step" in r]:
        out.append(f"Cached IISAN ({named(cached)}) gathers cached states instead of encoding: its rows / step are "
                   "those its SAN runs on, and no FLOPs padding is counted.")
    if authors := [r["label"] for r in rows if r.get("measured") == "authors"]:
        out.append(f"Measured the authors' way ({named(authors)}): the step as their code runs it; the loss is the "
                   "same, the work and memory are those of the authors' code.")
    return out


def titles(row: dict) -> str:
    buckets = row.get("buckets") or {}
    if buckets.get("title_multiple"):
        return f"titles cut to the batch's longest, rounded up to {buckets['title_multiple']} tokens"
    if "title_tokens" in buckets:
        return f"titles at their full {buckets['title_tokens']} tokens"
    return "titles as the row's settings had them"


def column_notes(payload: dict, rows: list[dict]) -> list[str]:
    out = []
    if any(r.get("padding_overhead_items") is not None for r in rows):
        out.append("Padding: the extra rows per real item / the extra model FLOPs over the same batches without "
                   "padding rows.")
    if any("items_per_step" in r for r in rows):
        out.append("Items / step: the non-padding items a step encodes, as its 'encodes' says; rows / step: the "
                   "rows the item encoders run on, padding rows included.")
    if rated := [r for r in rows if "model_tflops_per_second" in r]:
        counted = sorted({r["flop_batches"] for r in rated if "flop_batches" in r})
        over = ("the first " + " or ".join(map(str, counted)) + " timed batches" if counted
                and counted != [payload["timed_steps"]] else "the timed batches")
        out.append("Model TFLOP/s: the step's matmul, convolution and attention FLOPs (forward and backward, "
                   f"counted with torch.utils.flop_counter on {over}) per second of the median step.")
    if any("tpme" in r for r in rows):
        out.append("TPME compares the rows measured the default way only." if any("measured" in r for r in rows)
                   else "TPME compares the rows that show it.")
    return out


def memory_source(payload: dict, rows: list[dict]) -> list[str]:
    """Which memory figure each row and task holds, where its fields say."""
    tasks = [(name, payload.get(key) or {}) for name, key in (("evaluation", "evaluation"),
                                                              ("cache build", "cache_build"))]
    entries = [(r["label"], r.get("memory") or {}) for r in rows] + [(n, t.get("memory") or {}) for n, t in tasks]
    out = []
    if gpu := [label for label, m in entries if "max_allocated_gib" in m]:
        out.append(f"Memory ({named(gpu)}): the CUDA allocator's peaks, allocated and reserved.")
    source = grouped(entries, lambda m: (m["rss_peak_source"], m["rss_peak_since"]) if "rss_peak_source" in m
                     and "rss_peak_since" in m else None)
    for (figure, since), labels in source.items():
        what = ("own resident high-water mark (VmHWM)" if figure == "VmHWM" else
                "ru_maxrss, which may include the peak of the process that started it")
        out.append(f"Peak RSS ({named(labels)}): the measuring process's {what}, since {since}.")
    if lmdb := [f"{label} {m['lmdb_resident_gib']:.2f}" for label, m in entries if m.get("lmdb_resident_gib")]:
        out.append(f"Of it, pages of the image LMDB the reads brought in (GiB, at the window's end: "
                   f"{', '.join(lmdb)}): the file's, which the kernel may drop, counted in the resident set; a "
                   "cached row reads none.")
    return out


def notes(payload: dict) -> list[str]:
    """What each row measures, said with the run's own numbers and fields."""
    rows = [r for r in payload["rows"] if "error" not in r]
    out = [timing_note(payload, rows), *layout_notes(rows), *column_notes(payload, rows),
           *memory_source(payload, rows)]
    if payload.get("complete") is False:  # rewritten after every row: a run cut short says so
        out.insert(0, "**Incomplete:** the run stopped before it measured every row (cut short or still "
                      "running); the rows above are all it measured, and TPME is computed only at the end.")
    out += memory_note(payload)
    out.append(f"Command: `{payload['command']}` (commit {payload['git_commit']}).")
    return out


def memory_note(payload: dict) -> list[str]:
    """Why FFT's memory here is far below the paper's 47 GB, with this run's FFT rows."""
    rows = {r["label"]: r for r in payload["rows"] if "error" not in r}
    default, authors = rows.get("FFT"), rows.get(authors_label("FFT"))
    if not default or not authors or "items_per_step" not in default or "encoded_rows_per_step" not in authors:
        return []
    encodes = f"{default['encodes']}; " if "encodes" in default else ""
    return [f"Memory: a trained backbone keeps activations for every item it encodes, so FFT's memory grows with "
            f"the items per step: {default['items_per_step']:.0f} here ({encodes}{memory_gib(default):.2f} GiB), "
            f"{authors['encoded_rows_per_step']:.0f} rows the authors' way ({memory_gib(authors):.2f} GiB). The two "
            "rows show how much of the gap between the default FFT row and the paper's 47 GB comes from how "
            "many rows the encoders run on. The authors' code logs no memory figure, so how 47 GB was read is not "
            "known (a reading from nvidia-smi would include the CUDA context and the allocator's cache; compare "
            "the reserved column), and their fp16 training with a GradScaler is not what runs here."]
