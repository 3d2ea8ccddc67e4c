"""A run's data from its config: the users and items files after the protocol (``load_data``), the image
LMDB and its pixels, and the cache folder a cached run reads. Each names the flag to give when its input
is missing. What needs the encoders (their folders, layers and caches' acceptance) is ``model.build``'s."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import once
from ..config import Config
from ..errors import ConfigError, DataError, UserError
from ..methods import unread_keys
from .batches import PixelSource
from .cache import cache_file, read_metadata
from .images import ImageStore, recorded_digest
from .interactions import SeqRecData, check_data_file, load_dataset

log = logging.getLogger(__name__)


def check_data_files(cfg: Config) -> None:
    """The users and items files are given and exist."""
    if not cfg.users or not cfg.items:
        raise ConfigError("users and items files are required (--users FILE --items FILE)")
    for what, path in (("users", cfg.users), ("items", cfg.items)):
        check_data_file(Path(path), what)


def load_data(cfg: Config, run_dir: Path | None = None) -> SeqRecData:
    """``cfg``'s data after the protocol; with ``run_dir``, a trained run's (evaluate, recommend, export): there a
    file that cannot be read as the run read it is to be restored, not read with a flag those commands lack."""
    check_data_files(cfg)
    try:
        return load_dataset(cfg.users, cfg.items, cfg.max_seq_len, cfg.min_seq_len, cfg.allow_empty_titles,
                            cfg.encoding, cfg.merge_duplicate_users)
    except DataError as err:
        if run_dir is None or " pass --" not in str(err):
            raise
        raise DataError(f"{err} (for a new run: {run_dir} read its data through its config.json, with its own "
                        "settings; restore the file it trained on)") from None


def check_trainable(data: SeqRecData, cfg: Config) -> None:
    """A ``DataError`` for data on which training computes nothing, a loss of 0 at every step: the loss ranks
    each target against the other items of its batch (one user, or one item, leaves none: as --batch-size 1,
    bounds.py), and a target needs an item before it in the training part (the part before the validation
    and test items)."""
    if data.num_users < 2:
        raise DataError(f"{cfg.users}: 1 user after the protocol trains nothing: the loss ranks each target "
                        "against the items of the other users in its batch, and there are none")
    if data.num_items < 2:
        raise DataError(f"{cfg.users}: 1 item after the protocol trains nothing: the loss ranks each target "
                        "against the other items in its batch, and there are none")
    if not (data.train_sequences()[:, :-1] != 0).any():
        raise DataError(f"{cfg.users}: no user has more than 3 interactions after the protocol, which trains "
                        "nothing: the validation and test items leave each user 1 item to train on, and a target "
                        "needs an item before it (--min-seq-len 4 or more keeps only users that have one)")


def describe_data(data: SeqRecData, cfg: Config) -> str:
    """The log line of a run's data: its size and, unless ranked, the test targets that repeat an item of
    their history (masked with it: misses whatever the model, as the authors counted them; a warning when
    they are most of them, as in data built otherwise than the paper's)."""
    unused = len(data.catalog) - data.num_items  # items of the file no kept user's history holds: left out
    items = f"{data.num_items:,} items" + (f" ({unused:,} more in {Path(cfg.items).name} in no kept user's history)"
                                            if unused > 0 else "")
    line = f"data: {data.num_users:,} users, {items}, {data.num_interactions:,} interactions"
    repeated = 0 if cfg.rank_repeated_targets else data.repeated_targets("test")
    if not repeated:
        return line
    share = repeated / data.num_users
    note = (f"{repeated:,} test targets ({100 * share:.1f} %) repeat an item of their history and count as misses "
            "(iisan train --rank-repeated-targets ranks them)")
    if share >= 0.5:  # a warning once per data set in a process (a sweep's later runs: at INFO, for their log)
        log.log(once.level("repeated targets", (cfg.users, cfg.items, repeated)), "%s", note)
        return line
    return f"{line}; {note}"


def cache_dir(cfg: Config) -> str:
    if not cfg.cache_dir:
        raise ConfigError("feed=cached needs --cache-dir (build the cache with `iisan cache`)")
    return cfg.cache_dir


def image_store(cfg: Config) -> ImageStore:
    if not cfg.images:
        raise ConfigError("the image tower needs an image LMDB (--images PATH, built by `iisan build-lmdb`); without "
                          "images, --towers text trains a text-only item tower")
    return ImageStore(cfg.images)


def pixel_source(cfg: Config, item_ids: list[str]) -> PixelSource:
    """Pixels from the image LMDB; items without an image are counted, logged and served as blanks. An LMDB
    holding none of the items is refused (another data set's), unless it is a store of blanks by design."""
    store = image_store(cfg)
    missing, flagged = store.blank_ids(item_ids)
    if store.blank_by_design:  # a stand-in where no images are available: every item a blank, said so
        log.log(once.level("blank store", (cfg.images, len(missing))), "%s holds no images by design (source %r): "
                "all %d items are encoded from a blank image", cfg.images, store.meta["source"], len(missing))
    elif missing and len(missing) == len([i for i in item_ids if i]):  # another data set's LMDB, or an empty one
        raise ConfigError(f"images={cfg.images} holds none of the {len(missing)} items of {cfg.items} (e.g. "
                          f"{missing[0]}): give this data's LMDB (--images, built by `iisan build-lmdb`), or "
                          "--towers text")
    if missing or flagged:
        counts = " and ".join(text for n, text in ((len(missing), f"{len(missing)} items have no image"),
                                                   (len(flagged), f"{len(flagged)} were stored as blanks")) if n)
        log.log(once.level("missing images", (cfg.images, counts)), "%s: %s; they are encoded from a blank image "
                "(e.g. %s)", cfg.images, counts, (missing + flagged)[0])
    return PixelSource(store, item_ids, threads=cfg.num_workers)


def images_digest(cfg: Config) -> str | None:
    """What names the pixels of the image LMDB a run reads, as the LMDB records it (``store_digest``); None
    without an image tower, where the LMDB is not here (a cached run's cache then stands for it), or where it
    was built before LMDBs recorded it (a run does not read every image to compute it)."""
    if not cfg.images or "images" in unread_keys(cfg.method, cfg.towers, cfg.feed):
        return None
    return recorded_digest(cfg.images)


def images_content(path: str, cache_dir: str | None = None) -> str | None:
    """What names the images of the LMDB at ``path``: the digest the LMDB records (``store_digest``); where it is not
    here (or records none), what the image cache in ``cache_dir`` (a cached run's) records of the LMDB it was built
    from: a cached run never opens its LMDB, and a node may hold the cache alone. None where neither tells (a
    damaged one tells nothing)."""
    for read in (lambda: recorded_digest(path),
                 lambda: cache_dir and read_metadata(cache_file(cache_dir, "image"))["images"]):
        try:
            if found := read():
                return found
        except (OSError, UserError, KeyError):  # (KeyError: a cache built before caches recorded their images)
            continue
    return None
