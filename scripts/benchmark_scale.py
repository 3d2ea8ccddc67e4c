"""How the host-side stages grow with the data on this CPU: reading a pairs CSV, ranking every user over every
item, checking a loaded cache for NaN and inf, naming a sweep's grid beside earlier run folders, tokenizing a live
feed's titles and encoding evaluation's item table. Each stage runs at --sizes times its base count, each
measurement in a process of its own (its own peak memory), on synthetic inputs; nothing is downloaded.

    OMP_NUM_THREADS=1 python scripts/benchmark_scale.py                  # every stage at 1x, 2x, 4x and 8x
    python scripts/benchmark_scale.py --stages csv --sizes 1 4 16        # one stage, larger

Writes the JSON (default bench_data/results/scale.json, git-ignored), a markdown table beside it (.md) and a
figure (.png): time and peak memory against the count, log-log. docs/results.md cites a run of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import NUMBER, int_in, path_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.experiments.scaling import STAGES  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def scale_arg(text: str) -> float:
    if not NUMBER.fullmatch(text.strip()) or not 1e-4 <= float(text) <= 100:  # (nan and inf compare False)
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0.0001 to 100")
    return float(text)


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="what to measure (default: all): " + "; ".join(
                            f"{k}: {unit}, from {base:,}, {rest}" for k, (unit, base, rest) in STAGES.items()))
    parser.add_argument("--sizes", nargs="+", type=int_in(1, 1024), default=[1, 2, 4, 8],
                        help="multiples of each stage's base count (default: 1 2 4 8)")
    parser.add_argument("--scale", type=scale_arg, default=1.0,
                        help="every base count times this (default: 1; 0.01 for a quick check of the script)")
    parser.add_argument("--out", type=path_arg, default=str(ROOT / "bench_data" / "results" / "scale.json"),
                        help="the JSON; .md and .png beside it (default: bench_data/results/scale.json)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from iisan.experiments.scaling import benchmark, table

    payload = entry_point(sys.argv[0], lambda: benchmark(args.stages, sorted(set(args.sizes)), args.scale,
                                                         Path(args.out), args.progress))
    print(table(payload["rows"]))
    out = Path(args.out)
    print(f"\n{out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
