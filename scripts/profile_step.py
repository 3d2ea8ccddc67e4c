"""Profile the training step of one method with torch.profiler and print the top operators.

    python scripts/profile_step.py --method FFT --backbones base --data scientific --device cuda --steps 5

Uses the benchmark's synthetic data and encoders (``scripts/benchmark_efficiency.py`` prepares them
under --work). Writes a Chrome trace to --trace when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from benchmark_efficiency import base_config, method_config, prepare  # noqa: E402

from iisan.bench import SETTINGS, training_setup  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="IISAN (uncached)", choices=list(SETTINGS))
    parser.add_argument("--backbones", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--data", choices=("demo", "scientific"), default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the paper's for the method")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--work", default=str(ROOT / "bench_data"))
    parser.add_argument("--trace", default="", help="write a Chrome trace here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    base = base_config(prepare(work, args.data, args.backbones), work, args.data, args.backbones,
                       device=args.device, num_workers=args.workers)
    setup = training_setup(method_config(base, args.method, args.batch_size or None))
    batches, step, device = setup.full_batches(), setup.step, setup.device
    for _ in range(3):
        step(next(batches))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            step(next(batches))
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
