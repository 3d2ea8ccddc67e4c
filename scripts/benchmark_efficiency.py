"""Efficiency of FFT, Adapter, LoRA, BitFit, IISAN uncached and IISAN cached on the same data.

Reuses the trainer's exact step: warm-up steps, then timed steps with device synchronisation,
extrapolated to a full epoch (training only, no evaluation). Records seconds per epoch, peak memory
(GPU: max_memory_allocated and max_memory_reserved; CPU: the process's peak resident set), trainable
and total parameters and TPME, for two settings: every method at one batch size ("equal"), and the
paper's (baselines 32, IISAN 64). One JSON per setting under --out, then figures and a table
(``iisan.experiments.efficiency``).

    python scripts/benchmark_efficiency.py                       # tiny encoders, small data, this CPU
    python scripts/benchmark_efficiency.py --backbones base --data scientific --device cuda   # the paper's scale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.config import add_config_arguments  # noqa: E402
from iisan.console import entry_point, setup_logging  # noqa: E402
from iisan.experiments.bench import SETTINGS  # noqa: E402
from iisan.experiments.efficiency import BACKBONES, BENCH_KEYS, DATA, SETTING_NAMES, run_benchmark  # noqa: E402


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", choices=BACKBONES, default="tiny")
    parser.add_argument("--data", choices=DATA, default="demo")
    parser.add_argument("--settings", default="equal,paper", help=f"comma list of: {', '.join(SETTING_NAMES)}")
    parser.add_argument("--equal-batch", type=int, default=32, help="batch size of every method in 'equal'")
    parser.add_argument("--methods", default=",".join(SETTINGS), help="comma list of method labels")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--work", default=str(ROOT / "bench_data"), help="synthetic data, encoders, caches")
    parser.add_argument("--out", default=str(ROOT / "results" / "efficiency"))
    parser.add_argument("--tag", default="", help="file-name tag (default: backbones-data-device)")
    parser.add_argument("--figs", default=str(ROOT / "figs"), help="where the figures go")
    parser.add_argument("--no-plots", action="store_true")
    add_config_arguments(parser, only=BENCH_KEYS)
    args = parser.parse_args(argv)
    labels = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if unknown := [m for m in labels if m not in SETTINGS]:
        parser.error(f"unknown method label(s) {unknown}; choose from {list(SETTINGS)}")
    settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
    if any(s not in SETTING_NAMES for s in settings):
        parser.error(f"--settings must list equal and/or paper, not {args.settings!r}")
    setup_logging()
    values = {k: getattr(args, k) for k in BENCH_KEYS if hasattr(args, k)}
    return entry_point(sys.argv[0], lambda: run_benchmark(
        values, backbones=args.backbones, data=args.data, setting_names=settings, equal_batch=args.equal_batch,
        labels=labels, warmup=args.warmup, steps=args.steps, work=Path(args.work), out=Path(args.out),
        tag=args.tag, figs=None if args.no_plots else Path(args.figs)))


if __name__ == "__main__":
    main()
