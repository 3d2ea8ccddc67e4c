"""The paper's data sets, backbones and IISAN-Versa encoder pairs as data: paths relative to the repository.
(Each method's paper defaults are ``config.METHOD_DEFAULTS``: they sit below every flag and file in the one
precedence rule.)"""

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


MODELS = ROOT / "pretrained_models"
BACKBONES = {
    "text_model": str(MODELS / "bert-base-uncased"),
    "image_model": str(MODELS / "vit-base-patch16-224"),
}

VERSA_PRESETS = {  # Code_Cached/scripts/run_IISAN_Versa.py --preset NAME; every key is a Config field
    # The paper's LLM pairing (authors' run_IISAN_ins.py / run_IISAN_off.py): LLaMA-3-70B, 80 layers x 8192,
    # their layer list 4,19,...,79 (+1, with the embedding output). Their LLM features (preprocess_llama-
    # 3-70b_*.py) average all 30 positions, padding included (pad id 0, no attention mask), over titles
    # that are not lower-cased: text_pooling "authors" (--text-pooling mean: over real tokens only).
    "llama3-70b+vit-base": {"text_model": str(MODELS / "Meta-Llama-3-70B"),
                            "text_layers": (0, 5, 20, 35, 50, 65, 80), "text_pooling": "authors"},
    # The same design on one GPU: 32 layers x 4096, the authors' list for 32-layer towers, blocks
    # 1,7,13,19,25,31 (+1, with the embedding output): what --layer-rule stride picks too (groups would
    # pick 0,5,11,16,21,27,32).
    "llama3-8b+vit-base": {"text_model": str(MODELS / "Meta-Llama-3-8B"),
                           "text_layers": (0, 2, 8, 14, 20, 26, 32), "text_pooling": "authors"},
    # BERT-large (24 layers x 1024) with ViT-B (12 x 768): unequal widths, equal block counts.
    "bert-large+vit-base": {"text_model": str(MODELS / "bert-large-uncased")},
    # BERT-base with ViT-B: equal towers, so Versa is IISAN exactly (same parameters, same outputs).
    "bert-base+vit-base": {},
    # Authors' run_IISAN_micro.py: BERT-base + ViT-B on MicroLens-100k, batch 512, image bottleneck 512,
    # and their Versa draft's narrow heads width -> 64 -> 64 (--san-heads iisan: width -> width -> 64).
    "microlens": {"batch_size": 512, "image_adapter_down": 512, "text_adapter_down": 64, "epochs": 200,
                  "allow_empty_titles": True, "san_heads": "versa"},
}

