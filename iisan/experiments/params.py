"""Parameter counts of a method: the model ``iisan train`` would build (``model.build.build_model``),
around random-weight backbones (no download, no memory: built on the meta device) or model folders.

Expected with ``--random-backbones base`` (BERT-base + ViT-B/16): FFT 194.90 M, Adapter 4.97 M,
LoRA 0.80 M (authors 0.83 M: their loralib layers left the Q/V biases trainable, 36,864 more),
BitFit 0.41 M, IISAN 4.11 M.
"""

from __future__ import annotations

import torch

from ..config import METHOD_NAMES, Config
from ..errors import ConfigError
from ..model.backbones import FrozenEncoder
from ..model.build import build_model, count_parameters, layers_for, load_data, parameter_line
from ..model.tiny import base_architectures

RANDOM_BACKBONES = ("base",)


def random_encoders(cfg: Config, size: str) -> dict[str, FrozenEncoder]:
    """BERT-base and ViT-B/16 with random weights on the meta device, reading ``cfg``'s layers."""
    if size not in RANDOM_BACKBONES:
        raise ConfigError(f"--random-backbones {size!r}: expected one of {', '.join(RANDOM_BACKBONES)}")
    with torch.device("meta"):  # shapes only: counting needs no memory and no random initialisation
        bert, vit = base_architectures()
    models = {"text": bert, "image": vit}
    towers = ("text", "image") if cfg.towers == "both" else (cfg.towers,)
    return {m: FrozenEncoder(models[m], m, layers_for(cfg, m, models[m].config.num_hidden_layers))
            for m in towers}


def count(cfg: Config, random_backbones: str | None = None) -> dict:
    """``trainable``, ``total`` and peft's canonical ``line`` for ``cfg``'s model. Method ``id`` reads
    the data set (its table has a row per item) and no encoder."""
    if cfg.method == "id":
        model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"))
        return _line(cfg, model)
    device = torch.device("meta" if random_backbones else "cpu")
    encoders = random_encoders(cfg, random_backbones) if random_backbones else None
    with device:  # adapters added to meta backbones stay on meta
        model, _ = build_model(cfg, None, device, encoders)
    return _line(cfg, model)


def _line(cfg: Config, model: torch.nn.Module) -> dict:
    trainable, total = count_parameters(model)
    return {"method": METHOD_NAMES[cfg.method], "trainable": trainable, "total": total,
            "line": parameter_line(model)}
