"""Subcommands that bring inputs from outside: fetch (data sets, encoders; the only ones that need the
network) and import-cache (the authors' stored hidden states)."""

from __future__ import annotations

import functools

from ..bounds import path_arg, utf8_path
from ..claims import expect_folders
from ..config import PRECISIONS
from ..data.datasets import DATASETS, FETCHABLE, dataset_paths
from ..errors import ConfigError
from ..experiments.presets import ENCODER_PRESET_NAMES, ROOT
from ..flags import add_config_arguments, config_from_args
from ..spelling import own_spelling

IMPORT_KEYS = ("users", "items", "cache_dir", "text_model", "image_model", "towers", "text_layers", "image_layers",
               "layer_groups", "layer_rule", "include_embedding_state", "max_seq_len", "min_seq_len",
               "allow_empty_titles", "encoding", "merge_duplicate_users", "progress")


def cmd_fetch_data(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..data.fetch import MANIFEST, fetch_dataset

    expect_folders(root=args.root)  # a file there: said before any download, not as 'File exists' after
    names = list(FETCHABLE) if args.dataset == "all" else [args.dataset]
    for name in names:
        stats = fetch_dataset(name, args.root)
        manifest = f"{args.root}/Dataset/{DATASETS[name].folder}/{MANIFEST}"
        print(f"{name}: {stats['users']:,} users / {stats['items']:,} items / {stats['interactions']:,} "
              f"interactions, as in the paper; manifest {manifest}")


def cmd_fetch_encoders(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.encoders import fetch_encoders

    expect_folders(root=args.root)
    for path in fetch_encoders(args.preset, args.root):
        print(path)


def cmd_import_cache(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.presets import BACKBONES
    from ..model.caching import import_cache_from_config

    paper = dataset_paths(args.dataset) if args.dataset else {}
    if not args.dataset and not (getattr(args, "items", "") and getattr(args, "cache_dir", "")):  # files by flag
        raise ConfigError("import-cache: give --dataset (one of the paper's), or --items and --cache-dir "
                          "(with --users for the items a run uses, or --all-items)")
    cfg = config_from_args(args, {**BACKBONES, **paper})
    paths = import_cache_from_config(cfg, args.source, layers=args.layers, dtype=args.dtype,
                                     all_items=args.all_items, allow_missing=args.allow_missing,
                                     overwrite=args.overwrite)
    for modality, path in paths.items():
        print(f"{modality}: {path}")


def add_fetch_commands(sub) -> None:
    p = sub.add_parser("fetch", help="download a data set or encoders (needs the network; resumable; every file "
                                      "recorded by sha256 and checked on later runs)")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    d = what.add_parser("data", help="TSVs (authors' repository), images (Google Drive), LMDB, statistics")
    d.add_argument("--dataset", required=True, choices=[*FETCHABLE, "all"],
                   help="one of the paper's data sets, or all of them")
    d.add_argument("--root", type=utf8_path, default=str(ROOT), help="the folder holding Dataset/: a data set goes "
                   "into ROOT/Dataset/<name>/ (default: this checkout; an installed package: the working folder)")
    d.set_defaults(func=cmd_fetch_data)
    e = what.add_parser("encoders", help="the preset's encoders from the Hugging Face Hub, at pinned commits")
    e.add_argument("--preset", default="iisan", choices=sorted(ENCODER_PRESET_NAMES),
                   help="iisan (BERT-base + ViT-B/16) or the encoder pair of a run_IISAN_Versa.py --preset "
                        "(default: iisan)")
    e.add_argument("--root", type=utf8_path, default=str(ROOT / "pretrained_models"), help="the folder the model "
                   "folders go into, ROOT/bert-base-uncased/ ... (unlike fetch data's --root; default: "
                   "pretrained_models in the checkout; an installed package: in the working folder)")
    e.set_defaults(func=cmd_fetch_encoders)

    p = sub.add_parser("import-cache", help="the authors' stored per-item hidden states as this project's cache")
    p.add_argument("--from", dest="source", required=True, type=path_arg,
                   help="folder holding bert_outputs/ and vit_outputs/ (the authors' stored_vectors_*/)")
    p.add_argument("--dataset", choices=sorted(DATASETS),
                   help="sets users, items and cache-dir (Code_Cached/stored_vectors_*); flags below win; "
                        "another data set: --items and --cache-dir (and --users) instead")
    p.add_argument("--layers", default="run", choices=("run", "all"),
                   help="keep the hidden states a run reads (run) or all of them (all)")
    p.add_argument("--dtype", default=None, choices=sorted(PRECISIONS), type=functools.partial(own_spelling, "dtype"),
                   help="stored precision, as --cache-dtype (default: float32, as the authors stored them)")
    p.add_argument("--all-items", action="store_true", help="every row of the items file, not only used items")
    p.add_argument("--allow-missing", action="store_true",
                   help="store items without a file as zero states (counted and listed) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace a cache in --cache-dir made with other settings "
                   "(one imported from the same, unchanged files with these settings is kept without it)")
    add_config_arguments(p, only=IMPORT_KEYS)
    p.set_defaults(func=cmd_import_cache)
