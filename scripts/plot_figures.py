"""Figures and markdown tables from benchmark JSONs (scripts/benchmark_efficiency.py).

    python scripts/plot_figures.py --results results/efficiency --figs figs

For each JSON: ``figs/efficiency-<name>.png``, or ``figs/efficiency-<folder>-<name>.png`` for a JSON in a
folder other than ``efficiency/`` (time per epoch, peak memory, trainable parameters, TPME per method),
and ``<name>.md`` beside the JSON (the table, with the command and device that produced it).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.console import entry_point, summary  # noqa: E402
from iisan.efficiency.figures import write_reports  # noqa: E402
from iisan.files import expect_folders  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def main(argv=None) -> list[Path]:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--results", nargs="+", default=[str(ROOT / "results" / "efficiency")],
                        help="JSON files or folders of them")
    parser.add_argument("--figs", default=str(ROOT / "figs"))
    args = parser.parse_args(argv)

    def run() -> list[Path]:
        expect_folders(figs=Path(args.figs))
        made = write_reports([Path(r) for r in args.results], Path(args.figs))
        for path in made:
            print(f"wrote {path}")
        return made

    return entry_point(sys.argv[0], run)


if __name__ == "__main__":
    main()
