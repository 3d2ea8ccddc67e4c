"""Entry scripts as data: defaults plus editable sweep lists, run as a grid in-process (never shell strings).

A script calls ``run_script(method_defaults, SWEEP)``. Every Config key is a flag; a swept key accepts
several values (``--lr 1e-4 2e-4``) and replaces the script's list. ``--dataset`` picks one of the
paper's data sets under ``Dataset/`` (explicit path flags win).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time

from ..config import Config, add_config_arguments, config_from_args
from ..console import entry_point, setup_logging
from ..train.trainer import train
from .presets import BACKBONES, DATASETS, METHOD_DEFAULTS, dataset_paths

log = logging.getLogger(__name__)


def grid(sweep: dict[str, list]) -> list[dict]:
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def parse_script_args(defaults: dict, sweep: dict[str, list], argv: list[str] | None = None,
                      description: str = "", extra_arguments=None) -> tuple[list[Config], argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    if extra_arguments is not None:
        extra_arguments(parser)
    parser.add_argument("--dataset", default="Scientific", choices=sorted(DATASETS),
                        help="one of the paper's data sets under Dataset/ (sets users, items, images, cache-dir)")
    add_config_arguments(parser, defaults, multi=set(sweep))
    args = parser.parse_args(argv)
    base = {**BACKBONES, **dataset_paths(args.dataset), **defaults}
    swept = {k: getattr(args, k) if hasattr(args, k) else list(values) for k, values in sweep.items()}
    for k in swept:
        if hasattr(args, k):
            delattr(args, k)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    configs = []
    for point in grid(swept):
        cfg = config_from_args(args, {**base, **point})
        varying = "-".join(f"{k}{v}" for k, v in point.items() if len(swept[k]) > 1)
        # One folder per grid point, also under an explicit --run-name: a folder holds one run's
        # checkpoints, and rerunning the same command resumes each point from its own.
        cfg = cfg.replace(run_name="-".join(filter(None, [cfg.run_name or f"{cfg.method}-{cfg.feed}-{stamp}",
                                                          varying])))
        configs.append(cfg)
    return configs, args


def run_script(defaults: dict, sweep: dict[str, list], argv: list[str] | None = None, description: str = "",
               action=None, extra_arguments=None) -> list:
    """Parse, then run ``action(cfg, args)`` (default: train) for every grid point, one after another.
    ``extra_arguments(parser)`` adds script-only flags, which ``action`` reads from ``args``."""
    setup_logging()

    def run() -> list:
        configs, args = parse_script_args(defaults, sweep, argv, description, extra_arguments)
        results = []
        for n, cfg in enumerate(configs, 1):
            log.info("run %d of %d: %s", n, len(configs), cfg.run_name)
            results.append(action(cfg, args) if action else train(cfg))
        return results

    return entry_point(sys.argv[0], run)


def method_defaults(method: str, feed: str | None = None) -> dict:
    """The defaults of one of the paper's methods (``presets.METHOD_DEFAULTS``) as script defaults."""
    return {**METHOD_DEFAULTS[method], "method": method, **({"feed": feed} if feed else {})}


def run_method(method: str, sweep: dict[str, list], description: str = "", feed: str | None = None) -> list:
    """An entry script for one of the paper's methods: its defaults + ``sweep``."""
    return run_script(method_defaults(method, feed), sweep, description=description)
