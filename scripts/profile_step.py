"""Profile the training step of one method with torch.profiler and print the top operators.

    python scripts/profile_step.py --method FFT --backbones base --data scientific --device cuda --steps 5

Uses the benchmark's synthetic data and encoders (``iisan.efficiency.benchmark.prepare``, under
--work). Writes a Chrome trace to --trace when given; an existing file there is replaced only when it is
such a trace (torch.profiler's).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import DEVICES, device_choice, positive_int  # noqa: E402
from iisan.claims import claim_output  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.efficiency.options import add_input_flags  # noqa: E402
from iisan.efficiency.rows import TABLE_METHODS  # noqa: E402
from iisan.errors import ConfigError  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def is_profiler_trace(path: Path) -> bool:
    """A Chrome trace torch.profiler wrote: a JSON whose head holds both of its top-level keys."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(4096)
    return head.lstrip().startswith(b"{") and b'"schemaVersion"' in head and b'"traceEvents"' in head


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--method", default="IISAN (uncached)", choices=list(TABLE_METHODS),
                        help="the benchmark label whose training step is profiled (default: IISAN (uncached))")
    add_input_flags(parser)
    parser.add_argument("--device", default="auto", type=device_choice, help=f"{DEVICES} (default: auto)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the paper's for the method (default: 0)")
    parser.add_argument("--steps", type=positive_int, default=5,
                        help="profiled training steps, after three warm-up steps (default: 5)")
    parser.add_argument("--num-workers", "--workers", dest="workers", type=int, default=8,
                        help="threads reading images (default: 8)")
    parser.add_argument("--work", "--work-dir", default=str(ROOT / "bench_data"),
                        help="the benchmark's synthetic data, encoders and caches, kept for the next run "
                             "(default: bench_data/ in this checkout)")
    parser.add_argument("--trace", default="",
                        help="write a Chrome trace here (an existing file only if it is such a trace); none "
                             "when not given")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> None:
    flags = parser()
    args = flags.parse_args(argv)
    from iisan.efficiency.bench import profile_steps  # (torch, not for --help)
    from iisan.efficiency.benchmark import base_config, check_batch_size, method_config, prepare

    try:  # a batch larger than the users never fills: refused before any work
        if args.batch_size < 0:
            raise ConfigError(f"--batch-size {args.batch_size}: expected 0 (the paper's) or a positive size")
        check_batch_size(args.batch_size, args.data, "--batch-size")
    except ConfigError as err:
        flags.error(str(err))
    setup_logging(args.verbose)

    def run() -> str:
        if args.trace:  # before the work: its own earlier traces are replaced, nothing else
            claim_output(args.trace, is_profiler_trace, "a Chrome trace of torch.profiler", "--trace", overwrite=True)
        work = Path(args.work)
        base = base_config(prepare(work, args.data, args.backbones), work, args.data, args.backbones,
                           device=args.device, num_workers=args.workers)
        return profile_steps(method_config(base, args.method, args.batch_size or None), args.steps, args.trace)

    print(entry_point(sys.argv[0], run))


if __name__ == "__main__":
    main()
