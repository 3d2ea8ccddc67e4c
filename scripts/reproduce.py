"""Reproduce cached IISAN on one of the paper's data sets: fetch what is missing, build or import the
cache, train three seeds with the paper's defaults, and write the table beside the paper's numbers.

    python scripts/reproduce.py --dataset Scientific              # what `make reproduce` runs
    python scripts/reproduce.py --dataset Scientific --import-from stored_vectors_sci
    python scripts/reproduce.py --dataset demo --epochs 5         # synthetic data, no network
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import DEMO_ITEMS, DEMO_USERS, device_choice, int_in, path_arg, seed_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.data.sources import SOURCES  # noqa: E402
from iisan.experiments.presets import SEEDS  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--dataset", default="Scientific", choices=[*SOURCES, "demo"],
                        help="one of the paper's data sets, or demo: synthetic data and tiny encoders, no network "
                             "(default: Scientific)")
    parser.add_argument("--out", type=path_arg, default=str(ROOT / "results" / "reproduce"),
                        help="runs and the table go here (default: results/reproduce in this checkout)")
    parser.add_argument("--root", type=path_arg, default=str(ROOT),
                        help="repository root holding Dataset/ and pretrained_models/ (default: this checkout)")
    parser.add_argument("--seeds", type=seed_arg, nargs="+", default=list(SEEDS),
                        help=f"one run per seed (default: {' '.join(map(str, SEEDS))})")
    parser.add_argument("--no-fetch", action="store_true", help="never download: say which step is missing")
    parser.add_argument("--import-from", type=path_arg, default=None,
                        help="the authors' stored states (bert_outputs/, vit_outputs/)")
    parser.add_argument("--epochs", type=int_in(1, 10_000), default=None,
                        help="cap on epochs (default: the paper's 100; demo: 20)")
    parser.add_argument("--device", type=device_choice, default=None,
                        help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (or, in a log, lines every 30 s) for the data, the cache build "
                             "and the runs")
    parser.add_argument("--demo-users", type=int_in(*DEMO_USERS), default=1200,
                        help=f"demo only: synthetic users, {DEMO_USERS[0]:,} to {DEMO_USERS[1]:,} (default: 1200)")
    parser.add_argument("--demo-items", type=int_in(*DEMO_ITEMS), default=400,
                        help=f"demo only: synthetic items, {DEMO_ITEMS[0]:,} to {DEMO_ITEMS[1]:,} (default: 400)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def reproduction(args):
    from iisan.experiments.reproduce import Reproduction  # here: --help need not import torch

    overrides = {k: v for k, v in (("epochs", args.epochs), ("device", args.device)) if v is not None}
    if args.no_progress:
        overrides["progress"] = False
    return Reproduction(args.dataset, Path(args.out), tuple(args.seeds), not args.no_fetch, args.import_from or "",
                        overrides, {"num_users": args.demo_users, "num_items": args.demo_items})


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from iisan.experiments.reproduce import reproduce  # here: --help need not import torch

    run = reproduction(args)
    entry_point("reproduce.py", lambda: reproduce(run, Path(args.root)))


if __name__ == "__main__":
    main()
