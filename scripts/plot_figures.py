"""Figures and markdown tables from benchmark JSONs (scripts/benchmark_efficiency.py).

    python scripts/plot_figures.py                                       # bench_data/: the last benchmark run
    python scripts/plot_figures.py --results results/efficiency --figs figs   # redraw the committed ones

A folder's JSONs are read with its subfolders' (one per run, as results/efficiency/h200-run1/). For each JSON:
``<figs>/efficiency-<name>.png``, or ``<figs>/efficiency-<folder>-<name>.png`` for a JSON in a
folder other than ``efficiency/`` (time per epoch, peak memory, trainable parameters, TPME per method),
and ``<name>.md`` beside the JSON (the table, with the command and device that produced it). By default it
reads and writes under bench_data/ (git-ignored), where scripts/benchmark_efficiency.py writes by default:
the committed results/ and figs/ change only when --results and --figs name them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.claims import expect_folders  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--results", nargs="+", default=[str(ROOT / "bench_data" / "results" / "efficiency")],
                        help="JSON files or folders of them; each one's table is written beside it; the committed "
                             "ones are results/efficiency (default: bench_data/results/efficiency in this "
                             "checkout, git-ignored)")
    parser.add_argument("--figs", default=str(ROOT / "bench_data" / "figs"),
                        help="where the figures go; the committed ones are figs/ (default: bench_data/figs/ in this "
                             "checkout, git-ignored)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> list[Path]:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> list[Path]:
        from iisan.efficiency.figures import write_reports  # (matplotlib: not for --help)

        expect_folders(figs=Path(args.figs))
        made = write_reports([Path(r) for r in args.results], Path(args.figs))
        for path in made:
            print(f"wrote {path}")
        return made

    return entry_point(sys.argv[0], run)


if __name__ == "__main__":
    main()
