"""``iisan`` command line: data-stats, build-lmdb, make-tiny-models, cache, train, demo, params, results.

Every training/caching flag is a ``Config`` field (``iisan train --help`` lists them). Bad input ends
with one line on stderr (``iisan: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .backbones import EncoderError
from .cache import CacheError
from .config import ConfigError, add_config_arguments, config_from_args
from .data.images import ImageStoreError
from .data.interactions import DataError

USER_ERRORS = (ConfigError, DataError, EncoderError, CacheError, ImageStoreError)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING  # under torchrun, rank 0 speaks for all; other ranks report only trouble
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_data_stats(args) -> None:
    from .data.interactions import load_dataset

    data = load_dataset(args.users, args.items, args.max_seq_len, args.min_seq_len, args.allow_empty_titles)
    stats = data.stats()
    print(f"users: {stats['users']:,}")
    print(f"items: {stats['items']:,}")
    print(f"interactions: {stats['interactions']:,}")
    skipped = ", ".join(f"{k} {v:,}" for k, v in data.skipped.items())
    print(f"skipped: {skipped}")


def cmd_build_lmdb(args) -> None:
    from .data.images import build_image_lmdb
    from .data.interactions import read_items

    ids = read_items(args.items, allow_empty_titles=True).ids if args.items else None
    report = build_image_lmdb(args.images, args.out, ids, size=args.size, extension=args.extension)
    print(f"stored {report['stored']:,} images in {report['path']} "
          f"({report['blank']:,} missing or unreadable, stored as flagged blanks; list in {report['report']})")


def cmd_make_tiny_models(args) -> None:
    from pathlib import Path

    from .data.interactions import read_items
    from .tiny import vocabulary, write_base_architectures, write_bert, write_llama, write_vit

    out = Path(args.out)
    if args.base:
        text_dir, image_dir = write_base_architectures(out)
        print(f"random-weight BERT-base: {text_dir}\nrandom-weight ViT-B/16: {image_dir}")
        return
    titles = read_items(args.items).titles if args.items else ["a tiny vocabulary of words"]
    vocab = vocabulary(titles)
    print(write_bert(out / "tiny-bert", vocab, hidden=args.hidden, layers=args.layers))
    print(write_vit(out / "tiny-vit", hidden=args.hidden, layers=args.layers))
    print(write_llama(out / "tiny-llama", vocab, hidden=args.hidden + 16, layers=args.layers + 2))


def cmd_cache(args) -> None:
    from .preprocess import build_cache_from_config

    cfg = config_from_args(args)
    paths = build_cache_from_config(cfg, dtype=args.dtype, all_items=args.all_items)
    for modality, path in paths.items():
        print(f"{modality}: {path}")


def cmd_train(args) -> None:
    from .train import RunInterrupted, TrainingError, train

    try:
        train(config_from_args(args))
    except TrainingError as err:
        raise ConfigError(str(err)) from None
    except RunInterrupted as err:
        exit_interrupted("iisan", err)


def exit_interrupted(prog: str, err: Exception) -> None:
    """Ctrl-C after the checkpoint was saved: say how to resume (once, under torchrun) and exit 130."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {err}", file=sys.stderr)
    sys.exit(130)


def cmd_demo(args) -> None:
    from .demo import run_demo

    result = run_demo(args.out, seed=args.seed, epochs=args.epochs, progress=not args.no_progress,
                      versa=args.versa, num_users=args.users, num_items=args.items)
    if not result["beats_popularity"]:
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iisan", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data-stats", help="users, items and interactions after the paper's protocol")
    p.add_argument("--users", required=True, help="users TSV")
    p.add_argument("--items", required=True, help="items TSV")
    p.add_argument("--max-seq-len", type=int, default=10)
    p.add_argument("--min-seq-len", type=int, default=5)
    p.add_argument("--allow-empty-titles", action="store_true")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("build-lmdb", help="store a folder of <item_id>.jpg as a pre-resized image LMDB")
    p.add_argument("--images", required=True, help="folder of <item_id>.jpg")
    p.add_argument("--out", required=True, help="LMDB folder to write")
    p.add_argument("--items", default=None, help="items TSV: store exactly these ids (missing ones as blanks)")
    p.add_argument("--size", type=int, default=224, help="side of the stored square images")
    p.add_argument("--extension", default=".jpg")
    p.set_defaults(func=cmd_build_lmdb)

    p = sub.add_parser("make-tiny-models", help="write tiny random BERT, ViT and LLaMA checkpoints (offline)")
    p.add_argument("--out", default="pretrained_models", help="parent folder")
    p.add_argument("--items", default=None, help="items TSV whose titles make the tokenizer vocabulary")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--base", action="store_true", help="full-size BERT-base and ViT-B/16 with random weights")
    p.set_defaults(func=cmd_make_tiny_models)

    p = sub.add_parser("cache", help="run the frozen encoders once and write the hidden-state cache "
                                     "(resumable: run it again after an interruption)")
    add_config_arguments(p)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--all-items", action="store_true", help="every row of the items file, not only used items")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train and evaluate one configuration")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="synthetic data, tiny models, cache, cached IISAN vs most popular")
    p.add_argument("--out", default="demo_data", help="working folder")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--users", type=int, default=1200, help="synthetic users")
    p.add_argument("--items", type=int, default=400, help="synthetic items")
    p.add_argument("--versa", action="store_true",
                   help="IISAN-Versa: a tiny decoder-LLM text tower with a ViT of another width and depth")
    p.set_defaults(func=cmd_demo)

    from .params import add_params_parser
    from .report import add_results_parser

    add_params_parser(sub)
    add_results_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"iisan: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
