"""Shared fixtures: a small synthetic data set, tiny random encoders saved with save_pretrained, the
image LMDB and fp32 caches, all built once per test session in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from iisan.config import Config
from iisan.data.images import build_image_lmdb
from iisan.data.interactions import read_items
from iisan.data.synthetic import generate
from iisan.tiny import vocabulary, write_bert, write_vit

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # tiny ops: one thread is as fast and immune to contention


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """Paths of a small data set (images, LMDB) and tiny BERT/ViT checkpoints."""
    root = tmp_path_factory.mktemp("tiny")
    paths = generate(root, num_users=160, num_items=60, num_topics=6, seed=1, image_size=64)
    items = read_items(paths["items"])
    text = write_bert(root / "bert", vocabulary(items.titles), hidden=32, layers=2, heads=2, seed=1)
    image = write_vit(root / "vit", hidden=24, layers=3, heads=2, image_size=32, patch_size=8, seed=1)
    lmdb_path = root / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb_path, items.ids, size=64, progress=False)
    return {"root": root, "users": str(paths["users"]), "items": str(paths["items"]),
            "images": str(lmdb_path), "image_dir": str(paths["images"]), "text_model": str(text),
            "image_model": str(image)}


@pytest.fixture()
def tiny_config(tiny, tmp_path):
    """A Config on the tiny data; callers override fields with ``.replace``."""

    def make(**overrides) -> Config:
        values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
        values.update(cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"), run_name="t",
                      device="cpu", num_workers=0, progress=False, batch_size=16, epochs=2,
                      encode_batch_size=32, eval_batch_size=64)
        values.update(overrides)
        return Config(**values)

    return make


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"shared data {path} is absent")
    return path
