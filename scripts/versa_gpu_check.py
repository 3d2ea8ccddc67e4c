"""IISAN-Versa on a GPU, one short prepared run (the `device` tool): a tiny bf16 decoder-LLM text tower
with a ViT of another width and depth on small synthetic data.

1. the cache built on the GPU (LLM loaded in its own bf16, autocast in bf16, stored fp16) against the
   same cache built in fp32 on the CPU;
2. a GPU build interrupted after two chunks and resumed gives the same bytes as an uninterrupted one;
3. cached Versa trains on the GPU (the trainer's default step: CUDA graphs) with finite loss.

    python scripts/versa_gpu_check.py --out /tmp/versa-gpu     # writes versa_gpu.json there

It exits 1 when a check failed (the report's ``checks`` and ``passed``, with the failed ones named on
stderr), 2 on a user error, and 1 with a traceback on a crash (a CUDA error): the report's ``error`` then
says which. ``--quick`` trains eagerly only, so it checks no CUDA graph.

Without --out and --work it writes under bench_data/ (git-ignored) in this checkout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

from iisan.bounds import DEVICES, device_choice  # noqa: E402
from iisan.console import VERBOSE_HELP, entry_point, setup_logging, summary  # noqa: E402
from iisan.flags import FlagParser  # noqa: E402


def parser() -> FlagParser:
    parser = FlagParser(description=summary(__doc__))
    parser.add_argument("--out", default=str(ROOT / "bench_data" / "versa-gpu"),
                        help="folder for the report, versa_gpu.json (default: bench_data/versa-gpu in this "
                             "checkout, git-ignored)")
    parser.add_argument("--work", "--work-dir", default=str(ROOT / "bench_data" / "versa-gpu-work"),
                        help="synthetic data, tiny encoders, caches and runs (default: bench_data/versa-gpu-work "
                             "in this checkout)")
    parser.add_argument("--device", default="cuda", type=device_choice,
                        help=f"{DEVICES}; cpu: a dry run of the script itself (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="one eager training epoch (little device time)")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return parser


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    from iisan.experiments.versa_check import versa_gpu_check  # (torch: not for --help)

    report = entry_point(sys.argv[0], lambda: versa_gpu_check(Path(args.out), Path(args.work), args.device, args.quick))
    print(json.dumps(report, indent=2, default=str))
    if not report["passed"]:  # every check is in the report; the exit status says whether all held
        failed = [name for name, held in report["checks"].items() if not held]
        print(f"versa_gpu_check.py: failed: {', '.join(failed) or 'no check ran'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
