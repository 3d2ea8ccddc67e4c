"""The optimizer: Adam with the authors' learning-rate groups (``LR_OF_GROUP``: which config key sets the
rate of each ``LrGroup``), every trainable parameter in exactly one group."""

from __future__ import annotations

import torch

from ..config import Config
from ..model.item_encoder import LrGroup
from ..model.recommender import Recommender


def make_optimizer(model: Recommender, cfg: Config, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    # Adam with torch defaults, no weight decay (authors). Fused (one kernel per group) on CUDA and on
    # the CPU, where it is ~3x faster than the per-parameter loop for IISAN's ~130 small tensors; the loop
    # (``--no-fused-adam``) is what the authors' code ran. capturable keeps the step counter on the device
    # so that the update can live in a CUDA graph.
    cuda = device.type == "cuda"
    fused = {"fused": True} if cfg.fused_adam else {"fused": False, "foreach": False}
    return torch.optim.Adam(optimizer_groups(model, cfg), **fused, capturable=cuda and capturable)


LR_OF_GROUP = {
    LrGroup.RECSYS: "lr",
    LrGroup.IMAGE: "lr_image",
    LrGroup.TEXT: "lr_text",
    LrGroup.ADAPTER_IMAGE: "lr_adapter_image",
    LrGroup.ADAPTER_TEXT: "lr_adapter_text",
}


def optimizer_groups(model: Recommender, cfg: Config) -> list[dict]:
    """Adam parameter groups with the authors' learning rates; every trainable parameter exactly once. A
    group's name is its ``LrGroup`` as a plain string, as checkpoints hold it."""
    groups = []
    seen: set[int] = set()
    for name, params in model.param_groups().items():
        params = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"name": str(name), "params": params, "lr": getattr(cfg, LR_OF_GROUP[name])})
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if stray:
        raise RuntimeError(f"trainable parameters in no learning-rate group: {', '.join(stray[:5])}")
    return groups


def trained_by_rate(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """How many trainable parameters each learning-rate key (``lr``, ``lr_text``, ...) sets the rate of: the
    keys a run trains with (results.json's ``parameters.by_rate``; the results table shows no other)."""
    return {LR_OF_GROUP[group["name"]]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}
