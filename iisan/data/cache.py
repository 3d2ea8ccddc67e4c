"""The hidden-state cache: one safetensors file per modality holding the selected layers as one
contiguous array ``states`` of shape (items + 1, layers, width), row 0 = padding (zeros). Built by
``cache_build`` (resumable); read and checked here. A cache may hold more layers than a run reads (one
built with ``--all-layers`` holds every hidden state): the run reads only its own layers from it.

Metadata (all strings, as safetensors requires; the keys are ``METADATA_KEYS``, which the writer,
``model.caching.cache_metadata``, and the readers here share): format, modality, encoder, encoder config
hash, the digest of the encoder's weight and tokenizer/processor files (with their sizes and times, so
checking it later reads no weights unless they changed), model type, layer indices, width, depth,
pooling, dtype, a text cache's title length, an image cache's pixel normalisation, the items file, a
fingerprint of it and the item-id order of the rows. Training refuses a cache whose metadata does not
match what its config expects (``CacheExpectation``, built by ``model.build.cache_expectation``) and says
what differs; the row order must follow the data set's (items-file) order, and every row must be finite.

A cache imported from the authors' stored states (``cache_import``; metadata ``source=imported``,
``imported_from``) records no encoder config hash or weights digest of a local folder: its layers,
width, items file, item order and finite rows are checked like any cache's, its encoder's identity is
not (it is logged as imported).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import CacheError, parse_json
from ..files import check_readable, failure_reason, require_space, shown

log = logging.getLogger(__name__)

FORMAT = "iisan-cache/1"
CHECKED_BYTES = 1 << 24  # the float32 rows one finiteness check of a loaded cache takes (nonfinite_rows)


def cache_file(cache_dir: str | Path, modality: str) -> Path:
    return Path(cache_dir) / f"{modality}.safetensors"


STATE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # metadata dtype -> safetensors code
# A cache's metadata keys, as a build writes them (``model.caching.cache_metadata``); ``title_tokens`` is a
# text cache's only, and so is ``titles`` (a digest of the titles as read: the file's encoding shows there);
# ``image_norm`` (--image-norm) an image cache's; ``encoder_dtype``: the precision of the encoder's weights
# (``dtype``: of the stored states).
METADATA_KEYS = ("format", "modality", "encoder", "encoder_config", "encoder_weights", "encoder_files", "model_type",
                 "layers", "width", "depth", "pooling", "dtype", "encoder_dtype", "title_tokens", "titles",
                 "image_norm", "images", "items_file", "items_fingerprint", "item_ids")
# What an import adds (``cache_import``, which records no encoder_weights, encoder_files or title_tokens).
IMPORT_KEYS = ("source", "imported_from", "imported_files", "imported_missing")
# Where the encoder and the items file were, and their files' sizes and times: the same contents (the weights
# digest, the items fingerprint) moved, copied or touched differ only there. What files an import read (a run of
# it again keeps a cache of the same) and its count of items without a file are its result, not settings.
SIDECAR = ".building"  # a build in progress: its manifest and finished chunks (``cache_build``)
VOLATILE = frozenset({"encoder", "items_file", "encoder_files", "imported_files", "imported_missing"})
# Keys older caches may lack; ``read_metadata`` requires the others (format is checked on its own).
OPTIONAL = ("encoder_files", "model_type", "pooling", "title_tokens", "image_norm", "images", "encoder_dtype", "titles")
# What a cache without the key was built with: every cache before --image-norm used the processor's statistics.
UNRECORDED = {"image_norm": "processor"}
# Keys whose value a cache (or a record of one) without them cannot tell: compared only where both hold them
# (``compared``). ``title_tokens``: a text cache's title length, recorded since commit 79420f4 (the loader
# never held an older cache to it either); ``images``: an image cache's LMDB, by the digest of its records
# (``images.store_digest``); ``encoder_dtype``: recorded by caches built after commit 134175e; ``titles``: the
# latest, a cache without it says nothing of how its titles were decoded. In the order versions began to record them.
UNTOLD_SINCE = ("title_tokens", "images", "encoder_dtype", "titles")
UNTOLD = frozenset(UNTOLD_SINCE)
REQUIRED = tuple(key for key in METADATA_KEYS if key not in ("format", *OPTIONAL))


def compared(key: str, old: dict, new: dict) -> bool:
    """Whether two caches' metadata (or records of it) are compared in ``key``: an ``UNTOLD`` key only where
    both hold it."""
    return key not in UNTOLD or (key in old and key in new)


def require_cache_space(out_dir: str | Path, needed: int, modalities, items: int, dtype: torch.dtype) -> None:
    """``files.require_space`` for a cache's states: ``needed`` bytes for ``items`` items of ``modalities``."""
    require_space(out_dir, needed, f"the {', '.join(modalities)} states of {items:,} items "
                                   f"({str(dtype).removeprefix('torch.')})")


def declared_metadata(record: dict[str, str]) -> dict[str, str]:
    """A writer's ``record``, refused if it holds a key in neither ``METADATA_KEYS`` nor ``IMPORT_KEYS``
    (no reader would ever check it)."""
    if unknown := sorted(set(record) - set(METADATA_KEYS + IMPORT_KEYS)):
        raise ValueError(f"cache metadata {unknown} is not declared in data.cache.METADATA_KEYS or IMPORT_KEYS")
    return record


def encoder_config_hash(folder: str | Path | None) -> str | None:
    """Hash of an encoder folder's config.json (None without a folder or a config)."""
    path = Path(folder) / "config.json" if folder else None
    if path is None or not path.is_file():
        return None
    config = parse_json(path.read_text(encoding="utf-8"))
    for volatile in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of the cache file at ``path``, refused in one line when the file is missing or not a
    cache, or when its metadata is damaged or incomplete (``metadata_problem``)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CacheError(f"cache file {path} is {'a folder' if path.is_dir() else 'not a regular file'}; expected "
                         "the safetensors file `iisan cache` writes")
    if path.parent.exists() and not path.parent.is_dir():
        raise CacheError(f"cache folder {path.parent} is a file; expected the folder `iisan cache` writes "
                         "(--cache-dir)")
    if not path.is_file() and (path.parent / SIDECAR).is_dir():
        raise CacheError(f"cache file {shown(path)} does not exist: a build of it stopped before it finished "
                         f"({shown(path.parent / SIDECAR)} holds its finished chunks); run the same `iisan cache` "
                         "command again to finish it")
    if not path.is_file():
        raise CacheError(f"cache file {shown(path)} does not exist (build it with `iisan cache --cache-dir "
                         f"{path.parent}` and the same data and encoder flags, or preprocess_vectors.py)")
    try:
        check_readable(path)  # safetensors calls a file it may not read missing
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except OSError as err:
        raise CacheError(f"cache file {path} cannot be read ({failure_reason(err)})") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CacheError(f"cache file {path} is unreadable: {err}") from None
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path} is not an IISAN cache (format {meta.get('format')!r}, expected {FORMAT})")
    if problem := metadata_problem(meta):
        raise CacheError(f"cache {path}{problem}; {rebuild(meta)}")
    return meta


def rebuild(meta: dict[str, str]) -> str:
    """Advice to rebuild a damaged cache in the precision it has (float32 by default): rebuilt in another, the runs
    trained on it would be refused it ('dtype float16 then, float32 now')."""
    kept = f" --cache-dtype {meta['dtype']}" if meta.get("dtype") in ("float16", "bfloat16") else ""
    return f"rebuild it with `iisan cache --overwrite{kept}`"


def metadata_problem(meta: dict[str, str]) -> str | None:
    """What is wrong with a cache's metadata, as the rest of a sentence after the cache's path (None: nothing).
    Every ``REQUIRED`` key (an imported cache records no weights digest: module docstring), and the keys
    whose values are read as JSON or numbers of the kinds a build writes."""
    exempt = {"encoder_weights"} if meta.get("source") == "imported" else set()
    if missing := [key for key in REQUIRED if key not in meta and key not in exempt]:
        return f" lacks the metadata {', '.join(missing)} (damaged, or built by an earlier version of IISAN)"
    for key, kind in (("layers", int), ("item_ids", str)):
        values = _json(meta[key])
        if not isinstance(values, list) or not all(type(v) is kind for v in values):  # (a bool is an int)
            return f": its metadata {key!r} is not a JSON list of {kind.__name__}s (damaged)"
    if not isinstance(_json(meta.get("encoder_files", "{}")), dict):
        return ": its metadata 'encoder_files' is not a JSON object (damaged)"
    if not meta["width"].isdecimal() or not meta["depth"].isdecimal():  # (isdigit takes '²', which int() refuses)
        return f": its metadata width {meta['width']!r} / depth {meta['depth']!r} are not integers (damaged)"
    if meta["dtype"] not in STATE_DTYPES:
        return f": its metadata dtype {meta['dtype']!r} is not one of {', '.join(STATE_DTYPES)} (damaged)"
    return None


def _json(text: str):
    """``text`` as JSON, or None where it is not JSON."""
    try:
        return parse_json(text)
    except ValueError:  # not JSON, a 4300-digit integer, nesting too deep
        return None


def dtype_name(code: str) -> str:
    """A safetensors dtype code as torch names it: F16 -> float16, I32 -> int32, BOOL -> bool."""
    parts = re.fullmatch(r"(BF|F|I|U)(\d+)(.*)", code)
    if parts is None:
        return code.lower()
    return {"BF": "bfloat", "F": "float", "I": "int", "U": "uint"}[parts[1]] + parts[2] + parts[3].lower()


def check_stored_dtype(path: Path, code: str, meta: dict[str, str]) -> None:
    """The states' stored dtype (safetensors ``code``) is the floating type the metadata names: an integer
    table would be read as truncated features, another float type means the file was rewritten."""
    if code not in STATE_DTYPES.values():
        raise CacheError(f"cache {path} holds states of dtype {dtype_name(code)}, expected a floating type "
                         f"({meta['dtype']}, as its metadata says); {rebuild(meta)}")
    if code != STATE_DTYPES[meta["dtype"]]:
        raise CacheError(f"cache {path} holds {dtype_name(code)} states, but its metadata says {meta['dtype']}; "
                         f"{rebuild(meta)}")


def weights_record(meta: dict[str, str]) -> dict:
    """The encoder-weights record in a cache's metadata (``model.encoder_files.weights_digest``'s ``known``):
    its digest stands while the encoder folder's files keep their sizes and times."""
    return {"digest": meta.get("encoder_weights", ""), "files": parse_json(meta.get("encoder_files", "{}"))}


def recorded_weights(path: Path) -> dict | None:
    """``weights_record`` of the cache file at ``path``, or None when there is none (or it cannot be read)."""
    try:
        return weights_record(read_metadata(path)) if path.exists() else None
    except (CacheError, ValueError):
        return None


def is_cache_file(path: Path) -> bool:
    """Whether ``path`` is a cache file this project wrote (its format record; its other metadata may be
    damaged or old)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file: safetensors raises its own error types
        return False


@dataclass(frozen=True)
class CacheExpectation:
    """What a run accepts of a cache's metadata (``check_metadata``); None skips a check. ``encoder`` is
    the run's encoder name, for messages only; ``layers`` may be a subset of the cache's."""

    modality: str | None = None
    items_fingerprint: str | None = None
    layers: tuple[int, ...] | None = None
    width: int | None = None
    encoder: str = ""
    encoder_config: str | None = None
    encoder_weights: str | None = None
    pooling: str | None = None
    dtype: str | None = None
    encoder_dtype: str | None = None
    title_tokens: str | None = None
    titles: str | None = None
    image_norm: str | None = None
    images: str | None = None


def check_metadata(path: Path, meta: dict[str, str], expected: CacheExpectation) -> None:
    """The cache's modality, layers (it may hold more), width, items fingerprint, encoder config hash or
    else weights digest (an imported cache's digest is never compared), pooling, dtype, encoder_dtype,
    title_tokens, a text cache's titles, image_norm and an image cache's images (where it records them) match
    what is expected; a
    check is skipped when ``expected`` leaves it out, and pooling, dtype, encoder_dtype and title_tokens also
    when the cache does not record them (a cache without image_norm was normalised with the processor's statistics). All
    differences are named in one error."""
    differences, other_way = [], ""
    if expected.layers is not None:
        stored = parse_json(meta["layers"])
        if missing := [layer for layer in expected.layers if layer not in stored]:
            differences.append(f"layers {stored}, without {missing} (config asks for {list(expected.layers)}; "
                               "a cache built with --all-layers serves every layer choice)")
    if expected.width is not None and int(meta["width"]) != int(expected.width):
        differences.append(f"width {meta['width']} (config's encoder has {expected.width})")
    other_file = bool(expected.items_fingerprint) and meta["items_fingerprint"] != expected.items_fingerprint
    if other_file:
        differences.append(f"items file {meta['items_file']} with fingerprint {meta['items_fingerprint']} "
                           f"(config's items file has {expected.items_fingerprint})")
    if expected.encoder_config and meta.get("encoder_config") and meta["encoder_config"] != expected.encoder_config:
        now = "that folder" if meta["encoder"] == expected.encoder else f"the config's encoder {expected.encoder}"
        differences.append(f"encoder {meta['encoder']} with config digest {meta['encoder_config'][:16]} ({now}: its "
                           f"config.json now has {expected.encoder_config[:16]}, another model)")
    elif expected.encoder_weights and meta.get("source") != "imported" and \
            meta["encoder_weights"] != expected.encoder_weights:
        differences.append(f"encoder {meta['encoder']} with weights digest {meta['encoder_weights'][:16]} (the "
                           f"weight, tokenizer and processor files of {expected.encoder} now have "
                           f"{expected.encoder_weights[:16]})")
    for key in ("pooling", "dtype", "encoder_dtype", "title_tokens"):  # older caches and imports may lack them
        wanted = getattr(expected, key)
        if wanted and meta.get(key) and meta[key] != wanted:
            differences.append(f"{key} {meta[key]} (config asks for {wanted})")
    # the authors' stored states (an import) were normalised as theirs; their ViT-B/16 has 0.5 either way
    if expected.image_norm and meta.get("source") != "imported" and \
            (built := meta.get("image_norm", UNRECORDED["image_norm"])) != expected.image_norm:
        differences.append(f"image_norm {built} (config asks for {expected.image_norm})")
        other_way = f" (or use it as built: --image-norm {built})"
    # titles of another file differ as a matter of course (said above); of the same file, by their decoding
    if expected.titles and meta.get("titles") and meta["titles"] != expected.titles and not other_file:
        differences.append(f"titles with digest {meta['titles']} (the config's items file, as this run decodes it, "
                           f"gives {expected.titles}: the same file read with another --encoding?)")
    if expected.images and meta.get("images") and meta["images"] != expected.images:
        differences.append(f"the images whose LMDB has digest {meta['images']} (config's --images has "
                           f"{expected.images})")
    if expected.modality is not None and meta["modality"] != expected.modality:
        differences.append(f"modality {meta['modality']} (expected {expected.modality})")
    if differences:
        raise CacheError(f"cache {path} was built for " + "; ".join(differences)
                         + f" — rebuild it with `iisan cache --overwrite`{other_way}, or keep it and give this run "
                         "another --cache-dir")


def load_cache(path: str | Path, expected: CacheExpectation,
               dataset_item_ids: list[str]) -> tuple[torch.Tensor, dict]:
    """The cache as a table in dataset order, ``(N + 1, layers, width)`` (row 0 zeros), and its metadata,
    checked against ``expected``; ``expected.layers``, when given, picks those layers (in that order) out of
    the cache's."""
    path = Path(path)
    meta = read_metadata(path)
    check_metadata(path, meta, expected)
    if meta.get("source") == "imported":
        log.info("%s was imported from %s (%s states): its layers, width and items were checked, its encoder's "
                 "identity cannot be", path, meta.get("imported_from"), meta.get("encoder"))
    order = {item_id: row + 1 for row, item_id in enumerate(parse_json(meta["item_ids"]))}
    rows = np.array([0] + [order.get(i, -1) for i in dataset_item_ids[1:]], dtype=np.int64)
    absent = np.flatnonzero(rows < 0)
    if len(absent):
        example = dataset_item_ids[absent[0]]
        raise CacheError(f"cache {path} lacks {len(absent)} of the data set's items (e.g. {example!r}); "
                         "rebuild it for this data set")
    positions = rows[1:]
    if len(positions) > 1 and (np.diff(positions) <= 0).any():
        raise CacheError(f"cache {path} lists its item ids in another order than the data set's items file "
                         f"({meta['items_file']}); its rows cannot be trusted: rebuild it with "
                         "`iisan cache --overwrite`")
    layers = parse_json(meta["layers"])
    picked = [layers.index(layer) for layer in (layers if expected.layers is None else expected.layers)]
    try:
        check_readable(path)  # readable when its metadata was read; not necessarily still
        with safe_open(str(path), framework="pt") as fh:
            stored = fh.get_slice("states")
            shape = tuple(stored.get_shape())
            if shape[1:] != (len(layers), int(meta["width"])) or shape[0] != len(order) + 1:
                raise CacheError(f"cache {path} holds states of shape {shape}, but its metadata says "
                                 f"{len(order) + 1} rows x {len(layers)} layers x width {meta['width']}; rebuild "
                                 "it with `iisan cache --overwrite`")
            check_stored_dtype(path, stored.get_dtype(), meta)
            if picked == list(range(len(layers))):
                states = stored[:]
            else:  # read only the layers asked for, one (items, 1, width) slice each
                states = torch.cat([stored[:, p : p + 1] for p in picked], dim=1)
    except CacheError:
        raise
    except OSError as err:
        raise CacheError(f"cache file {path} cannot be read ({failure_reason(err)})") from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CacheError(f"cache file {path} is unreadable: {err}") from None
    # A cache built for this data set lists its items in the data set's order: no gather, no second copy of it.
    table = states[: len(rows)] if np.array_equal(rows, np.arange(len(rows))) else states[torch.from_numpy(rows)]
    if len(bad := nonfinite_rows(table)):
        raise CacheError(f"cache {path}: the states of item {dataset_item_ids[int(bad[0])]!r} are not finite (NaN or "
                         f"inf; {len(bad)} item(s) in all); {rebuild(meta)}")
    return table, meta


def nonfinite_rows(table: torch.Tensor) -> torch.Tensor:
    """The rows of ``table`` holding a NaN or an infinity, ``CHECKED_BYTES`` at a time: at once, a CPU makes a float32
    copy of a half-precision table and a mask (2.5x the table: 13 GB more for 500k items x 7 layers x 768)."""
    step = max(1, CHECKED_BYTES // (4 * max(1, table[:1].numel())))
    found = [torch.nonzero(~torch.isfinite(part.flatten(1)).all(1)).flatten() + start
             for start, part in zip(range(0, len(table), step), table.split(step))]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
