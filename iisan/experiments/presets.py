"""The paper's data sets and backbones as data: paths relative to the repository. (Each method's paper
defaults are ``config.METHOD_DEFAULTS``: they sit below every flag and file in the one precedence rule.)"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: iisan/experiments/presets.py -> ../..

DATASETS = {
    "Scientific": ("Scientific", "am_Industrial_and_Scientific_users.tsv", "Industrial_and_Scientific_items.tsv",
                   "stored_vectors_sci"),
    "Instrument": ("Instrument", "am_Musical_Instruments_users_10K.tsv", "Musical_Instruments_items.tsv",
                   "stored_vectors_ins"),
    "Office": ("Office", "am_Office_Products_users_10K.tsv", "Office_Products_items.tsv", "stored_vectors_off"),
    # IISAN-Versa's MicroLens-100k (numeric ids, some empty titles; data.microlens): --allow-empty-titles
    "MicroLens": ("MicroLens", "MicroLens-100k_pairs.tsv", "MicroLens-100k_title_en.tsv",
                  "stored_vectors_micro"),
}


def dataset_paths(name: str, root: Path = ROOT) -> dict[str, str]:
    """users, items, images (LMDB) and cache_dir for one of the paper's data sets."""
    folder, users, items, cache = DATASETS[name]
    base = root / "Dataset" / folder
    return {"users": str(base / users), "items": str(base / items), "images": str(base / "images.lmdb"),
            "cache_dir": str(root / "Code_Cached" / cache)}


BACKBONES = {
    "text_model": str(ROOT / "pretrained_models" / "bert-base-uncased"),
    "image_model": str(ROOT / "pretrained_models" / "vit-base-patch16-224"),
}
