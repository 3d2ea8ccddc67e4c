"""The encoder families IISAN can use, by ``config.model_type``, and what each needs: which tower of a
dual checkpoint is meant (CLIP, SigLIP), which transformers class loads it (the encoder half of T5), and
how its per-layer states are pooled. Anything else is refused in one line (``check_architecture``) before
a weight is read."""

from __future__ import annotations

import transformers
from torch import nn

from ..errors import EncoderError

# Text encoders whose first token is a CLS token, trained to stand for the text (cls pooling by default).
TEXT_ENCODERS = frozenset({"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
                           "xlm-roberta", "mpnet", "camembert", "ernie", "modernbert"})
# Causal text towers, whose first token sees only itself (mean pooling by default): decoder LLMs, and
# CLIP's text model, whose attention is causal too.
TEXT_DECODERS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "clip",
                           "clip_text_model"})
# The encoder of an encoder-decoder model (T5 and its multilingual kin): bidirectional, with no CLS token
# (its first token is a title's first word), so mean pooling by default; its decoder is never loaded.
TEXT_ENCODER_HALVES = frozenset({"t5", "mt5", "umt5"})
IMAGE_ENCODERS = frozenset({"vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip",
                            "siglip_vision_model"})
# Image towers without a CLS token (SigLIP): their states pool the mean over patches, as transformers'
# SiglipForImageClassification pools its final states; every other image tower pools its CLS token.
MEAN_POOLED_IMAGES = frozenset({"siglip", "siglip_vision_model"})
# Image towers that interpolate their position embeddings to any image size (DINOv2: trained at 518, fed 224
# crops); every other one takes only its config's image_size.
INTERPOLATING = frozenset({"dinov2", "dinov2_with_registers"})
# Image towers that leave their final LayerNorm (``post_layernorm``) to the pooled token: CLIP's vision tower.
NORM_AFTER_POOLING = frozenset({"clip_vision_model"})
SUPPORTED = {"text": TEXT_ENCODERS | TEXT_DECODERS | TEXT_ENCODER_HALVES, "image": IMAGE_ENCODERS}


def check_architecture(model_type: str, modality: str, name: str) -> None:
    if model_type not in SUPPORTED[modality]:
        raise EncoderError(f"{modality} encoder {name!r} is a {model_type!r} model, which IISAN cannot use as the "
                           f"{modality} tower; supported: {', '.join(sorted(SUPPORTED[modality]))} (another "
                           "family is added in iisan/model/families.py: README, \"Adding an encoder family\")")


def model_class(model_type: str):
    """The transformers Auto class that loads a tower of ``model_type``: T5's encoder alone, else ``AutoModel``.
    Looked up when called: transformers imports its model classes then, which takes seconds that a cached run,
    reading only configs, never spends."""
    return getattr(transformers, "AutoModelForTextEncoding" if model_type in TEXT_ENCODER_HALVES else "AutoModel")


MODEL_CLASSES = frozenset({"AutoModel", "AutoModelForTextEncoding"})  # the classes that load weights, by name


def tower_config(config, modality: str):
    """The config of the ``modality`` tower: of a CLIP-style dual model's image tower, its vision config."""
    return config.vision_config if modality == "image" and hasattr(config, "vision_config") else config


def one_tower(model: nn.Module, modality: str) -> nn.Module:
    """Of a CLIP-style dual model, the ``modality`` tower (``text_model`` or ``vision_model``); else ``model``."""
    tower = "text_model" if modality == "text" else "vision_model"
    return getattr(model, tower) if hasattr(model, tower) else model


def resolve_pooling(pooling: str, model_type: str, modality: str = "text") -> str:
    """A tower's pooling: 'auto' is 'cls' for towers with a CLS token (BERT-family encoders, image towers
    but SigLIP), else 'mean' (decoder LLMs, CLIP's text model, T5's encoder, SigLIP)."""
    if pooling != "auto":
        return pooling
    if modality == "image":
        return "mean" if model_type in MEAN_POOLED_IMAGES else "cls"
    return "cls" if model_type in TEXT_ENCODERS else "mean"
