"""Reproduce cached IISAN on one of the paper's data sets: fetch what is missing, build or import the
cache, train three seeds with the paper's defaults, and write the table beside the paper's numbers.

    python scripts/reproduce.py --dataset Scientific              # what `make reproduce` runs
    python scripts/reproduce.py --dataset Scientific --import-from stored_vectors_sci
    python scripts/reproduce.py --dataset demo --epochs 5         # synthetic data, no network
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import device_choice, positive_int  # noqa: E402
from iisan.console import entry_point, setup_logging, summary  # noqa: E402
from iisan.data.sources import SOURCES  # noqa: E402
from iisan.experiments.reproduce import SEEDS, Reproduction, reproduce  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--dataset", default="Scientific", choices=[*SOURCES, "demo"])
    parser.add_argument("--out", default=str(ROOT / "results" / "reproduce"), help="runs and the table go here")
    parser.add_argument("--root", default=str(ROOT), help="repository root holding Dataset/ and pretrained_models/")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--no-fetch", action="store_true", help="never download: say which step is missing")
    parser.add_argument("--import-from", default="", help="the authors' released states (bert_outputs/, vit_outputs/)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="cap on epochs (default: the paper's 100)")
    parser.add_argument("--device", type=device_choice, default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--demo-users", type=positive_int, default=1200, help="demo only: synthetic users")
    parser.add_argument("--demo-items", type=positive_int, default=400, help="demo only: synthetic items")
    args = parser.parse_args(argv)
    setup_logging()
    overrides = {k: v for k, v in (("epochs", args.epochs), ("device", args.device)) if v is not None}
    if args.dataset == "demo":
        overrides.setdefault("progress", False)
    run = Reproduction(args.dataset, Path(args.out), tuple(args.seeds), not args.no_fetch, args.import_from,
                       overrides, {"num_users": args.demo_users, "num_items": args.demo_items})
    entry_point("reproduce.py", lambda: reproduce(run, Path(args.root)))


if __name__ == "__main__":
    main()
