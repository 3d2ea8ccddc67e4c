"""``iisan demo``: synthetic multimodal data, tiny encoders, the image LMDB, the cache, cached IISAN
trained for a few epochs, and a most-popular baseline under the same protocol. Offline, CPU, minutes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import Config
from .data.images import build_image_lmdb
from .data.interactions import read_items
from .data.synthetic import generate
from .evaluate import popularity_metrics
from .preprocess import build_cache_from_config
from .tiny import vocabulary, write_bert, write_vit
from .train import train

log = logging.getLogger(__name__)


def prepare_demo_data(out_dir: str | Path, seed: int = 0, progress: bool = True, **sizes) -> dict[str, str]:
    """Data set, tiny models and image LMDB under ``out_dir`` (reused when already there)."""
    out = Path(out_dir)
    paths = generate(out, seed=seed, **sizes)
    titles = read_items(paths["items"]).titles
    models = out / "models"
    text_model = write_bert(models / "tiny-bert", vocabulary(titles), hidden=64, layers=4, heads=2, seed=seed)
    image_model = write_vit(models / "tiny-vit", hidden=64, layers=4, heads=2, image_size=224, patch_size=32,
                            seed=seed)
    lmdb_path = out / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb_path, read_items(paths["items"]).ids, progress=progress)
    return {"users": str(paths["users"]), "items": str(paths["items"]), "images": str(lmdb_path),
            "text_model": str(text_model), "image_model": str(image_model)}


def demo_config(prepared: dict[str, str], out_dir: str | Path, **overrides) -> Config:
    values = dict(prepared, cache_dir=str(Path(out_dir) / "cache"), out_dir=str(Path(out_dir) / "runs"),
                  feed="cached", epochs=20, patience=5, batch_size=64, lr=1e-3, lr_image=1e-3,
                  lr_text=1e-3, lr_adapter_image=1e-3, lr_adapter_text=1e-3, device="cpu", num_workers=0)
    values.update(overrides)
    # One run folder per seed: rerunning the demo resumes (or just reports) its own run.
    values.setdefault("run_name", f"demo-seed{values.get('seed', 12345)}")
    return Config(**values)


def run_demo(out_dir: str | Path = "demo_data", seed: int = 0, epochs: int = 20, progress: bool = True) -> dict:
    start = time.perf_counter()
    prepared = prepare_demo_data(out_dir, seed=seed, progress=progress)
    cfg = demo_config(prepared, out_dir, epochs=epochs, seed=seed, progress=progress)
    build_cache_from_config(cfg, dtype="float32")
    results = train(cfg)
    from .build import load_data

    data = load_data(cfg)
    popular = {split: popularity_metrics(data, split) for split in ("valid", "test")}
    elapsed = time.perf_counter() - start
    rows = [("IISAN (cached)", results["valid"], results["test"]),
            ("most popular", popular["valid"], popular["test"])]
    print(f"\nIISAN demo: {data.num_users} users, {data.num_items} items, synthetic titles and images, "
          f"tiny random encoders; best epoch {results['best_epoch']}")
    print(f"{'method':<16}{'valid HR@10':>12}{'valid NDCG@10':>15}{'test HR@10':>12}{'test NDCG@10':>14}")
    for name, valid, test in rows:
        print(f"{name:<16}{valid['hit@10']:>12.4f}{valid['ndcg@10']:>15.4f}{test['hit@10']:>12.4f}"
              f"{test['ndcg@10']:>14.4f}")
    beats = results["test"]["hit@10"] > popular["test"]["hit@10"] and \
        results["test"]["ndcg@10"] > popular["test"]["ndcg@10"]
    print(f"IISAN {'beats' if beats else 'does NOT beat'} the most-popular baseline on test; "
          f"{elapsed:.0f} s in all; results in {results['run_dir']}/results.json")
    return {"iisan": results, "popularity": popular, "beats_popularity": beats, "seconds": elapsed}
