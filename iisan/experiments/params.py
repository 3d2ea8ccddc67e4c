"""Parameter counts of a method: the model ``iisan train`` would build (``model.build.build_model``),
around the backbones' architectures built on the meta device (no weights read, no memory): those of the
``--text-model`` / ``--image-model`` folders' configs, or BERT-base + ViT-B/16 (``--random-backbones base``).

Expected with ``--random-backbones base`` (BERT-base + ViT-B/16): FFT 194.90 M, Adapter 4.97 M,
LoRA 0.80 M (authors 0.83 M: their loralib layers left the Q/V biases trainable, 36,864 more),
BitFit 0.41 M, IISAN 4.11 M.
"""

from __future__ import annotations

import torch

from ..bounds import RANDOM_BACKBONES
from ..config import Config
from ..data.run_data import load_data
from ..errors import ConfigError
from ..methods import METHOD_NAMES
from ..model.backbones import BackboneEncoder, architecture, depth_and_width
from ..model.build import (
    build_model,
    count_parameters,
    layers_for,
    modalities,
    model_name,
    parameter_line,
    pooling_for,
)
from ..model.tiny import base_architectures


def random_encoders(cfg: Config, size: str | None = None) -> dict[str, BackboneEncoder]:
    """``cfg``'s towers with random weights on the meta device, reading ``cfg``'s layers: BERT-base and
    ViT-B/16 (``size='base'``), or the architectures of ``cfg``'s model folders (``size=None``)."""
    if size is not None and size not in RANDOM_BACKBONES:
        raise ConfigError(f"--random-backbones {size!r}: expected one of {', '.join(RANDOM_BACKBONES)}")
    towers = modalities(cfg)
    with torch.device("meta"):  # shapes only: counting needs no memory and no random initialisation
        if size == "base":
            bert, vit = base_architectures()
            models = {"text": bert, "image": vit}
        else:
            models = {m: architecture(model_name(cfg, m), m) for m in towers}
    encoders = {}
    for m in towers:
        depth, _ = depth_and_width(models[m].config, "" if size == "base" else model_name(cfg, m))
        pooling = pooling_for(cfg, m, models[m].config.model_type)
        encoders[m] = BackboneEncoder(models[m], m, layers_for(cfg, m, depth), pooling)
    return encoders


def count(cfg: Config, random_backbones: str | None = None) -> dict:
    """``trainable``, ``total`` and peft's canonical ``line`` for ``cfg``'s model. Method ``id`` reads
    the data set (its table has a row per item) and no encoder."""
    if cfg.method == "id":
        model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"))
        return _line(cfg, model)
    device = torch.device("meta")
    encoders = random_encoders(cfg, random_backbones)
    with device:  # adapters added to meta backbones stay on meta
        model, _ = build_model(cfg, None, device, encoders)
    return _line(cfg, model)


def _line(cfg: Config, model: torch.nn.Module) -> dict:
    trainable, total = count_parameters(model)
    return {"method": METHOD_NAMES[cfg.method], "trainable": trainable, "total": total,
            "line": parameter_line(model)}
