"""Trained weights on disk: only the trainable parameters, as safetensors with the resolved config in
the metadata (``best.safetensors`` of a run, and the model part of every checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import Config
from ..errors import TrainingError
from ..files import save_safetensors_atomic


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model: torch.nn.Module, path: Path, cfg: Config, extra: dict | None = None) -> None:
    meta = {"config": json.dumps(cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_safetensors_atomic(trainable_state(model), path, meta)


def load_weights(model: torch.nn.Module, path: str | Path) -> dict:
    return copy_weights(model, load_file(str(path)), path)


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict:
    """Copy trained weights into ``model``; every trainable parameter must be there, nothing else."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise TrainingError(f"{source} lacks trained weights for {len(missing)} parameters "
                            f"(e.g. {missing[0]})")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name not in params:
                raise TrainingError(f"{source} holds {name!r}, which this model does not have")
            params[name].copy_(value)
    return state


def ensure_best_weights(model: torch.nn.Module, path: Path, cfg: Config, best_epoch: int, best_valid: dict) -> None:
    """After a resume whose checkpoint is the best epoch: a kill between that checkpoint and the
    best-weights file leaves the file one best behind, so it is rewritten from ``model``."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            on_disk = int((fh.metadata() or {}).get("epoch", -1))
    except Exception:  # absent or damaged (safetensors raises its own types): rewrite it
        on_disk = None
    if on_disk != best_epoch:
        save_weights(model, path, cfg, {"epoch": best_epoch, "valid": best_valid})
