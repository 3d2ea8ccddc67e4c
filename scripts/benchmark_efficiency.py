"""Efficiency of FFT, Adapter, LoRA, BitFit, IISAN uncached and IISAN cached on the same data.

Reuses the trainer's exact step: at least 10 warm-up steps, then at least 50 steps each timed on the
device (median and p90; an epoch is the median times its steps; training only, no evaluation; fewer
steps only with --few-steps, for a quick check). Each method is measured the default way (each distinct
item once, live steps with static shapes) and beside it the authors' way (every slot encoded, padding
included, full-length titles). Records seconds per step and epoch, items, rows and padding per step,
model FLOPs, peak memory (GPU: max_memory_allocated and max_memory_reserved; CPU: the process's peak
resident set), trainable and total parameters and TPME; also the cache build (both towers) and the
full-ranking evaluation of every user. Two settings: every method at one batch size ("equal") and the
paper's (baselines 32, IISAN 64). One JSON per setting under --out, then figures and a table
(``iisan.efficiency.benchmark``). By default everything goes under bench_data/ (git-ignored), never over the
committed results/ and figs/: writing there takes --out results/efficiency --figs figs.

    python scripts/benchmark_efficiency.py                       # tiny encoders, small data, this CPU
    python scripts/benchmark_efficiency.py --backbones base --data scientific --device cuda   # the paper's scale
    python scripts/benchmark_efficiency.py --full-epoch "IISAN (uncached),IISAN (cached)"   # also real epochs
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import positive_int  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.efficiency.options import BENCH_KEYS, SETTING_NAMES, add_input_flags  # noqa: E402
from iisan.efficiency.rows import MIN_STEPS, MIN_WARMUP, TABLE_METHODS  # noqa: E402
from iisan.errors import ConfigError  # noqa: E402
from iisan.flags import FlagParser, add_config_arguments  # noqa: E402


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    add_input_flags(parser)
    parser.add_argument("--settings", default="equal,paper",
                        help=f"comma list of: {', '.join(SETTING_NAMES)} (default: equal,paper)")
    parser.add_argument("--equal-batch", type=positive_int, default=32,
                        help="batch size of every method in 'equal' (default: 32)")
    parser.add_argument("--methods", default=",".join(TABLE_METHODS),
                        help=f"comma list of method labels (default: all of {', '.join(TABLE_METHODS)}; a method "
                             "added to iisan/methods.py is measured when named by its paper name)")
    parser.add_argument("--authors-way", default="all",
                        help="comma list of method labels also measured the authors' way (every slot encoded, "
                             "padding included, full-length titles); 'all' (default) or 'none'")
    parser.add_argument("--full-epoch", nargs="?", const="all", default="",
                        help="also time a real epoch end to end, image pipeline included, for these labels "
                             "(comma list; no value: all)")
    parser.add_argument("--warmup", type=int, default=MIN_WARMUP,
                        help=f"warm-up steps, at least {MIN_WARMUP} without --few-steps (default: {MIN_WARMUP})")
    parser.add_argument("--steps", type=int, default=MIN_STEPS,
                        help=f"timed steps, at least {MIN_STEPS} without --few-steps (default: {MIN_STEPS})")
    parser.add_argument("--flop-batches", type=int, default=0,
                        help="count model FLOPs over the first N timed batches (0: all; a sample saves device time) "
                             "(default: 0)")
    parser.add_argument("--few-steps", action="store_true",
                        help="allow fewer warm-up or timed steps (a quick check, not the benchmark's timing)")
    parser.add_argument("--work", "--work-dir", default=str(ROOT / "bench_data"),
                        help="synthetic data, encoders, caches, kept for the next run (default: bench_data/ "
                             "in this checkout)")
    parser.add_argument("--out", default=str(ROOT / "bench_data" / "results" / "efficiency"),
                        help="the JSON and markdown table of each setting; the committed ones are results/efficiency/ "
                             "(default: bench_data/results/efficiency/ in this checkout, git-ignored)")
    parser.add_argument("--tag", default="", help="file-name tag (default: backbones-data-device)")
    parser.add_argument("--figs", default=str(ROOT / "bench_data" / "figs"),
                        help="where the figures go; the committed ones are figs/ (default: bench_data/figs/ in this "
                             "checkout, git-ignored)")
    parser.add_argument("--no-plots", action="store_true", help="no figures (the .md tables are still written)")
    add_config_arguments(parser, only=BENCH_KEYS)
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


INTERRUPTED = ("interrupted; the rows measured so far are in the JSON and its table (each written whole): run the "
               "same command again to measure them all")


def main(argv=None) -> list[Path]:
    flags = parser()
    args = flags.parse_args(argv)
    from iisan.efficiency.benchmark import run_benchmark, selection  # (torch, not for --help)

    try:
        chosen = selection(args.methods, args.authors_way, args.full_epoch, args.settings, warmup=args.warmup,
                           steps=args.steps, flop_batches=args.flop_batches, few_steps=args.few_steps)
    except ConfigError as err:
        flags.error(str(err))
    setup_logging(args.verbose)
    values = {k: getattr(args, k) for k in BENCH_KEYS if hasattr(args, k)}
    return entry_point(sys.argv[0], interrupted=INTERRUPTED, run=lambda: run_benchmark(
        values, backbones=args.backbones, data=args.data, equal_batch=args.equal_batch, **chosen,
        warmup=args.warmup, steps=args.steps, flop_batches=args.flop_batches, work=Path(args.work),
        out=Path(args.out), tag=args.tag, figs=None if args.no_plots else Path(args.figs)))


if __name__ == "__main__":
    main()
