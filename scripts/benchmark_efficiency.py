"""Efficiency of FFT, Adapter, LoRA, BitFit, IISAN uncached and IISAN cached on the same data.

Reuses the trainer's exact step: warm-up steps, then timed steps with device synchronisation,
extrapolated to a full epoch (training only, no evaluation). Records seconds per epoch, peak memory
(GPU: max_memory_allocated and max_memory_reserved; CPU: the process's peak resident set), trainable
and total parameters and TPME, for two settings: every method at one batch size ("equal"), and the
paper's (baselines 32, IISAN 64). One JSON per setting under --out, then figures and a table.

    python scripts/benchmark_efficiency.py                       # tiny encoders, small data, this CPU
    python scripts/benchmark_efficiency.py --backbones base --data scientific --device cuda   # the paper's scale

Data and encoders are synthetic and random (offline): timings depend on shapes, not on weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iisan.bench import SETTINGS, add_tpme, in_fresh_process  # noqa: E402
from iisan.config import Config  # noqa: E402
from iisan.presets import METHOD_DEFAULTS  # noqa: E402
from iisan.runinfo import git_commit, versions, write_json_atomic  # noqa: E402

log = logging.getLogger("benchmark")


def prepare(work: Path, data: str, backbones: str) -> dict[str, str]:
    """Synthetic data with an image LMDB, and encoders; reused when already there."""
    from iisan.data.interactions import read_items
    from iisan.data.synthetic import SCIENTIFIC_LENGTHS, generate
    from iisan.tiny import vocabulary, write_base_architectures, write_bert, write_vit

    data_dir = work / f"data-{data}"
    if not (data_dir / "images.lmdb").is_dir():
        log.info("generating %s-shaped synthetic data in %s", data, data_dir)
        if data == "scientific":  # Scientific's users and sequence lengths; ~20k items
            generate(data_dir, num_items=20314, num_topics=500, length_profile=SCIENTIFIC_LENGTHS, images="lmdb")
        else:
            generate(data_dir, num_users=1200, num_items=400, images="lmdb")
    paths = {"users": str(data_dir / "users.tsv"), "items": str(data_dir / "items.tsv"),
             "images": str(data_dir / "images.lmdb")}
    models = work / f"models-{backbones}"
    if backbones == "base":
        text, image = models / "bert-base-random", models / "vit-base-random"
        if not (image / "config.json").is_file():
            write_base_architectures(models)
    else:
        text, image = models / "tiny-bert", models / "tiny-vit"
        if not (image / "config.json").is_file():
            write_bert(text, vocabulary(read_items(paths["items"]).titles), hidden=64, layers=4, heads=2)
            write_vit(image, hidden=64, layers=4, heads=2, image_size=224, patch_size=32)
    paths.update(text_model=str(text), image_model=str(image))
    return paths


def batch_size(setting: str, method: str, equal_batch: int) -> int:
    return equal_batch if setting == "equal" else METHOD_DEFAULTS[method]["batch_size"]


def method_config(base: dict, label: str, batch: int | None = None) -> Config:
    """The config of one benchmark row: shared paths and settings, the method's paper defaults, its
    setting (``SETTINGS[label]``) and, if given, a batch size."""
    overrides = SETTINGS[label]
    return Config(**{**base, **METHOD_DEFAULTS[overrides["method"]], **overrides,
                     **({"batch_size": batch} if batch else {})})


def base_config(paths: dict, work: Path, data: str, backbones: str, **settings) -> dict:
    """What every row shares: data and encoder paths, the cache folder, device and precision settings."""
    return dict(paths, cache_dir=str(work / f"cache-{data}-{backbones}"), progress=False, encode_batch_size=512,
                **settings)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--data", choices=("demo", "scientific"), default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    parser.add_argument("--settings", default="equal,paper", help="comma list of: equal, paper")
    parser.add_argument("--dedup-items", default="auto", choices=("auto", "on", "off"),
                        help="off: every non-padding slot runs through the backbones, repeats included "
                             "(closer to the authors' code, which also encodes the padding)")
    parser.add_argument("--encoder-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="precision of the frozen encoders' weights (uncached IISAN and the cache build)")
    parser.add_argument("--patch-embedding", default="matmul", choices=("matmul", "conv"),
                        help="image towers' patch-embedding conv as one matmul over patches (default) or as the "
                             "model's own conv")
    parser.add_argument("--equal-batch", type=int, default=32, help="batch size of every method in 'equal'")
    parser.add_argument("--methods", default=",".join(SETTINGS), help="comma list of method labels")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="threads reading images from the LMDB")
    parser.add_argument("--work", default=str(ROOT / "bench_data"), help="synthetic data, encoders, caches")
    parser.add_argument("--out", default=str(ROOT / "results" / "efficiency"))
    parser.add_argument("--tag", default="", help="file-name tag (default: backbones-data-device)")
    parser.add_argument("--figs", default=str(ROOT / "figs"), help="where the figures go")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in SETTINGS]
    if unknown:
        parser.error(f"unknown method label(s) {unknown}; choose from {list(SETTINGS)}")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if any(s not in ("equal", "paper") for s in settings):
        parser.error(f"--settings must list equal and/or paper, not {args.settings!r}")

    commit = git_commit()  # before this run writes its own results into the checkout
    work = Path(args.work)
    paths = prepare(work, args.data, args.backbones)
    base = base_config(paths, work, args.data, args.backbones, device=args.device, amp=args.amp,
                       num_workers=args.workers, dedup_items=args.dedup_items, encoder_dtype=args.encoder_dtype,
                       patch_embedding=args.patch_embedding)
    cache_row = None
    if "IISAN (cached)" in labels:
        log.info("building the cache (timed)")
        cache_row = in_fresh_process("measure_cache_build", Config(**base))
        log.info("cache: %s", {k: v for k, v in cache_row.items() if k != "traceback"})

    written = []
    measured: dict[tuple[str, int], dict] = {}  # baselines run at 32 in both settings: measure once
    for setting in settings:
        rows, configs = [], {}
        for label in labels:
            cfg = method_config(base, label, batch_size(setting, SETTINGS[label]["method"], args.equal_batch))
            key = (label, cfg.batch_size)
            if key not in measured:
                log.info("%s | %s | batch %d", setting, label, cfg.batch_size)
                measured[key] = in_fresh_process("measure_training", cfg, warmup=args.warmup, steps=args.steps)
            row = dict(measured[key], label=label)
            rows.append(row)
            configs[label] = cfg.to_dict()
            log.info("  -> %s", {k: v for k, v in row.items() if k not in ("traceback",)})
        add_tpme(rows)
        device = next((r["device"] for r in rows if "device" in r), args.device)
        tag = args.tag or f"{args.backbones}-{args.data}-{device_tag(device)}"
        payload = {
            "setting": setting,
            "description": "equal batch for every method" if setting == "equal" else "paper: baselines 32, IISAN 64",
            "backbones": args.backbones,
            "data": args.data,
            "device": device,
            "rows": rows,
            "cache_build": cache_row,
            "configs": configs,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "versions": versions(),
            "git_commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        path = write_json_atomic(Path(args.out) / f"{tag}-{setting}.json", payload)
        written.append(path)
        log.info("wrote %s", path)
    if not args.no_plots:
        from plot_figures import main as plot

        plot(["--results", *map(str, written), "--figs", args.figs])


def device_tag(device: str) -> str:
    if device.startswith("CPU"):
        return "cpu"
    return device.replace("NVIDIA ", "").split()[0].lower()


if __name__ == "__main__":
    main()
