"""Subcommands about runs: train, params, results, demo."""

from __future__ import annotations

import os
import sys

from ..bounds import DEMO_ITEMS, DEMO_USERS, RANDOM_BACKBONES, int_in, path_arg
from ..errors import ConfigError
from ..flags import add_config_arguments, config_from_args
from ..metric_names import SELECTED_BY, VALID_COLUMN, label


def cmd_train(args) -> None:
    cfg = config_from_args(args)  # a config's error said before torch loads (seconds)
    # imported when run, not for --help (cli/__init__.py)
    from ..train.trainer import train

    train(cfg)


def cmd_params(args) -> None:
    cfg = config_from_args(args)  # a config's error said before torch loads (seconds)
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.params import count

    result = count(cfg, args.random_backbones)
    print(f"{result['method']}: {result['line']}")
    if cfg.cached:
        print("(all params include the frozen backbones the cache was computed with, as the paper counts IISAN; "
              "a cached run's train.log counts only the modules it holds, the trainable ones)")


def cmd_results(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.curves import claim_figure, draw_curves, figure_format
    from ..experiments.report import claim_csv, markdown, sorted_by, table, write_csv
    from ..experiments.report_rows import collect

    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    if args.keys.strip() and not keys:  # ',,,': a list that lost its names
        raise ConfigError(f"--keys {args.keys!r} names no key; give config keys separated by commas, e.g. lr,seed")
    if args.csv and args.curves and os.path.abspath(args.csv) == os.path.abspath(args.curves):
        raise ConfigError(f"--csv and --curves both name {args.csv}; give each its own file")
    if args.curves:  # a bad suffix or a file that is not ours ends here, before any reading or printing
        figure_format(args.curves)
        claim_figure(args.curves)
    if args.csv:
        claim_csv(args.csv)
    frame, curves = collect(args.folders, keys, args.include_smoke, args.include_running)
    rows = table(frame, keys, args.average_seeds)
    curves = {run: curves[run] for run in rows.attrs["runs"]}  # --average-seeds counts each seed once
    if args.sort is not None:
        rows = sorted_by(rows, args.sort)
    print(markdown(rows), end="")
    if args.csv:
        print(f"wrote {write_csv(rows, args.csv)}")
    if args.curves:
        draw_curves(curves, args.curves)
        print(f"wrote {args.curves}")


def cmd_demo(args) -> None:
    # imported when run, not for --help (cli/__init__.py)
    from ..experiments.demo import run_demo

    result = run_demo(args.out, seed=args.seed, epochs=args.epochs, progress=not args.no_progress,
                      versa=args.versa, num_users=args.users, num_items=args.items)
    if not result["beats_popularity"]:
        sys.exit(1)


# What ``iisan train --lr 1e-3 2e-3`` is told (``flags.FlagParser``): one run per command.
SWEEPS_ELSEWHERE = ("several values are a sweep, which the entry scripts run, not iisan train (e.g. python "
                    "Code_Cached/scripts/run_IISAN.py {flag} {values}; README \"Running the paper's experiments\")")


def add_run_commands(sub) -> None:
    p = sub.add_parser("train", help="train and evaluate one configuration", several_values=SWEEPS_ELSEWHERE)
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("params", help="the trainable-parameter line of the model `iisan train` would build "
                                      "(every training flag applies)")
    add_config_arguments(p)
    p.add_argument("--random-backbones", choices=RANDOM_BACKBONES, default=None,
                   help="BERT-base + ViT-B/16 built from default configs with random weights (no download), "
                        "instead of --text-model / --image-model")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("results", help="a table of runs (every results.json under the folders), one column per "
                                       "config key that differs between them")
    p.add_argument("folders", nargs="+", type=path_arg, help="run folders, folders of runs, or results.json files")
    p.add_argument("--keys", default="", help="config keys shown as columns besides those that differ, e.g. seed")
    p.add_argument("--average-seeds", action="store_true",
                   help="one row per configuration: mean ± std over runs that differ only in seed (and in keys "
                        "that never make two experiments: names, paths, device, workers)")
    p.add_argument("--include-smoke", action="store_true", help="also smoke runs (left out by default)")
    p.add_argument("--include-running", action="store_true",
                   help="also runs that have not finished: running, failed, interrupted or stopped (results.json says "
                        "running but no process holds the folder) (left out by default)")
    p.add_argument("--sort", default=None, help=f"column to sort by, descending (e.g. {VALID_COLUMN}, or "
                                                f"{VALID_COLUMN.replace('hit', 'HR')} as the paper names it: choose a "
                                                "configuration by validation; by test is tuning on the test set)")
    p.add_argument("--csv", type=path_arg, default=None,
                   help="also write the table (with standard deviations) to this CSV")
    p.add_argument("--curves", type=path_arg, default=None,
                   help=f"also draw validation {label(SELECTED_BY)} and loss per epoch of every run (PNG)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("demo", help="synthetic data, tiny models, cache, cached IISAN vs most popular")
    p.add_argument("--out", type=path_arg, default="demo_data",
                   help="working folder: data, tiny models, cache and runs; it keeps the --users, --items and "
                        "--seed its data was made with (default: demo_data)")
    p.add_argument("--epochs", type=int_in(1, 10_000), default=20, help="maximum training epochs (default: 20)")
    p.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of the synthetic data, the tiny "
                   "models and training (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--users", type=int_in(*DEMO_USERS), default=1200,
                   help=f"synthetic users, {DEMO_USERS[0]:,} to {DEMO_USERS[1]:,} (default: 1200)")
    p.add_argument("--items", type=int_in(*DEMO_ITEMS), default=400,
                   help=f"synthetic items, {DEMO_ITEMS[0]:,} to {DEMO_ITEMS[1]:,} (default: 400)")
    p.add_argument("--versa", action="store_true",
                   help="IISAN-Versa: a tiny decoder-LLM text tower with a ViT of another width and depth")
    p.set_defaults(func=cmd_demo)
