"""What a benchmark's rows are, without torch (``scripts/plot_figures.py`` draws a JSON's tables and
figures from them in a second, not after loading the training stack): the methods of the paper's efficiency
table and the authors' way of running them, a row's label for that way, its peak memory, and the steps
the benchmark times."""

from __future__ import annotations

MIN_WARMUP, MIN_STEPS = 10, 50  # the benchmark's timing; fewer only for a quick check (--few-steps)

# (label, config overrides) of the six methods of the paper's efficiency table (--methods picks among the labels).
TABLE_METHODS = {
    "FFT": {"method": "fft"},
    "Adapter": {"method": "adapter"},
    "LoRA": {"method": "lora"},
    "BitFit": {"method": "bitfit"},
    "IISAN (uncached)": {"method": "iisan", "feed": "live"},
    "IISAN (cached)": {"method": "iisan", "feed": "cached"},
}
# The authors' way of running a step (their code): every slot of the batch through the item encoder,
# padding included, titles at full length. Rows measured this way stand beside the default ones.
AUTHORS_WAY = {"dedup_items": "off", "static_shapes": True, "title_multiple": 0}


def authors_label(label: str) -> str:
    """'FFT' -> 'FFT (every slot)'; 'IISAN (uncached)' -> 'IISAN (uncached, every slot)'."""
    return label[:-1] + ", every slot)" if label.endswith(")") else label + " (every slot)"


def memory_gib(row: dict) -> float | None:
    """A row's peak memory: the GPU allocator's peak where measured on a GPU, else the process's resident one."""
    memory = row.get("memory", {})
    return memory.get("max_allocated_gib", memory.get("peak_rss_gib"))
