"""Where a live-backbone training step spends its time on this device, beside plain measurements.

What each section measures: ``iisan.efficiency.diagnose``. Under 5 minutes on one H100/H200. The report goes
to bench_data/results/diagnose.json (git-ignored) unless --out names another file.

    python scripts/gpu_diagnose.py --out $OUT/diagnose.json                     # a GPU, BERT-base + ViT-B/16
    python scripts/gpu_diagnose.py --size tiny --data demo --device cpu --fft-items 16 --frozen-items 32 \
        --cache-batch 32 --shape-reps 2 --out /tmp/diagnose.json                   # a dry run on a CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import DEVICES, device_choice, path_arg  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.efficiency.options import DiagnosisOptions  # noqa: E402
from iisan.efficiency.rows import TABLE_METHODS  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def a_path(text: str) -> Path:
    return Path(path_arg(text))


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> FlagParser:
    defaults = DiagnosisOptions(out=ROOT / "bench_data" / "results" / "diagnose.json", work=ROOT / "bench_data")
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--size", choices=("base", "tiny"), default=defaults.size,
                        help=f"encoders: BERT-base + ViT-B/16, or tiny ones (default: {defaults.size})")
    parser.add_argument("--data", choices=("scientific", "demo"), default=defaults.data,
                        help=f"synthetic data for the iisan section (default: {defaults.data})")
    parser.add_argument("--device", default=defaults.device, type=device_choice,
                        help=f"{DEVICES} (default: {defaults.device})")
    parser.add_argument("--fft-items", type=ints, default=defaults.fft_items,
                        help="items per plain FFT step besides the bucket size iisan's FFT step ran most (352: "
                             "every slot of 32 users) "
                             f"(default: {','.join(map(str, defaults.fft_items))})")
    parser.add_argument("--frozen-items", type=ints, default=defaults.frozen_items,
                        help="items per plain frozen forward besides the bucket size iisan's uncached step ran "
                             "most (704: every slot of 64 users); the first count also runs the variants "
                             f"(default: {','.join(map(str, defaults.frozen_items))})")
    parser.add_argument("--cache-batch", type=int, default=defaults.cache_batch,
                        help="items per plain cache-build forward (hidden states kept) "
                             f"(default: {defaults.cache_batch})")
    parser.add_argument("--iisan", default=",".join(defaults.iisan),
                        help=f"comma list of benchmark labels ('' skips) (default: {','.join(defaults.iisan)})")
    parser.add_argument("--skip-plain", action="store_true",
                        help="leave out the plain reference section (plain FFT steps, frozen forwards, variants)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help=f"untimed warm-up calls before each timing (default: {defaults.warmup})")
    parser.add_argument("--reps", type=int, default=defaults.reps,
                        help=f"timed calls per timing, reported as seconds per call (default: {defaults.reps})")
    parser.add_argument("--shape-reps", type=int, default=defaults.shape_reps,
                        help="steps per phase of fresh, seen, fixed and bucketed shapes, at most: fresh shapes "
                             "are sought over one epoch (how many it held: fresh_shapes in the report) "
                             f"(default: {defaults.shape_reps})")
    parser.add_argument("--num-workers", "--workers", dest="workers", type=int, default=defaults.workers,
                        help=f"threads reading images (default: {defaults.workers})")
    parser.add_argument("--work", "--work-dir", type=a_path, default=defaults.work,
                        help="the benchmark's synthetic data and encoders, kept for the next run (default: "
                             "bench_data/ in this checkout, git-ignored, as benchmark_efficiency.py's)")
    parser.add_argument("--out", type=a_path, default=defaults.out,
                        help="the diagnosis JSON, rewritten after each section (default: "
                             "bench_data/results/diagnose.json in this checkout, git-ignored)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> dict:
    flags = parser()
    args = flags.parse_args(argv)
    labels = [x.strip() for x in args.iisan.split(",") if x.strip()]
    if unknown := [x for x in labels if x not in TABLE_METHODS]:
        flags.error(f"--iisan: unknown label(s) {unknown}; choose from {list(TABLE_METHODS)}")
    if min(args.reps, args.shape_reps, args.cache_batch, *args.fft_items, *args.frozen_items) < 1 or \
            min(args.warmup, args.workers) < 0:
        flags.error("--reps, --shape-reps, --cache-batch and every item count must be >= 1, --warmup and "
                    "--num-workers >= 0")
    if not args.frozen_items and not args.skip_plain:
        flags.error("--frozen-items names no item count; the plain section needs at least one (the first also "
                     "runs the variants), or pass --skip-plain")
    setup_logging(vars(args).pop("verbose"))  # how to log, not what to diagnose
    options = DiagnosisOptions(**{**vars(args), "iisan": labels})
    from iisan.efficiency.diagnose import run_diagnosis  # (torch, not for --help)

    return entry_point(sys.argv[0], lambda: run_diagnosis(options))


if __name__ == "__main__":
    main()
