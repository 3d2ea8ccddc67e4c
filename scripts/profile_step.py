"""Profile the training step of one method with torch.profiler and print the top operators.

    python scripts/profile_step.py --method fft --backbones base --device cuda --steps 5

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
from benchmark_efficiency import prepare  # noqa: E402

from iisan.bench import SETTINGS  # noqa: E402
from iisan.build import amp_dtype, build_model, load_data, resolve_device  # noqa: E402
from iisan.config import Config  # noqa: E402
from iisan.presets import METHOD_DEFAULTS  # noqa: E402
from iisan.train import make_optimizer, make_train_step, train_loader, use_compile, use_dedup  # noqa: E402


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
    paths = prepare(Path(args.work), args.data, args.backbones)
    overrides = SETTINGS[args.method]
    method = overrides["method"]
    cache_dir = str(Path(args.work) / f"cache-{args.data}-{args.backbones}")
    cfg = Config(**{**paths, **METHOD_DEFAULTS[method], **overrides, "device": args.device, "progress": False,
                    "num_workers": args.workers, "cache_dir": cache_dir,
                    **({"batch_size": args.batch_size} if args.batch_size else {})})
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, device)
    compiled = use_compile(cfg, device)
    step = make_train_step(model, make_optimizer(model, cfg, device, compiled == "cudagraph"), amp_dtype(cfg, device),
                           device, compiled)
    batches = iter(train_loader(data.train_sequences(), cfg.batch_size, cfg.seed, 0, use_dedup(cfg, compiled), pixels))
    model.train()
    for _ in range(3):
        step(next(batches).to(device))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.steps):
            step(next(batches).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
