"""The paper's backbones and IISAN-Versa encoder pairs as data, and the cache folder an entry script uses
for an items file (the data sets' own paths: ``data.datasets.dataset_paths``).
(Each method's paper defaults are ``methods.METHOD_DEFAULTS``: they sit below every flag and file in the one
precedence rule.)"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ..config import DEFAULT_MODELS, REPOSITORY, model_location
from ..data.datasets import DATASETS, dataset_paths
from ..files import path_component

log = logging.getLogger(__name__)
ROOT = REPOSITORY  # where the data sets and encoders of the paper live
SCIENTIFIC = ROOT.parent / "shared" / "data" / "amazon" / "Scientific"  # the real data the CPU measurements read
SEEDS = (12345, 12346, 12347)  # a reproduction's seeds: the authors' seed, then the next two
SEED_SETTINGS = ("id", "iisan-text")  # what the real-data seed table trains (``seed_table.DESCRIPTION``)


def own_cache_dir(cache_dir: str, items: str, dataset: str) -> str:
    """The cache folder an entry script defaults to for ``items`` (the command line's or config file's): the
    data set's (``cache_dir``, a Versa preset's suffix included), or, for an items file that is not the data
    set's, a folder of its own under Code_Cached named by the file's folder and a digest of its path, so that
    the cache of other items never lands in (nor is refused from) a paper data set's folder."""
    paper = dataset_paths(dataset)
    if same_folder(items, paper["items"]) or not cache_dir.startswith(paper["cache_dir"]):
        return cache_dir
    where = Path(os.path.abspath(items))
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:8]
    own = ROOT / "Code_Cached" / f"stored_vectors_{path_component(where.parent.name or 'items')}_{digest}"
    return str(own) + cache_dir[len(paper["cache_dir"]):]


BACKBONES = {f"{m}_model": str(model_location(DEFAULT_MODELS[m])) for m in ("text", "image")}  # Config's defaults
MODELS = model_location(DEFAULT_MODELS["text"]).parent

VERSA_DEFAULT_PRESET = "llama3-8b+vit-base"  # run_IISAN_Versa.py's default --preset
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
    # BERT-large (24 layers x 1024) with ViT-B (12 x 768): unequal widths, equal block counts. The stride
    # rule reads hidden states 0,4,...,24: the last of three lists the authors' script offers in comments
    # (every other layer, or 13..23, are --text-layers away).
    "bert-large+vit-base": {"text_model": str(MODELS / "bert-large-uncased")},
    # BERT-base with ViT-B: equal towers, so Versa is IISAN exactly (same parameters, same outputs).
    "bert-base+vit-base": {},
    # Authors' run_IISAN_micro.py: BERT-base + ViT-B on MicroLens-100k, batch 512, image bottleneck 512,
    # and their Versa draft's narrow heads width -> 64 -> 64 (--san-heads iisan: width -> width -> 64).
    "microlens": {"batch_size": 512, "image_adapter_down": 512, "text_adapter_down": 64, "epochs": 200,
                  "allow_empty_titles": True, "san_heads": "versa"},
}
ENCODER_PRESET_NAMES = ("iisan", *VERSA_PRESETS)  # `iisan fetch encoders --preset`: the paper's pair, or a preset's
VERSA_PRESET_DATASETS = {"microlens": "MicroLens"}  # a preset that is one data set's set-up: its --dataset


# The keys by which automatic layer selection picks layers: given any of them, a preset's own layer list gives
# way to the rule (a list would pick the same layers whatever they say).
LAYER_CHOICE = ("layer_rule", "layer_groups", "include_embedding_state", "intra_start")


def versa_defaults(preset: str, dataset: str, text_model: str | None = None, image_model: str | None = None,
                   by_rule: bool = False) -> dict:
    """run_IISAN_Versa.py's defaults for a preset on a data set: cached IISAN with the preset's settings.
    A preset with another text encoder caches into its own folder (``<the data set's>_<preset>``); one that
    keeps BERT-base reads IISAN's cache. An unknown data set sets no cache folder (the parser refuses it).
    ``text_model`` (the command line's ``--text-model``), when not the preset's own: the preset's layer
    list and pooling are its encoder's, so the other one gets the layer rule's and its family's
    (``--text-layers`` / ``--text-pooling`` set them), and a cache folder named after it. ``image_model``
    (``--image-model``), when not ViT-B/16: the folder's name gets its name too (its states are not the
    ViT's, and the other pair's cache must not be the one a refusal tells to rebuild). ``by_rule``: a key of
    ``LAYER_CHOICE`` was given, so the preset's layer list gives way to the rule (its pooling stays)."""
    cache_dir = dataset_paths(dataset)["cache_dir"] if dataset in DATASETS else ""
    settings = VERSA_PRESETS[preset]
    if text_model and not same_folder(text_model, settings.get("text_model", BACKBONES["text_model"])):
        if dropped := [f"{k}={v}" for k, v in settings.items() if k in ("text_layers", "text_pooling")]:
            log.info("--text-model %s is not preset %s's own text encoder: its %s give way to the layer rule's and "
                     "the family's pooling (--text-layers / --text-pooling set them)", text_model, preset,
                     " and ".join(dropped))
        settings = {k: v for k, v in settings.items() if k not in ("text_layers", "text_pooling")}
        if cache_dir and not same_folder(text_model, BACKBONES["text_model"]):
            cache_dir += "_" + path_component(Path(text_model).resolve().name)
    elif settings.get("text_model") and cache_dir:
        cache_dir += "_" + preset
    if by_rule:
        settings = {k: v for k, v in settings.items() if k != "text_layers"}
    if image_model and cache_dir and not same_folder(image_model, BACKBONES["image_model"]):
        cache_dir += "_" + path_component(Path(image_model).resolve().name)
    return {"method": "iisan", "feed": "cached", **({"cache_dir": cache_dir} if cache_dir else {}), **settings}


def same_folder(a: str, b: str) -> bool:
    """Whether two spellings name one folder or file (``models/x/``, ``./models/x`` and its absolute path do), an
    encoder folder as ``model_location`` finds it (a default one under the repository, from any folder)."""
    return a == b or model_location(a).resolve() == model_location(b).resolve()
