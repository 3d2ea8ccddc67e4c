"""``iisan params``: the trainable/total parameter line of any method, from random-weight backbones
(no download) or from model folders.

Expected with ``--random-backbones base`` (BERT-base + ViT-B/16): FFT 194.90 M, Adapter 4.97 M,
LoRA 0.80 M (authors 0.83 M: their loralib layers left the Q/V biases trainable, 36,864 more),
BitFit 0.41 M, IISAN 4.11 M.
"""

from __future__ import annotations

import torch

from .backbones import FrozenEncoder, freeze, group_layers
from .baselines import BaselineItemEncoder, apply_method
from .build import count_parameters, parameter_line
from .config import METHOD_NAMES, METHODS, Config
from .feeds import LiveStates
from .model import IISANItemEncoder, Recommender
from .san import SANItemTower


def random_encoders(size: str) -> dict[str, FrozenEncoder]:
    from .tiny import base_architectures

    if size != "base":
        raise ValueError(f"unknown backbone size {size!r}")
    with torch.device("meta"):  # shapes only: counting needs no memory and no random initialisation
        bert, vit = base_architectures()
    return {"text": FrozenEncoder(bert, "text", group_layers(12, 6)),
            "image": FrozenEncoder(vit, "image", group_layers(12, 6))}


def model_for_counting(cfg: Config, encoders: dict[str, FrozenEncoder]) -> Recommender:
    """The method's recommender around ``encoders`` (no data needed: popularity is a dummy)."""
    for encoder in encoders.values():
        freeze(encoder)
    if cfg.method == "iisan":
        states = LiveStates(encoders)
        tower = SANItemTower({m: e.width for m, e in encoders.items()}, {m: len(e.layers) for m, e in encoders.items()},
                             cfg.embedding_dim, {"text": cfg.text_adapter_down, "image": cfg.image_adapter_down},
                             cfg.modality, cfg.fusion, cfg.gate_temperature)
        item_encoder = IISANItemEncoder(states, tower)
    else:
        for m, encoder in encoders.items():
            apply_method(encoder, cfg, m)
        item_encoder = BaselineItemEncoder(encoders, None, None, cfg.embedding_dim)
    return Recommender(item_encoder, torch.ones(2), cfg.embedding_dim, cfg.max_seq_len, cfg.transformer_blocks,
                       cfg.attention_heads, cfg.drop_rate)


def count(cfg: Config, random_backbones: str | None = None) -> dict:
    if random_backbones:
        encoders = random_encoders(random_backbones)
    else:
        from .build import load_encoders

        encoders = load_encoders(cfg)
    with torch.device("meta" if random_backbones else "cpu"):  # adapters on meta backbones stay on meta
        model = model_for_counting(cfg, encoders)
    trainable, total = count_parameters(model)
    return {"method": METHOD_NAMES[cfg.method], "trainable": trainable, "total": total,
            "line": parameter_line(model)}


def add_params_parser(sub) -> None:
    p = sub.add_parser("params", help="print the trainable-parameter line of a method")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--random-backbones", choices=("base",), default=None,
                   help="BERT-base + ViT-B/16 built from default configs with random weights (no download)")
    p.add_argument("--text-model", default=None, help="text encoder folder (instead of --random-backbones)")
    p.add_argument("--image-model", default=None, help="image encoder folder (instead of --random-backbones)")
    p.set_defaults(func=cmd_params)


def cmd_params(args) -> None:
    values = {"method": args.method}
    if args.text_model:
        values["text_model"] = args.text_model
    if args.image_model:
        values["image_model"] = args.image_model
    result = count(Config(**values), args.random_backbones)
    print(f"{result['method']}: {result['line']}")
