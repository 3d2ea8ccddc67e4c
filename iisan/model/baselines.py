"""The paper's baselines (FFT, Adapter, LoRA, BitFit): backbones trained end to end through a PEFT
method, their final CLS feeding the heads of the authors' "intra" setting:
``item = com_dense([gelu(W_img cls_img); gelu(W_txt cls_txt)])`` with com_dense 128 -> 64.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import Config
from ..data.batches import ItemBatch
from ..errors import TargetError
from ..spelling import target_entries
from .backbones import BackboneEncoder
from .inputs import EncodedItems
from .item_encoder import MODALITIES, LrGroup, init_image_head
from .peft_methods import added_parameters, apply_adapters, apply_bitfit, apply_fft, apply_lora
from .tower_settings import tower_settings

log = logging.getLogger(__name__)


def tower_targets(targets: str, modality: str, flag: str) -> list[str]:
    """The entries of a comma-separated target list for one tower: ``text:c_attn`` the text tower's only,
    an entry without a prefix both towers' (``query``: a role; ``q_proj``: a module-name suffix)."""
    chosen = []
    for entry in target_entries(targets):
        tower, _, name = entry.rpartition(":")
        if tower not in ("", "text", "image") or not name:
            raise TargetError(f"{flag} entry {entry!r}: expected a role or module name, optionally after text: "
                              "or image: (that tower only)")
        if tower in ("", modality):
            chosen.append(name)
    if not chosen:
        raise TargetError(f"{flag} {targets!r} names nothing for the {modality} tower")
    return chosen


def _apply_fft(model: nn.Module, cfg: Config, modality: str) -> list[nn.Module]:
    apply_fft(model)
    return []


def _apply_bitfit(model: nn.Module, cfg: Config, modality: str) -> list[nn.Module]:
    apply_bitfit(model)
    if not any(p.requires_grad for p in model.parameters()):  # LLaMA, Mistral, ModernBERT: no bias anywhere
        log.warning("bitfit: the %s tower (%s) has no biases, so none of its weights trains; only the heads and "
                    "SASRec do", modality, getattr(model.config, "model_type", type(model).__name__))
    return []


def _apply_adapter(model: nn.Module, cfg: Config, modality: str) -> list[nn.Module]:
    down = tower_settings(cfg, modality).adapter_down
    targets = tower_targets(cfg.adapter_targets, modality, "--adapter-targets")
    return apply_adapters(model, down, targets, f"{modality} encoder", cfg.adapter_init, cfg.adapter_position)


def _apply_lora(model: nn.Module, cfg: Config, modality: str) -> list[nn.Module]:
    seed = cfg.seed + (modality == "text")  # the two towers' random layers differ, as the authors'
    targets = tower_targets(cfg.lora_targets, modality, "--lora-targets")
    what = f"{modality} encoder"
    return apply_lora(model, cfg.lora_rank, cfg.lora_alpha, targets, what, cfg.lora_random_base, seed)


# Each baseline (``methods.METHOD_TABLE``'s kind "baseline") -> what makes a backbone trainable its way.
APPLY = {"fft": _apply_fft, "adapter": _apply_adapter, "lora": _apply_lora, "bitfit": _apply_bitfit}


def apply_method(encoder: BackboneEncoder, cfg: Config, modality: str) -> list[nn.Module]:
    """Make ``encoder`` trainable per ``cfg.method`` (``APPLY``); returns the modules the method added to it
    (none for FFT and BitFit), whose parameters train at the adapter rates (``BaselineItemEncoder.
    param_groups``): a new method returns its own here, or they train at the backbone's rate."""
    if cfg.method not in APPLY:
        raise ValueError(f"{cfg.method} is not a baseline")
    return APPLY[cfg.method](encoder.model, cfg, modality)


class BaselineItemEncoder(EncodedItems):
    """Trainable backbones -> final CLS -> GELU heads -> com_dense. Padding (index 0) never enters a
    backbone, or with static shapes runs and is masked: its CLS is zeros, as its states are in IISAN's
    feeds, and no gradient reaches a backbone through it."""

    def __init__(self, encoders: dict[str, BackboneEncoder], tokens: torch.Tensor | None,
                 attention: torch.Tensor | None, embedding_dim: int = 64,
                 added: dict[str, list[nn.Module]] | None = None):
        super().__init__(encoders, tokens, attention)
        self.added = added or {}  # per tower, the modules its method added (``apply_method``)
        self.modalities = tuple(m for m in MODALITIES if m in encoders)
        self.heads = nn.ModuleDict({m: nn.Linear(encoders[m].width, embedding_dim) for m in self.modalities})
        self.combine = nn.Linear(len(self.modalities) * embedding_dim, embedding_dim)
        if "image" in self.heads:
            init_image_head(self.heads["image"])

    def forward(self, items: ItemBatch) -> torch.Tensor:
        parts = []
        for m in self.modalities:
            cls = self.encode(m, items, lambda encoder, inputs: encoder.final_cls(**inputs), (self.encoders[m].width,))
            parts.append(nn.functional.gelu(self.heads[m](cls)))  # (U, 64)
        return self.combine(torch.cat(parts, dim=-1))  # (U, 64)

    def param_groups(self) -> dict[LrGroup, list[nn.Parameter]]:
        """Authors' groups: heads and com_dense in recsys; backbone weights/biases of FFT and BitFit in
        the image/text groups; adapter and LoRA weights in the adapter groups."""
        groups = {LrGroup.RECSYS: list(self.heads.parameters()) + list(self.combine.parameters())}
        for m, encoder in self.encoders.items():
            trainable = [p for p in encoder.parameters() if p.requires_grad]
            injected = {id(p) for p in added_parameters(self.added.get(m, []))}
            groups[LrGroup.adapter(m)] = [p for p in trainable if id(p) in injected]
            groups[LrGroup.backbone(m)] = [p for p in trainable if id(p) not in injected]
        return groups

    def cache_dtypes(self) -> dict[str, str]:
        return {}  # the backbones run live: no cache


def baseline_item_encoder(cfg: Config, encoders: dict[str, BackboneEncoder],
                          titles: list[str] | None) -> BaselineItemEncoder:
    """The method applied to ``encoders``; ``titles`` (None: shapes only) are tokenised for the text tower."""
    added = {}
    for m, encoder in encoders.items():
        added[m] = apply_method(encoder, cfg, m)
        encoder.train()  # trained backbones run with their own dropout, as in the authors' code
    tokens = attention = None
    if "text" in encoders and titles is not None:
        tokens, attention = encoders["text"].title_inputs(titles, cfg.title_tokens)
    return BaselineItemEncoder(encoders, tokens, attention, cfg.embedding_dim, added)

