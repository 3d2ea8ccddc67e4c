"""Runs on the real Amazon interactions and titles (``../shared/data`` here; the authors' TSVs
elsewhere) with the real pretrained MiniLM text tower and stand-in images (``offline.py``): no product
images are available offline, so every item's image is blank (or random noise) and the image branch
carries no item information. Every summary says so.

- ``cached_cpu_benchmark``: cached IISAN, MiniLM (6 x 384) + a random ViT-384 (12 layers): seconds per
  training epoch, one full-ranking evaluation of every user, and the accuracy reached.
- ``versa_minilm``: IISAN-Versa, MiniLM with a random ViT of another width and depth (4 x 192).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..claims import claim_output
from ..config import Config
from ..data.cache import cache_file
from ..data.interactions import read_items
from ..data.run_data import load_data
from ..errors import CacheError, DataError, RunInterrupted
from ..evaluate import evaluate_model
from ..files import write_json_atomic
from ..model.build import build_model
from ..model.caching import build_cache_from_config
from ..provenance import provenance
from ..train.run_results import read_results
from ..train.runnames import default_run_name
from ..train.trainer import train
from ..train.weights import load_weights
from .offline import BLANK, RANDOM, blank_image_store, minilm_path, random_image_store, random_vit

USERS, ITEMS = "am_Industrial_and_Scientific_users.tsv", "Industrial_and_Scientific_items.tsv"


def _data_files(data_dir: Path) -> tuple[Path, Path]:
    users, items = Path(data_dir) / USERS, Path(data_dir) / ITEMS
    if not users.is_file() or not items.is_file():
        raise DataError(f"data not found: {users} / {items}")
    return users, items


@contextmanager
def script_hints(resume: str, rebuild: str):
    """The trainer's resume hint (``--run-name``) and the cache's rebuild hint (``iisan cache
    --overwrite``) name flags of ``iisan``; a script that calls ``train`` itself says its own way."""
    try:
        yield
    except RunInterrupted as err:
        raise err.rehinted(resume) from None
    except CacheError as err:
        raise CacheError(str(err).replace("`iisan cache --overwrite`", rebuild)) from None


def _is_benchmark(path: Path) -> bool:
    return {"train_seconds_per_epoch", "full_evaluation_seconds"} <= set(read_results(path))


def cached_cpu_benchmark(data_dir: Path, epochs: int, work: Path, out: Path, rebuild_cache: bool = False) -> dict:
    """Cached IISAN on this CPU; each call trains a new run (a benchmark never resumes an older run's
    epochs). The cache in ``work`` is reused unless ``rebuild_cache``; its build is timed when made.
    ``out`` is checked first: it may only replace an earlier benchmark's summary."""
    claim_output(out, _is_benchmark, "a benchmark summary", "--out", overwrite=True)
    users, items = _data_files(data_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = Config(users=str(users), items=str(items), images=str(blank_image_store(work)), text_model=minilm_path(),
                 image_model=str(random_vit(work, hidden=384, layers=12, heads=6)),
                 cache_dir=str(work / "cache"), out_dir=str(work / "runs"),
                 run_name=time.strftime("cached-minilm-blank-%Y%m%d-%H%M%SZ", time.gmtime()),  # (UTC: no hour twice)
                 device="cpu", epochs=epochs, encode_batch_size=512, num_workers=2)
    cache_seconds = None
    with script_hints("A benchmark never resumes: run the same command again to train a new run (the cache is "
                      "kept)", "the --rebuild-cache flag of this script"):
        if rebuild_cache or not cache_file(cfg.cache_dir, "image").is_file():
            start = time.perf_counter()
            build_cache_from_config(cfg, dtype="float32", overwrite=rebuild_cache)
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
        "train_seconds_per_epoch": results["timing"]["train_seconds_per_epoch"],  # results.json's: first left out
        "train_seconds_per_epoch_all": sum(train_times) / len(train_times),  # the first epoch included
        "train_seconds_per_epoch_max": max(train_times),
        "full_evaluation_seconds": eval_seconds,
        "users_evaluated": data.num_users,
        "epochs_run": len(train_times),
        "best_epoch": results["best_epoch"],
        "valid": results["valid"],
        "test": test,
        "cache_build_seconds": cache_seconds,
        **provenance("cpu"),
        "config": cfg.to_dict(),
    }
    write_json_atomic(out, payload)
    return payload


def versa_minilm(data_dir: Path, work: Path, images: str = "blank", epochs: int = 5, patience: int = 10,
                 seed: int = 12345) -> dict:
    """IISAN-Versa, cached: MiniLM-L6 (6 x 384) + a random ViT (4 x 192, 64 px, patch 16); everything
    else is the authors' IISAN default (batch 64, lr 2e-4 / 1e-4 / 5e-5, bottleneck 64, ...)."""
    users, items = _data_files(data_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = blank_image_store(work) if images == "blank" else random_image_store(work, read_items(items).ids)
    cfg = Config(users=str(users), items=str(items), images=str(store), text_model=minilm_path(),
                 image_model=str(random_vit(work, hidden=192, layers=4, heads=3, image_size=64)),
                 feed="cached", cache_dir=str(work / f"cache-{images}"), epochs=epochs, patience=patience,
                 seed=seed, device="cpu", num_workers=0, out_dir=str(work / "runs"), progress=False)
    # named by what it computes, not by the clock: the same command finds its run again and resumes it
    cfg = cfg.replace(run_name=default_run_name(cfg, tag=f"versa-minilm-{images}"))
    start = time.perf_counter()
    with script_hints("To resume, run the same command again",
                      f"a new --work-dir (or after moving {cfg.cache_dir} away)"):
        if not all(cache_file(cfg.cache_dir, m).is_file() for m in ("text", "image")):
            build_cache_from_config(cfg, dtype="float16")  # resumable: an interrupted build keeps its chunks
        cache_seconds = time.perf_counter() - start  # 0 when an earlier run's cache is reused (checked on load)
        results = train(cfg)
    summary = {
        "what": "IISAN-Versa, cached: pretrained MiniLM-L6 text tower (6 x 384) + random-weight ViT image "
                "tower (4 x 192, 64 px, patch 16)",
        "images": BLANK if images == "blank" else RANDOM,
        "epoch_cap": epochs,
        "epochs_run": len(results["epochs"]),
        "best_epoch": results["best_epoch"],
        "test": results["test"],
        "valid": results["valid"],
        "parameters": results["parameters"],
        "cache_seconds": cache_seconds,
        "train_seconds_per_epoch": results["timing"]["train_seconds_per_epoch"],
        "total_seconds": time.perf_counter() - start,
        **provenance("cpu"),
        "results_file": str(Path(results["run_dir"]) / "results.json"),
    }
    write_json_atomic(work / f"versa_minilm_scientific_{images}.json", summary)
    return summary
