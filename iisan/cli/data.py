"""Subcommands that prepare inputs: data-stats, build-lmdb, make-tiny-models, cache."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..bounds import PIXELS, check_encoding, path_arg, positive_at_most, positive_int, utf8_path
from ..flags import add_config_arguments, config_from_args

log = logging.getLogger(__name__)


def cmd_data_stats(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..data.interactions import load_dataset

    check_encoding(args.encoding)
    data = load_dataset(args.users, args.items, args.max_seq_len, args.min_seq_len, args.allow_empty_titles,
                        args.encoding, args.merge_duplicate_users)
    stats = data.stats()
    print(f"users: {stats['users']:,}")
    print(f"items: {stats['items']:,}")
    print(f"interactions: {stats['interactions']:,}")
    skipped = ", ".join(f"{k} {v:,}" for k, v in data.skipped.items())
    print(f"skipped: {skipped}")
    repeated = {split: data.repeated_targets(split) for split in ("valid", "test")}
    print("targets that repeat an item of their history (misses under the protocol): " +
          ", ".join(f"{split} {n:,} ({100 * n / stats['users']:.1f} %)" for split, n in repeated.items()))


def cmd_build_lmdb(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..console import duration
    from ..data.image_build import build_image_lmdb
    from ..data.interactions import read_items

    check_encoding(args.encoding)
    start = time.monotonic()
    ids = read_items(args.items, allow_empty_titles=True, encoding=args.encoding).ids if args.items else None
    report = build_image_lmdb(args.images, args.out, ids, size=args.size, extension=args.extension,
                              progress=args.progress, overwrite=args.overwrite, inputs=[args.items],
                              pixels=args.pixels)
    if report.get("kept"):
        print(f"kept {report['path']}: built from these same {report['stored']:,} images and settings, unchanged since "
              f"({report['blank']:,} flagged blanks, listed in {report['report']}); --overwrite builds it again")
        return
    print(f"stored {report['stored']:,} images in {report['path']} in {duration(time.monotonic() - start)} "
          f"({report['blank']:,} missing or unreadable, stored as flagged blanks; list in {report['report']})")


def cmd_make_tiny_models(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..claims import claim_folder
    from ..data.interactions import read_items
    from ..model.encoder_files import TINY_MARKER
    from ..model.tiny import vocabulary, write_base_architectures, write_bert, write_llama, write_vit

    out = Path(args.out)
    names = ("bert-base-random", "vit-base-random") if args.base else ("tiny-bert", "tiny-vit", "tiny-llama")
    for name in names:  # save_pretrained replaces files by name: only in folders this command made
        if (out / name / TINY_MARKER).is_file():
            log.info("%s: written again (a random model folder this command made before)", out / name)
        claim_folder(out / name, TINY_MARKER, "a random model folder IISAN wrote", "--out")
    if args.base:
        text_dir, image_dir = write_base_architectures(out)
        print(f"random-weight BERT-base: {text_dir}\nrandom-weight ViT-B/16: {image_dir}")
        return
    check_encoding(args.encoding)
    # (empty titles add no word: a MicroLens items file has some, and the command has no --allow-empty-titles)
    titles = read_items(args.items, True, args.encoding).titles if args.items else ["a tiny vocabulary of words"]
    vocab = vocabulary(titles)
    print(write_bert(out / "tiny-bert", vocab, hidden=args.hidden, layers=args.layers))
    print(write_vit(out / "tiny-vit", hidden=args.hidden, layers=args.layers))
    print(write_llama(out / "tiny-llama", vocab, hidden=args.hidden + 16, layers=args.layers + 2))


def tiny_width(text: str) -> int:
    width = positive_int(text)
    if width % 8:  # LLaMA's rotary embedding wants an even width per head: (width + 16) / 4
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 8")
    if width > 4096:  # tiny models: a test's, a demo's
        raise argparse.ArgumentTypeError(f"{width} is more than 4096")
    return width


def tiny_depth(text: str) -> int:
    depth = positive_int(text)
    if depth > 64:
        raise argparse.ArgumentTypeError(f"{depth} is more than 64")
    return depth


# What a cache depends on, and how it is built: the flags `iisan cache --help` lists.
CACHE_KEYS = ("users", "items", "images", "max_seq_len", "min_seq_len", "title_tokens", "allow_empty_titles",
              "encoding", "merge_duplicate_users", "text_model", "image_model", "allow_download", "towers",
              "text_layers", "image_layers", "layer_groups", "layer_rule", "include_embedding_state", "text_pooling",
              "image_norm", "encoder_dtype", "patch_embedding", "cache_dir", "cache_dtype", "device", "num_workers",
              "encode_batch_size", "progress")


def cmd_cache(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..errors import InUse
    from ..locks import when_free
    from ..model.caching import build_cache_from_config

    def build() -> dict:
        return build_cache_from_config(config_from_args(args), all_items=args.all_items, all_layers=args.all_layers,
                                       overwrite=args.overwrite, reuse=args.reuse or not args.overwrite)

    try:
        paths = when_free(build) if args.reuse else build()
    except InUse as err:
        raise InUse(f"{err} (--reuse waits for it and keeps what it builds)") from None
    for modality, path in paths.items():
        print(f"{modality}: {path}")


def add_data_commands(sub) -> None:
    p = sub.add_parser("data-stats", help="users, items and interactions after the paper's protocol")
    p.add_argument("--users", type=path_arg, required=True, help="users file (TSV, or CSV: docs/formats.md)")
    p.add_argument("--items", type=path_arg, required=True, help="items file (TSV, or CSV: docs/formats.md)")
    p.add_argument("--max-seq-len", type=positive_at_most("max_seq_len"), default=10,
                   help="items before a target (default: 10)")
    p.add_argument("--min-seq-len", type=positive_at_most("min_seq_len"), default=5,
                   help="fewest interactions a user needs "
                   "(default: 5)")
    p.add_argument("--allow-empty-titles", action="store_true",
                   help="accept empty titles (MicroLens) instead of rejecting the file")
    p.add_argument("--encoding", default="utf-8", help="text encoding of both files (default: utf-8)")
    p.add_argument("--merge-duplicate-users", action="store_true",
                   help="join the lines of a user id that appears on several lines, in file order")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("build-lmdb", help="store a folder of <item_id>.jpg as a pre-resized image LMDB")
    p.add_argument("--images", type=path_arg, required=True, help="folder of <item_id>.jpg")
    p.add_argument("--out", type=utf8_path, required=True, help="LMDB folder to write")
    p.add_argument("--items", type=path_arg, default=None,
                   help="items file (TSV or CSV): store exactly these ids (missing ones as blanks)")
    p.add_argument("--size", type=int, default=224, help="side of the stored square images, in pixels "
                   "(default: 224)")
    p.add_argument("--extension", default=".jpg", help="file extension of the images in --images, "
                   "<item_id><extension> (default: .jpg)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --items (default: utf-8)")
    p.add_argument("--pixels", choices=PIXELS, default="displayed",
                   help="how pictures become pixels: displayed = as a viewer shows them (turned upright by their EXIF "
                   "orientation, transparent areas on white, 16-bit grey scaled to 8 bits); authors = PIL's "
                   "convert('RGB') alone, as the authors' build_lmdb.py (the same for JPEGs without an orientation "
                   "tag, as the paper's data) (default: displayed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an image LMDB that --out already holds (nothing else is ever replaced); without "
                   "it, one built from the same pictures (names, sizes and times; or the same bytes, copied with "
                   "new times) and settings is kept, and one built otherwise is refused")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_build_lmdb)

    p = sub.add_parser("make-tiny-models", help="write tiny random BERT, ViT and LLaMA checkpoints (offline)")
    p.add_argument("--out", type=utf8_path, default="pretrained_models", help="parent folder of the model folders "
                   "(default: pretrained_models)")
    p.add_argument("--items", type=path_arg, default=None,
                   help="items file (TSV or CSV) whose titles make the tokenizer vocabulary")
    p.add_argument("--encoding", default="utf-8", help="text encoding of --items (default: utf-8)")
    p.add_argument("--hidden", type=tiny_width, default=32,
                   help="width of BERT and ViT (2 heads each; LLaMA gets 16 more, 4 heads): a multiple of 8, at "
                        "most 4096 (default: 32)")
    p.add_argument("--layers", type=tiny_depth, default=2,
                   help="layers of BERT and ViT (LLaMA gets 2 more), at most 64 (default: 2)")
    p.add_argument("--base", action="store_true", help="full-size BERT-base and ViT-B/16 with random weights")
    p.set_defaults(func=cmd_make_tiny_models)

    p = sub.add_parser("cache", help="run the frozen encoders once and write the hidden-state cache "
                                     "(resumable: run it again after an interruption)",
                       description="Run the frozen encoders once over the items and write the hidden-state cache "
                                   "that cached runs read. Resumable: run it again after an interruption. A tower's "
                                   "cache there built with the same settings is kept: run again, it encodes nothing.",
                       epilog="Every other `iisan train` flag is taken too and changes nothing here, so a "
                              "training command line (or --config file) builds the cache its run reads.")
    add_config_arguments(p, shown=CACHE_KEYS)
    p.add_argument("--all-items", action="store_true", help="every row of the items file, not only used items")
    p.add_argument("--all-layers", action="store_true",
                   help="every hidden state of each encoder, so that one cache serves any --text-layers / "
                        "--image-layers choice (runs read only their own layers from it)")
    p.add_argument("--overwrite", action="store_true", help="build the cache again, replacing what --cache-dir "
                   "holds (without it, a tower's cache built with the same settings, or every layer, is kept, judged "
                   "by its settings, and one built with other settings is refused)")
    p.add_argument("--reuse", action="store_true", help="wait while another process builds in --cache-dir, then keep "
                   "what it built (the tasks of a job array sharing one cache); with --overwrite, keep a cache built "
                   "with the same settings and replace one built otherwise")
    p.set_defaults(func=cmd_cache)
