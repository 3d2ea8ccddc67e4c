"""Build the hidden-state cache from a config: both encoders run once over every item."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .build import live_states, load_data, modalities, resolve_device
from .cache import build_caches
from .config import Config, ConfigError
from .data.interactions import read_items
from .feeds import item_chunks

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_cache_from_config(cfg: Config, dtype: str = "float16", all_items: bool = False) -> dict[str, Path]:
    """Cache the items of the data set (after the protocol), or every row of the items file with
    ``all_items`` or when no users file is given. Runs in half precision on GPU, fp32 on CPU."""
    if not cfg.cache_dir:
        raise ConfigError("--cache-dir is required: where text.safetensors / image.safetensors go")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if not cfg.items:
        raise ConfigError("--items FILE is required")
    if cfg.users and not all_items:
        data = load_data(cfg)
        item_ids, titles, catalog = data.item_ids, data.titles, data.catalog
    else:
        catalog = read_items(cfg.items, cfg.allow_empty_titles)
        item_ids, titles = [""] + catalog.ids, [""] + catalog.titles
    device = resolve_device(cfg.device)
    # Half precision on the GPU (fp16 autocast unless amp says bf16); exact fp32 on the CPU.
    amp = {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[cfg.amp] \
        if device.type == "cuda" else None
    live, pixels = live_states(cfg, item_ids, titles, device, amp=amp)
    log.info("caching %d items (%s) with %s", len(item_ids) - 1, ", ".join(modalities(cfg)),
             ", ".join(f"{m}: layers {list(e.layers)} x {e.width}" for m, e in live.encoders.items()))
    chunks = item_chunks(np.arange(1, len(item_ids)), cfg.encode_batch_size, pixels)
    return build_caches(live, item_ids, chunks, cfg.cache_dir, items_file=str(cfg.items),
                        items_fingerprint=catalog.fingerprint, dtype=DTYPES[dtype], progress=cfg.progress)
