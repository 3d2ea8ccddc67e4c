"""``iisan demo``: synthetic multimodal data, tiny encoders, the image LMDB, the cache, cached IISAN
trained for a few epochs, and a most-popular baseline under the same protocol. Offline, CPU, minutes.

``iisan demo --versa``: the same with IISAN-Versa's asymmetric pair, a tiny decoder LLM (LLaMA
architecture, masked-mean pooling) as the text tower and a ViT of another width and depth.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import Config
from ..data.image_build import build_image_lmdb
from ..data.interactions import read_items
from ..data.run_data import load_data
from ..data.synthetic import generate
from ..evaluate import popularity_metrics
from ..files import claim_folder
from ..model.backbones import read_spec
from ..model.build import layers_for, model_name
from ..model.caching import build_cache_from_config
from ..model.tiny import vocabulary, write_bert, write_decoder, write_vit
from ..train.trainer import train

log = logging.getLogger(__name__)
DEMO_MARKER = ".iisan-demo"  # in every folder a demo made (``files.claim_folder``)


def prepare_demo_data(out_dir: str | Path, seed: int = 0, progress: bool = True, **sizes) -> dict[str, str]:
    """Data set, tiny models and image LMDB under ``out_dir`` (reused when already there). The folder must
    be new, empty or one a demo made (``DEMO_MARKER``): the demo rewrites its files by name."""
    out = claim_folder(out_dir, DEMO_MARKER, "a demo folder", "--out")
    paths = generate(out, seed=seed, **sizes)
    titles = read_items(paths["items"]).titles
    models = out / "models"
    text_model = write_bert(models / "tiny-bert", vocabulary(titles), hidden=64, layers=4, heads=2, seed=seed)
    image_model = write_vit(models / "tiny-vit", hidden=64, layers=4, heads=2, image_size=224, patch_size=32,
                            seed=seed)
    lmdb_path = out / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb_path, read_items(paths["items"]).ids, progress=progress,
                     overwrite=True)  # the demo folder's own store, rebuilt from the regenerated images
    return {"users": str(paths["users"]), "items": str(paths["items"]), "images": str(lmdb_path),
            "text_model": str(text_model), "image_model": str(image_model)}


def prepare_versa_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """The asymmetric pair: text 6 layers x 64 (7 SAN blocks), image 3 layers x 48 (4 SAN blocks), so
    the text chain runs 3 blocks alone and the inter SAN maps text states 64 -> 48."""
    models = Path(out_dir) / "models"
    titles = read_items(Path(out_dir) / "items.tsv").titles
    text_model = write_decoder(models / "tiny-llama", "llama", titles, hidden=64, layers=6, heads=4,
                               seed=seed)
    image_model = write_vit(models / "tiny-vit-48x3", hidden=48, layers=3, heads=2, image_size=224,
                            patch_size=32, seed=seed)
    return {"text_model": str(text_model), "image_model": str(image_model)}


def demo_config(prepared: dict[str, str], out_dir: str | Path, **overrides) -> Config:
    values = dict(prepared, cache_dir=str(Path(out_dir) / "cache"), out_dir=str(Path(out_dir) / "runs"),
                  feed="cached", epochs=20, patience=5, batch_size=64, lr=1e-3, lr_image=1e-3,
                  lr_text=1e-3, lr_adapter_image=1e-3, lr_adapter_text=1e-3, device="cpu", num_workers=0)
    values.update(overrides)
    # One run folder per seed: rerunning the demo resumes (or just reports) its own run.
    values.setdefault("run_name", f"demo-seed{values.get('seed', 12345)}")
    return Config(**values)


def run_demo(out_dir: str | Path = "demo_data", seed: int = 0, epochs: int = 20, progress: bool = True,
             versa: bool = False, **sizes) -> dict:
    """``sizes``: ``num_users`` / ``num_items`` of the synthetic data (``data.synthetic.generate``)."""
    start = time.perf_counter()
    prepared = prepare_demo_data(out_dir, seed=seed, progress=progress, **sizes)
    method, extra = "IISAN", {}
    if versa:
        prepared.update(prepare_versa_models(out_dir, seed))
        method = "IISAN-Versa"
        extra = {"cache_dir": str(Path(out_dir) / "cache-versa"), "run_name": "demo-versa"}
    cfg = demo_config(prepared, out_dir, epochs=epochs, seed=seed, progress=progress, **extra)
    build_cache_from_config(cfg, dtype="float32", overwrite=True)  # the tiny models change with --seed
    results = train(cfg)
    data = load_data(cfg)
    popular = {split: popularity_metrics(data, split) for split in ("valid", "test")}
    elapsed = time.perf_counter() - start
    rows = [(method.replace("IISAN-", "") + " (cached)", results["valid"], results["test"]),
            ("most popular", popular["valid"], popular["test"])]
    print(f"\n{method} demo: {data.num_users} users, {data.num_items} items, synthetic titles and images, "
          f"tiny random encoders; best epoch {results['best_epoch']}")
    if versa:
        print(describe_pair(cfg) + f"; trainable params {results['parameters']['trainable']:,}")
    print(f"{'method':<16}{'valid HR@10':>12}{'valid NDCG@10':>15}{'test HR@10':>12}{'test NDCG@10':>14}")
    for name, valid, test in rows:
        print(f"{name:<16}{valid['hit@10']:>12.4f}{valid['ndcg@10']:>15.4f}{test['hit@10']:>12.4f}"
              f"{test['ndcg@10']:>14.4f}")
    beats = results["test"]["hit@10"] > popular["test"]["hit@10"] and \
        results["test"]["ndcg@10"] > popular["test"]["ndcg@10"]
    print(f"{method} {'beats' if beats else 'does NOT beat'} the most-popular baseline on test; "
          f"{elapsed:.0f} s in all; results in {results['run_dir']}/results.json")
    return {"iisan": results, "popularity": popular, "beats_popularity": beats, "seconds": elapsed}


def describe_pair(cfg: Config) -> str:
    parts = []
    for m in ("text", "image"):
        spec = read_spec(model_name(cfg, m), m)
        parts.append(f"{m}: {spec.model_type} {spec.depth} layers x {spec.width}, "
                     f"SAN reads states {list(layers_for(cfg, m, spec.depth))}")
    return "; ".join(parts)
