"""The optimizer: Adam with the authors' learning-rate groups (``LR_OF_GROUP``: which config key sets the
rate of each ``LrGroup``), every trainable parameter in exactly one group."""

from __future__ import annotations

import dataclasses
import logging

import torch

from .. import once
from ..config import Config
from ..distributed import main_process
from ..methods import METHOD_DEFAULTS, side_network, unread_keys
from ..model.item_encoder import LrGroup
from ..model.recommender import Recommender

log = logging.getLogger(__name__)


def make_optimizer(model: Recommender, cfg: Config, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    # Adam with torch defaults, no weight decay (authors). Fused (one kernel per group) on CUDA and on
    # the CPU, where it is ~3x faster than the per-parameter loop for IISAN's ~130 small tensors; the loop
    # (``--no-fused-adam``) is what the authors' code ran. capturable keeps the step counter on the device
    # so that the update can live in a CUDA graph.
    cuda = device.type == "cuda"
    fused = {"fused": True} if cfg.fused_adam else {"fused": False, "foreach": False}
    groups = optimizer_groups(model, cfg)
    say_idle_rates(cfg, {LR_OF_GROUP[LrGroup(g["name"])] for g in groups})
    return torch.optim.Adam(groups, **fused, capturable=cuda and capturable)


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


def say_idle_rates(cfg: Config, used: set[str]) -> None:
    """Warn of a learning rate set otherwise than the method's default that no parameter of this model trains
    at (Adapter's --lr-image, a text-only run's --lr-adapter-image, LoRA's --lr-text without its random base):
    it changes nothing. Keys no such run reads at all are said by ``precedence.resolve`` already."""
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    said_before = unread_keys(cfg.method, cfg.towers, cfg.feed)
    idle = [k for k in LR_OF_GROUP.values() if k not in used and k not in said_before
            and getattr(cfg, k) != METHOD_DEFAULTS[cfg.method].get(k, fields[k])]
    if not idle:
        return
    # A warning the first time in this process; a sweep's later runs say it at INFO, for their train.log
    # (under torchrun: a warning from rank 0 only)
    fresh = [once.first("idle rate", (k, getattr(cfg, k), cfg.method, cfg.towers, cfg.feed, cfg.modality))
             for k in idle]
    level = logging.WARNING if main_process() and any(fresh) else logging.INFO
    run = f"method={cfg.method}, towers={cfg.towers}" + (f", modality={cfg.modality}" * side_network(cfg.method))
    log.log(level, "%s: no parameter of this run trains at %s (%s; its rates: %s), so %s nothing",
            ", ".join(f"{k}={getattr(cfg, k)}" for k in idle), "it" if len(idle) == 1 else "them", run,
            ", ".join(sorted(used)), "it changes" if len(idle) == 1 else "they change")


def trained_by_rate(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """How many trainable parameters each learning-rate key (``lr``, ``lr_text``, ...) sets the rate of: the
    keys a run trains with (results.json's ``parameters.by_rate``; the results table shows no other)."""
    return {LR_OF_GROUP[group["name"]]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}
