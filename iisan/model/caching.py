"""Building the hidden-state cache from a config: the frozen encoders run once over every item
(``data.cache_build`` does the batching, resuming and writing).

The cache folder is claimed first: one build at a time writes it (a lock), a file there that is not an
IISAN cache is never replaced, an IISAN cache built with other settings only with ``overwrite``
(``--overwrite``), and no output may be one of the build's inputs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..claims import claim_output, refuse_broken_link, refuse_inputs, refuse_inside_inputs
from ..config import PRECISIONS, Config
from ..data.batches import ItemBatch
from ..data.cache import (
    FORMAT,
    UNRECORDED,
    VOLATILE,
    cache_file,
    compared,
    declared_metadata,
    encoder_config_hash,
    is_cache_file,
    read_metadata,
    recorded_weights,
)
from ..data.cache_build import SIDECAR, build_caches, discard_partial_build
from ..data.cache_import import check_import, import_caches, imported_files, kept_import
from ..data.interactions import ItemCatalog, read_items
from ..data.run_data import load_data
from ..devices import resolve_device
from ..errors import ConfigError, OutputError, parse_json
from ..files import check_readable, failure_reason, folders_kept_on_success
from ..locks import OutputLock
from ..logfiles import Logging, command_log, logging_to
from ..tensorfiles import header_bytes
from .backbones import read_spec
from .build import image_pixels, layers_for, load_encoders, modalities, model_name, title_tensors
from .encoder_files import local_folder, weights_digest
from .feeds import LiveStates

log = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in PRECISIONS}
# What the authors' stored states were computed with (their Code_Cached/preprocess_vectors.py): CLS of
# every hidden state, (depth + 1, width) per item.
AUTHORS_ENCODERS = {"text": ("bert-base-uncased", "bert", 12, 768), "image": ("vit-base-patch16-224", "vit", 12, 768)}


def cache_metadata(encoders: dict, title_tokens: int, item_ids: list[str], catalog: ItemCatalog, dtype: torch.dtype,
                   known: dict[str, dict | None] | None = None, images: str | None = None) -> dict[str, dict[str, str]]:
    """The final files' metadata per modality of ``encoders``, keys from ``cache.METADATA_KEYS`` (what
    ``cache.check_metadata`` compares with a config); ``title_tokens``: the text tower's title length (the width
    ``build.title_tensors`` gives). ``images``: the image LMDB's digest; ``catalog``: the items file as read (its
    fingerprint; a text cache's titles digest). ``known``: per modality the weights record of a cache already
    there, whose digest stands while the encoder's files are unchanged (a rebuild does not hash the weights again)."""
    out = {}
    for m, encoder in encoders.items():
        weights = (weights_digest(encoder.folder, (known or {}).get(m)) if encoder.folder
                   else {"digest": "", "files": {}})
        out[m] = declared_metadata({
            "format": FORMAT,
            "modality": m,
            "encoder": encoder.name,
            "encoder_config": encoder_config_hash(encoder.folder) or "",
            "encoder_weights": weights["digest"],
            "encoder_files": json.dumps(weights["files"], sort_keys=True),
            "model_type": encoder.model.config.model_type,
            "layers": json.dumps(list(encoder.layers)),
            "width": str(encoder.width),
            "depth": str(encoder.depth),
            "pooling": encoder.pooling,
            "dtype": str(dtype).replace("torch.", ""),
            "encoder_dtype": str(encoder.dtype).replace("torch.", ""),
            **({"title_tokens": str(title_tokens)} if m == "text" else {}),
            **({"titles": catalog.titles_digest} if m == "text" else {}),
            **({"image_norm": encoder.norm["rule"]} if m == "image" else {}),
            **({"images": images} if m == "image" and images else {}),
            "items_file": catalog.path,
            "items_fingerprint": catalog.fingerprint,
            "item_ids": json.dumps(item_ids[1:]),
        })
    return out


def every_layer(cfg: Config) -> Config:
    """``cfg`` reading every hidden state of its encoders (0..depth): a cache built from it serves any
    ``--text-layers`` / ``--image-layers`` choice (and the group default) of the same encoders."""
    return cfg.replace(**{f"{m}_layers": tuple(range(read_spec(model_name(cfg, m), m, cfg.allow_download).depth + 1))
                          for m in modalities(cfg)})


LOCK = ".iisan-lock"


def cache_here(path: Path) -> bool:
    """Whether ``path`` is a cache file this project wrote, asked only of a regular file (a named pipe would
    hang whoever opened it)."""
    return path.is_file() and is_cache_file(path)


def claim_cache_folder(cfg: Config) -> Path:
    """Refuse, before any encoder is loaded, a cache folder that is a file, outputs that are inputs and
    files there that are not IISAN caches (or cannot be read)."""
    folder = Path(cfg.cache_dir)
    refuse_broken_link(folder, "--cache-dir")  # making it would fail with 'File exists'
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--cache-dir {folder} is a file, expected a folder")
    inputs = [cfg.users, cfg.items, cfg.images] + [model_name(cfg, m) for m in modalities(cfg)]
    for m in modalities(cfg):
        refuse_inputs(path := cache_file(folder, m), inputs, "--cache-dir")
        if path.exists() and not cache_here(path):
            if path.is_file():  # else is_cache_file says no for a cache this user may not read
                try:
                    check_readable(path)
                except OSError as err:
                    raise OutputError(f"--cache-dir: {path} cannot be read ({failure_reason(err)})") from None
            claim_output(path, cache_here, "an IISAN cache", "--cache-dir", overwrite=False)
    refuse_inputs(folder / SIDECAR, inputs, "--cache-dir")
    refuse_inside_inputs(folder, inputs, "--cache-dir")
    return folder


def differences(path: Path, new: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The metadata of the cache at ``path`` and the keys in which it differs from ``new``'s settings."""
    old = {**{k: v for k, v in UNRECORDED.items() if k in new}, **read_metadata(path)}  # a key added since
    return old, sorted(k for k in set(old) | set(new) if k not in VOLATILE and old.get(k) != new.get(k)
                       and compared(k, old, new))


def serves(path: Path, new: dict[str, str]) -> bool:
    """Whether the cache at ``path`` is there, built with ``new``'s settings or with more layers
    (``--all-layers``: runs read their own from it)."""
    if not path.is_file():
        return False
    old, differ = differences(path, new)
    if "layers" in differ and set(parse_json(new["layers"])) <= set(parse_json(old["layers"])):
        differ.remove("layers")
    return not differ


def check_replaced(metadata: dict[str, dict[str, str]], cache_dir: Path, overwrite: bool) -> None:
    """An existing cache is rebuilt in place when it was built with the same settings (the same bytes
    result); one built with other settings is replaced only with ``overwrite``."""
    for m, new in metadata.items():
        path = cache_file(cache_dir, m)
        if not path.exists() or overwrite:
            continue
        old, differ = differences(path, new)
        if differ:  # short values named as they are (item ids and file records are long)
            named = [f"{k} {old.get(k)} there, {new.get(k)} now" if len(f"{old.get(k)}{new.get(k)}") <= 60 else k
                     for k in differ]
            raise OutputError(f"--cache-dir {cache_dir}: {path.name} holds a cache built with other settings "
                              f"({'; '.join(named)}); pass --overwrite to replace it, or choose another --cache-dir")


def build_cache_from_config(cfg: Config, dtype: str | None = None, all_items: bool = False,
                            timings: dict | None = None, all_layers: bool = False,
                            overwrite: bool = False, only_missing: bool = False,
                            reuse: bool = False) -> dict[str, Path]:
    """Cache the items of the data set (after the protocol), or every row of the items file with
    ``all_items`` or when no users file is given; the config's layers, or every layer with ``all_layers``;
    in ``dtype`` (default: ``cfg.cache_dtype``, see ``cache_precision``).
    Resumable: run it again after an interruption and it encodes only the chunks not yet written.
    ``timings``, if given, receives ``load_seconds`` (reading the data and loading the encoders) and
    ``build_caches``' own. ``overwrite`` replaces a cache built with other settings (see the module
    docstring). ``only_missing``: nothing is built when every file is there once the folder is locked (another
    process built it meanwhile: a job array's tasks sharing one cache). ``reuse`` (`iisan cache`'s default; not
    with --overwrite alone): a tower's cache there built with the same settings (``serves``) is kept and only the
    other tower built (the encoders are loaded to tell). A shared cache folder this process cannot write (another
    user's) is kept with ``reuse`` when it serves every tower: nothing is written, so no lock is taken."""
    start = time.perf_counter()
    if reuse and cfg.cache_dir and Path(cfg.cache_dir).is_dir() and not os.access(cfg.cache_dir, os.W_OK):
        check_cache_arguments(cfg, dtype)
        return _build(every_layer(cfg) if all_layers else cfg, dtype, all_items, timings, overwrite, start, reuse,
                      read_only=True)
    with writing_cache(cfg, dtype):
        files = {m: cache_file(cfg.cache_dir, m) for m in modalities(cfg)}
        if only_missing and all(path.is_file() for path in files.values()):
            log.info("%s: built meanwhile by another process; not built again", ", ".join(map(str, files.values())))
            return files
        return _build(every_layer(cfg) if all_layers else cfg, dtype, all_items, timings, overwrite, start, reuse)


BUILD_LOG = "cache-build.log"  # each build's and import's lines, appended, in its folder
LOG_HEADS = {"build": "=== cache build", "import": "=== cache import"}


def build_log(folder: Path, kind: str = "build") -> Logging:
    """The cache folder's log, taking the ``iisan`` log lines of this build or import (the folder is locked)."""
    return command_log(folder / BUILD_LOG, LOG_HEADS[kind], "cache build log", heads=tuple(LOG_HEADS.values()))


@contextlib.contextmanager
def writing_cache(cfg: Config, dtype: str | None) -> Iterator[None]:
    """A build's or an import's arguments checked, the cache folder claimed (module docstring) and locked for the
    block, then a build folder left there removed (a build killed once its files were in place, before its own)."""
    check_cache_arguments(cfg, dtype)
    folder = claim_cache_folder(cfg)
    busy = "another cache build is writing it; wait for it to finish or choose another --cache-dir"
    with folders_kept_on_success(folder), OutputLock(folder / LOCK, f"cache folder {folder}", busy):
        yield
        discard_partial_build(folder, left=True)


def check_cache_arguments(cfg: Config, dtype: str | None) -> None:
    if not cfg.cache_dir:
        raise ConfigError("--cache-dir is required: where text.safetensors / image.safetensors go")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if not cfg.items:
        raise ConfigError("--items FILE is required")


def _build(cfg: Config, dtype: str | None, all_items: bool, timings: dict | None, overwrite: bool,
           start: float, reuse: bool = False, read_only: bool = False) -> dict[str, Path]:
    item_ids, titles, catalog = _items(cfg, all_items)
    device = resolve_device(cfg.device)
    encoders = load_encoders(cfg, device=device)  # half weights on the GPU for half checkpoints (LLMs)
    stored, amp = cache_precision(dtype or cfg.cache_dtype, {e.dtype for e in encoders.values()}, device)
    pixels = image_pixels(cfg, item_ids, encoders)
    known = {m: recorded_weights(cache_file(cfg.cache_dir, m)) for m in encoders}
    metadata = cache_metadata(encoders, cfg.title_tokens, item_ids, catalog, stored, known,
                              pixels.store.digest() if pixels is not None else None)  # (no title tokenised yet)
    files = {m: cache_file(cfg.cache_dir, m) for m in metadata}
    kept = {m: path for m, path in files.items() if serves(path, metadata[m])} if reuse else {}
    if read_only and (rest := [m for m in metadata if m not in kept]):
        raise OutputError(f"could not write {cfg.cache_dir}: this process may not write there, and its "
                          f"{' and '.join(rest)} cache is missing or was built with other settings; choose another "
                          "--cache-dir")
    if kept:
        log.info("%s: built before with these settings; kept as it is%s", ", ".join(map(str, kept.values())),
                 "" if overwrite else " (--overwrite builds it again)")
        if rest := [m for m in metadata if m not in kept]:  # the other tower alone, stored as it would have been
            del encoders, pixels
            kept.update(_build(cfg.replace(towers=rest[0], modality="intra"), str(stored).removeprefix("torch."),
                               all_items, timings, overwrite, start))
        return kept
    check_replaced(metadata, Path(cfg.cache_dir), overwrite)  # (a build refused changes nothing, its log neither)
    for m, e in encoders.items():  # a header no reader takes, refused before the encoding
        header_bytes(files[m], {"states": (stored, (len(item_ids), len(e.layers), e.width))}, metadata[m])
    live = LiveStates(encoders, *title_tensors(cfg, titles, encoders), cfg.text_encoder_dropout).to(device).eval()
    if timings is not None:
        timings["load_seconds"] = time.perf_counter() - start
    with logging_to(build_log(Path(cfg.cache_dir)), "build"), contextlib.ExitStack() as readers:
        if pixels is not None:  # the reader threads end with the build, failed or not
            readers.callback(pixels.close)
        log.info("caching %s items (%s) with %s", f"{len(item_ids) - 1:,}", ", ".join(modalities(cfg)),
                 ", ".join(f"{m}: layers {list(e.layers)} x {e.width} ({str(e.dtype).removeprefix('torch.')})"
                           for m, e in live.encoders.items()))
        return build_caches(autocast_states(live, amp), live.shapes(), metadata, item_ids, cfg.cache_dir,
                            chunk_size=cfg.encode_batch_size,
                            device=device, pixels=pixels, dtype=stored, progress=cfg.progress, timings=timings)


def autocast_states(live: LiveStates, amp: torch.dtype | None) -> Callable[[ItemBatch], dict[str, torch.Tensor]]:
    """``live`` run under autocast in ``amp`` (None: as it is)."""
    def encode(items: ItemBatch) -> dict[str, torch.Tensor]:
        with torch.autocast(items.ids.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return live(items)
    return encode


def cache_precision(choice: str, encoder_dtypes: set[torch.dtype],
                    device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(stored dtype, autocast dtype or None) of a cache build. 'auto': the encoders' half type when they
    run in one (an LLM on a GPU: bf16 states can overflow fp16), else fp32 with no autocast, as the
    authors' preprocess_vectors.py. A half choice over fp32 encoders computes under autocast in that type
    on a GPU (fast; the states are rounded to it anyway) and exactly in fp32 on the CPU."""
    halves = encoder_dtypes - {torch.float32}
    own = next(iter(halves)) if len(halves) == 1 else None  # the encoders' own half type, if any
    stored = (own or torch.float32) if choice == "auto" else DTYPES[choice]
    if device.type != "cuda":
        return stored, None
    if own is not None:
        return stored, own  # half encoders compute in their own type
    return stored, None if stored == torch.float32 else stored


def _items(cfg: Config, all_items: bool) -> tuple[list[str], list[str], ItemCatalog]:
    """Item ids and titles (index 0 = padding) of the data set after the protocol, or of every row of the
    items file, and the file read."""
    if cfg.users and not all_items:
        data = load_data(cfg)
        return data.item_ids, data.titles, data.catalog
    catalog = read_items(cfg.items, cfg.allow_empty_titles, cfg.encoding)
    return [""] + catalog.ids, [""] + catalog.titles, catalog


def import_cache_from_config(cfg: Config, src: str | Path, layers: str = "run", dtype: str | None = None,
                             all_items: bool = False, allow_missing: bool = False,
                             overwrite: bool = False) -> dict[str, Path]:
    """Import the authors' per-item hidden states (``data.cache_import``) as the cache ``cfg`` reads, in
    ``dtype`` (default: ``cfg.cache_dtype``; auto keeps their files' fp32).

    Each file must hold (depth + 1, width) states: the config's encoder folder's when it is here, else
    the authors' BERT-base / ViT-B (13, 768). ``layers``: "run" keeps the indices ``cfg`` selects, "all"
    keeps every one. The metadata records ``source=imported``, the folder and the authors' encoder;
    there is no encoder config or weights digest of a local folder to record, so the loader checks
    such a cache's layers, width and items, not its encoder's identity (``data.cache``). The cache
    folder is claimed as for a build (module docstring; ``overwrite``); one imported from the same files with the
    same settings is kept, not imported again (``cache_import.kept_import``; ``overwrite`` imports again)."""
    dtype = dtype or ("float32" if cfg.cache_dtype == "auto" else cfg.cache_dtype)
    if layers not in ("run", "all"):
        raise ConfigError(f"--layers {layers!r}: expected run (the layers a run reads) or all")
    with writing_cache(cfg, dtype):
        return _import(cfg, src, layers, dtype, all_items, allow_missing, overwrite)


def _import(cfg: Config, src: str | Path, layers: str, dtype: str, all_items: bool, allow_missing: bool,
            overwrite: bool) -> dict[str, Path]:
    item_ids, _, catalog = _items(cfg, all_items)
    keep, shapes, metadata = {}, {}, {}
    for m in modalities(cfg):
        encoder, model_type, depth, width = AUTHORS_ENCODERS[m]
        if local_folder(model_name(cfg, m)) is not None:  # the states are said to be this folder's encoder's
            spec = read_spec(model_name(cfg, m), m)
            encoder, model_type, depth, width = model_name(cfg, m), spec.model_type, spec.depth, spec.width
        else:
            log.info("%s: %s is not an encoder folder here; the states are taken as the authors' %s's (%d x %d)", m,
                     model_name(cfg, m), encoder, depth + 1, width)
        keep[m] = list(layers_for(cfg, m, depth)) if layers == "run" else list(range(depth + 1))
        shapes[m] = (depth + 1, width)
        metadata[m] = declared_metadata({
            "format": FORMAT, "modality": m, "encoder": encoder, "encoder_config": "",
            "model_type": model_type, "layers": json.dumps(keep[m]), "width": str(width), "depth": str(depth),
            "pooling": "cls", "dtype": dtype, "items_file": str(cfg.items), "items_fingerprint": catalog.fingerprint,
            "item_ids": json.dumps(item_ids[1:]), "source": "imported", "imported_from": str(Path(src).resolve()),
            "imported_files": imported_files(Path(src), m, item_ids),
        })
    check_replaced(metadata, Path(cfg.cache_dir), overwrite)
    for m in metadata:  # (as a build's: the header holds the shape's digits too)
        states = (DTYPES[dtype], (len(item_ids), len(keep[m]), shapes[m][1]))
        header_bytes(cache_file(cfg.cache_dir, m), {"states": states}, metadata[m])
    if not overwrite and (kept := kept_import(metadata, Path(cfg.cache_dir), allow_missing)):
        log.info("%s: imported before from the same files with these settings; kept as they are (--overwrite "
                 "imports again)", ", ".join(map(str, kept.values())))
        return kept
    check_import(Path(src), item_ids, keep, shapes, Path(cfg.cache_dir), DTYPES[dtype])  # (refused: no log either)
    with logging_to(build_log(Path(cfg.cache_dir), "import"), "import"):
        return import_caches(src, item_ids, keep, shapes, metadata, cfg.cache_dir, DTYPES[dtype], allow_missing,
                             progress=cfg.progress)
