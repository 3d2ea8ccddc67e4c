"""Whether a run folder's run read the same inputs as a config would now: the users and items files by
fingerprint (edited in place, a file keeps its name), a cached run's cache by what identifies its content
(``CACHE_RECORD``: encoder, weights, layers, precision, images, ...) and a live run's encoder folders by
their weights digest and config, and its image LMDB by the digest of its records (``encoder_record``), all
recorded in its results.json. A run's results, weights and checkpoints are of its inputs: a rerun or a
resume on other ones is refused, and so is using the trained run on them (``changed_inputs``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import Config
from ..data.cache import METADATA_KEYS, UNRECORDED, cache_file, compared, encoder_config_hash, read_metadata
from ..data.run_data import images_digest
from ..digests import file_fingerprint
from ..distributed import Dist, broadcast_text, gather_same
from ..errors import CacheError, ConfigError, DataError, parse_json
from ..methods import unread_keys
from ..model.build import modalities, model_name
from ..model.encoder_files import local_folder, weights_digest
from .checkpoint import CHECKPOINTS, DATA_PATHS, checkpoints, data_content

log = logging.getLogger(__name__)

FINGERPRINTED = {"users": "users_fingerprint", "items": "items_fingerprint"}  # config key -> results.json field


# What names a cache's content in results.json's ``cache``: its metadata (``METADATA_KEYS``) less what
# only locates or describes it (the item order is the items fingerprint's), and whether it was imported.
CACHE_RECORD = (*(k for k in METADATA_KEYS if k not in ("format", "modality", "encoder_config", "encoder_files",
                                                          "model_type", "depth", "items_file", "item_ids")), "source")


def cache_record(cfg: Config) -> dict[str, dict[str, str]]:
    """Per modality, what identifies the cache a cached run reads; {} for a live run, or for a cache that
    cannot be read here (the run reports that where it loads it)."""
    if not cfg.cached or not cfg.cache_dir:
        return {}
    record = {}
    for m in modalities(cfg):
        try:
            meta = read_metadata(cache_file(cfg.cache_dir, m))
        except CacheError:
            return {}
        record[m] = {k: meta[k] for k in CACHE_RECORD if k in meta}
    return record


SHARED = {"users": "users file", "items": "items file", "images": "image LMDB", "cache": "cache"}  # key -> its name


def refuse_other_data_on_ranks(cfg: Config, dist: Dist) -> None:
    """Under torchrun, a ``DataError`` in the same words on every rank where some rank reads other data than rank 0
    (its users or items file by fingerprint, a live run's image LMDB by the digest it records, a cached run's cache
    by ``cache_record``, which stands for its images): a copy on a node's own disk not yet whole, or another version
    of the data set there. Rank 0's copy names the run folder and what it records, so every rank must read what it
    reads; other data on one rank trained on something else, or waited for ever in a step the others never took.
    Collective."""
    if not dist.enabled:
        return
    # (a text-only run's images are not its data; a cached run never opens its LMDB: its cache says its images)
    unread = unread_keys(cfg.method, cfg.towers, cfg.feed) | ({"images"} if cfg.cached else set())
    mine = parse_json(json.dumps({**{k: None if k in unread else data_content(k, getattr(cfg, k))
                                     for k in DATA_PATHS}, "cache": cache_record(cfg)}))  # (as rank 0's: JSON)
    paths = {k: str(getattr(cfg, "cache_dir" if k == "cache" else k)) for k in SHARED}
    first = parse_json(broadcast_text(json.dumps({"content": mine, "paths": paths}), dist))
    flags = gather_same(torch.tensor([int(mine[k] != first["content"][k]) for k in SHARED]), dist)  # rank by rank
    where = []
    for i, (k, name) in enumerate(SHARED.items()):
        if ranks := ", ".join(str(r) for r, f in enumerate(flags) if f[i]):
            # (rank 0's own copy may be the one missing: it names nothing, where the others' name something)
            where.append(f"rank 0's {name} ({first['paths'][k]}) is not there or tells nothing of its content, where "
                         f"that of rank(s) {ranks} does" if first["content"][k] in (None, {}) else
                         f"the {name} of rank(s) {ranks} differs from rank 0's ({first['paths'][k]})")
    if where:
        raise DataError(f"the processes of this launch read different data: {'; '.join(where)} (a copy missing, not "
                        "yet whole, or of another version). Every process must read the same data: launch again once "
                        "they do")


def encoder_record(cfg: Config) -> dict[str, dict]:
    """Per modality, what identifies the encoder folder a live run reads: its weights digest (over the
    weight and tokenizer/processor files, with their sizes and times, so a later check reads no weights
    unless they changed) and its config.json's hash; for the image tower, also its LMDB's digest
    (``images``). {} for a cached run (its cache records its encoder and images) and the ID method; an
    encoder that is not a folder here is left out."""
    if cfg.cached or cfg.method == "id":
        return {}
    record: dict[str, dict] = {}
    for m in modalities(cfg):
        if (folder := local_folder(model_name(cfg, m), cfg.allow_download)) is not None:
            record[m] = {"folder": str(folder), "config": encoder_config_hash(folder), **weights_digest(folder)}
    if images := images_digest(cfg):
        record.setdefault("image", {})["images"] = images
    return record


def changed_inputs(cfg: Config, results: dict, run: Path) -> str:
    """Why the cache or an encoder or image LMDB that ``cfg`` reads now is not the one the run in ``run``
    recorded in its ``results``, or '': what using a trained run refuses. A cache of the same states in
    another precision (stored or computed) is not refused there (its small difference in the metrics is
    explained instead)."""
    return (changed_cache(cfg, results.get("cache"), run, same={"dtype", "encoder_dtype"})
            or changed_encoder(cfg, results.get("encoders"), run))


def changed_cache(cfg: Config, recorded, run: Path, same: frozenset[str] = frozenset()) -> str:
    """Why the cache ``cfg`` reads now is not the one the run in ``run`` recorded (``cache_record``: another
    precision, encoder weights, layers, images, ...), or '' (also for live runs and runs that recorded
    none). A key added to the record since (``UNRECORDED``) counts as what runs did before it; an ``UNTOLD``
    one is compared only where both records hold it (``cache.compared``). ``same``: keys not compared."""
    now = cache_record(cfg) if isinstance(recorded, dict) and recorded else {}
    for m, then in now.items():
        before = recorded.get(m)
        if not isinstance(before, dict):
            continue
        before, then = {**UNRECORDED, **before}, {**UNRECORDED, **then}
        # the encoder's name only locates it where both record its weights' digest (one folder, two spellings)
        skipped = same | ({"encoder"} if before.get("encoder_weights") and then.get("encoder_weights") else set())
        changes = [f"{k} {before.get(k)} then, {then.get(k)} now" for k in CACHE_RECORD if k not in skipped
                   and differs(k, before, then) and compared(k, before, then)]
        if changes:
            return f"{cache_file(cfg.cache_dir, m)} is not the cache {run} trained on ({'; '.join(changes)})"
    return ""


def differs(key: str, before: dict, then: dict) -> bool:
    """Whether two cache records differ in ``key``; in ``layers``, only where the cache now lacks one the run
    read (a cache rebuilt with --all-layers holds the run's layers too)."""
    if key != "layers":
        return before.get(key) != then.get(key)
    try:
        return not set(parse_json(before.get(key) or "[]")) <= set(parse_json(then.get(key) or "[]"))
    except (TypeError, ValueError):  # a record edited by hand
        return True


def changed_encoder(cfg: Config, recorded, run: Path) -> str:
    """Why an encoder folder ``cfg`` names now is not the one the run in ``run`` recorded (``encoder_record``:
    other weights, or another config.json), or the image LMDB holds other images, or '' (also for runs
    that recorded none)."""
    if not isinstance(recorded, dict):
        return ""
    for m, before in recorded.items():
        if not isinstance(before, dict) or m not in modalities(cfg):
            continue
        if before.get("images") and (images := images_digest(cfg)) and images != before["images"]:
            return (f"{cfg.images} is not the image LMDB {run} trained on (the digest of its records "
                    f"{before['images']} then, {images} now)")
        folder = local_folder(model_name(cfg, m), cfg.allow_download)
        if folder is None:  # a missing encoder is reported where it is loaded
            continue
        changes = []
        if before.get("digest") and (now := weights_digest(folder, before))["digest"] != before["digest"]:
            then = before.get("files") if isinstance(before.get("files"), dict) else {}
            touched = sorted(n for n in {*then, *now["files"]} if then.get(n) != now["files"].get(n))
            changes.append(f"weights digest {before['digest'][:16]} then, {now['digest'][:16]} now, over its weight "
                           f"and tokenizer/processor files; changed since: {', '.join(touched) or 'unknown'}")
        if before.get("config") and (config := encoder_config_hash(folder)) != before["config"]:
            changes.append(f"config.json hash {before['config']} then, {config} now")
        if changes:
            return f"{folder} is not the {m} encoder {run} trained with ({'; '.join(changes)})"
    return ""


def kept_nothing(folder: Path) -> bool:
    """Whether the run in ``folder`` left neither best weights nor a checkpoint: nothing of it is lost when
    another config starts there, and nothing of it was trained on inputs that could have changed."""
    return not (folder / "best.safetensors").is_file() and not checkpoints(folder / CHECKPOINTS)


UNCHECKED: set[Path] = set()  # run folders already said to have recorded no cache (once each)
UNCHECKED_IMAGES: set[Path] = set()  # live run folders already said to have recorded no image LMDB (once each)


def refuse_changed_data(cfg: Config, results: dict, folder: Path) -> None:
    """A ``ConfigError`` when the users or items file has changed (edited in place) since the run in
    ``folder`` recorded its fingerprint, or the cache it reads is not the one it trained on (another
    precision, encoder, layers; ``--cache-dir`` may change between attempts, the cache's content may not),
    or an encoder folder of a live run holds other weights or another config than it trained with:
    that run's results, best weights and checkpoints are of the old inputs, so it is neither returned as
    finished nor resumed on the new ones. A run that kept nothing (no checkpoint, no best weights: it failed
    before training, on a wrong cache or a bad file) is not held to its inputs: the corrected rerun starts."""
    if kept_nothing(folder):
        return
    if why := changed_cache(cfg, results.get("cache"), folder):
        raise ConfigError(f"{why}; use another --run-name to train on it")
    if cfg.cached and results and "cache" not in results and folder not in UNCHECKED:  # results of an older version
        UNCHECKED.add(folder)
        log.warning("%s recorded no cache (a run of an older version): whether %s holds the states it "
                    "trained on cannot be told; a cache rebuilt since from other encoders, tokenizers or images would "
                    "leave its results stale (`iisan evaluate` it, or train again with another --run-name)", folder,
                    cfg.cache_dir)
    if why := changed_encoder(cfg, results.get("encoders"), folder):
        raise ConfigError(f"{why}; use another --run-name to train with it, or restore the folder")
    image = encoders.get("image") if isinstance(encoders := results.get("encoders"), dict) else None
    if (not cfg.cached and results and not (isinstance(image, dict) and image.get("images"))
            and folder not in UNCHECKED_IMAGES and images_digest(cfg)):  # results of a version before ff4b0f2
        UNCHECKED_IMAGES.add(folder)
        log.warning("%s recorded no digest of its image LMDB (a run of an older version): whether %s holds the "
                    "images it trained on cannot be told; an LMDB rebuilt since from other pictures or settings "
                    "would leave its results stale (`iisan evaluate` it, or train again with another --run-name)",
                    folder, cfg.images)
    for key, field in FINGERPRINTED.items():
        recorded, path = results.get(field), getattr(cfg, key)
        if not (isinstance(recorded, str) and recorded and path and Path(path).is_file()):
            continue  # runs before the field was recorded; a missing file is reported where it is read
        if (now := file_fingerprint(path)) != recorded:
            raise ConfigError(f"{path} has changed since {folder} read it ({key} file fingerprint {recorded} then, "
                              f"{now} now): the run's results, weights and checkpoints are of the old file; use "
                              "another --run-name to train on this one, or restore the file")
