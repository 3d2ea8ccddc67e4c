"""Trained weights on disk: only the trainable parameters, as safetensors with the resolved config in
the metadata (``best.safetensors`` of a run, and the model part of every checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import Config
from ..errors import TrainingError
from ..files import check_readable, failure_reason
from ..tensorfiles import save_safetensors_atomic


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model: torch.nn.Module, path: Path, cfg: Config, extra: dict | None = None) -> None:
    meta = {"config": json.dumps(cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_safetensors_atomic(trainable_state(model), path, meta)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file; a damaged or foreign file is one error naming it."""
    try:
        check_readable(path)  # safetensors calls a file it may not read missing
        with safe_open(str(path), framework="pt") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}, fh.metadata() or {}
    except OSError as err:  # absent, or not for this user ('Permission denied')
        raise TrainingError(f"{path} cannot be read ({failure_reason(err)})") from None
    except SafetensorError as err:
        raise TrainingError(f"{path} is not a readable safetensors file ({err}); it may have been cut short "
                            "or replaced: retrain, or restore it from a copy") from None


def load_weights(model: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Copy the weights file ``path`` into ``model``; returns the file's metadata."""
    state, metadata = read_weights(path)
    copy_weights(model, state, path)
    return metadata


# Why a weights file may not fit the model its run's config builds, besides damage or another run's file.
OTHER_MODEL = (" (a version of IISAN before commit d13552b put a CLIP tower's default LoRA on k_proj and q_proj: "
               "retrain such a run)")


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict:
    """Copy trained weights into ``model``; every trainable parameter must be there, nothing else (a frozen
    parameter's name in the file is refused: IISAN writes the trained ones alone, and it would overwrite a
    pretrained weight)."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise TrainingError(f"{source} lacks trained weights for {len(missing)} parameters (e.g. {missing[0]}): "
                            f"it is of another model than its config builds now{OTHER_MODEL}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name not in params:
                raise TrainingError(f"{source} holds {name!r}, which this model does not have{OTHER_MODEL}")
            if not params[name].requires_grad:
                raise TrainingError(f"{source} holds {name!r}, which this model keeps frozen: IISAN writes only the "
                                    "trained weights, so the file is of another model than its config builds now")
            if value.shape != params[name].shape:
                raise TrainingError(f"{source}: {name!r} has shape {tuple(value.shape)}, the model built from "
                                    f"the config has {tuple(params[name].shape)}")
            if params[name].is_floating_point() and not value.is_floating_point():  # copy_ would cast it
                raise TrainingError(f"{source}: {name!r} is {dtype_name(value)}, the model's parameter is "
                                    f"{dtype_name(params[name])}; expected a floating type (damaged or foreign "
                                    "file): retrain, or restore it from a copy")
            params[name].copy_(value)
    return state


def dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


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
