"""What a resumed run needs besides its weights, as safetensors tensors plus JSON (never pickle).

- Random-number generators: Python and NumPy as JSON; torch CPU and CUDA as uint8 tensors, one per rank
  (dropout masks come from them, so an exact resume needs each rank's own stream). The order of users
  needs nothing stored: it is a pure function of (seed, epoch) (``batches.train_loader``).
- The optimiser: per-parameter tensors named ``optim.<group>.<index in group>.<key>``, the rest
  (hyper-parameters of each group, non-tensor state) as JSON.
- The gradient scaler (fp16): its state is a handful of numbers.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..distributed import Dist, gather_same

# --------------------------------------------------------------------------------------------------
# random-number generators


def capture_rng(dist: Dist, device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    """Collective under torchrun (every rank must call it); rank 0's result holds every rank's torch state.

    Python's and NumPy's generators are seeded alike on every rank and nothing rank-specific draws from
    them, so rank 0's state stands for all (a comment, not a check: nothing in training draws from them)."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [name, key.tolist(), pos, has_gauss, cached]}
    tensors = {}
    for rank, rng in enumerate(gather_same(torch.get_rng_state(), dist)):
        tensors[f"rng.torch.{rank}"] = rng
    if device.type == "cuda":
        for rank, rng in enumerate(gather_same(torch.cuda.get_rng_state(device), dist)):
            tensors[f"rng.cuda.{rank}"] = rng
    return state, tensors


def restore_rng(state: dict, tensors: dict[str, torch.Tensor], dist: Dist, device: torch.device) -> bool:
    """Set this rank's generators; False when the checkpoint has no stream for this rank or device
    (resumed with more processes, or CPU -> CUDA): then that stream is reseeded and results will not
    match an uninterrupted run bit for bit."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    exact = True
    own = tensors.get(f"rng.torch.{dist.rank}")
    if own is None:
        exact = False
    else:
        torch.set_rng_state(own)
    if device.type == "cuda":
        own = tensors.get(f"rng.cuda.{dist.rank}")
        if own is None:
            exact = False
        else:
            torch.cuda.set_rng_state(own, device)
    return exact


# --------------------------------------------------------------------------------------------------
# optimiser


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors, groups = {}, []
    for g, group in enumerate(optimizer.param_groups):
        name = group.get("name", str(g))
        plain = {}
        for i, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim.{name}.{i}.{key}"] = value.detach().cpu().contiguous()
                else:
                    plain[f"{i}.{key}"] = value
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}
        groups.append({"name": name, "size": len(group["params"]), "hyper": hyper, "plain": plain})
    return {"groups": groups}, tensors


def optimizer_from_files(optimizer: torch.optim.Optimizer, state: dict,
                         tensors: dict[str, torch.Tensor]) -> None:
    """Through ``load_state_dict``, which puts each state tensor on its parameter's device and dtype."""
    saved = state["groups"]
    mine = optimizer.param_groups
    shapes = [(group.get("name", str(g)), len(group["params"])) for g, group in enumerate(mine)]
    if [(s["name"], s["size"]) for s in saved] != shapes:
        raise ValueError(f"optimiser groups differ: checkpoint {[(s['name'], s['size']) for s in saved]}, "
                         f"model {shapes}")
    per_param: dict[int, dict] = {}
    param_groups = []
    index = 0
    for s, group in zip(saved, mine, strict=True):
        for i in range(s["size"]):
            prefix = f"optim.{s['name']}.{i}."
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            entry.update({k.split(".", 1)[1]: v for k, v in s["plain"].items()
                          if k.split(".", 1)[0] == str(i)})
            if entry:
                per_param[index + i] = entry
        # JSON turned tuples (Adam's betas) into lists; give them back their type.
        hyper = {k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in s["hyper"].items()}
        param_groups.append({**hyper, "params": list(range(index, index + s["size"]))})
        index += s["size"]
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})


# --------------------------------------------------------------------------------------------------
# gradient scaler


def scaler_state(scaler) -> dict:
    if scaler is None:
        return {}
    return {k: float(v) if torch.is_tensor(v) else v for k, v in scaler.state_dict().items()}


def restore_scaler(scaler, state: dict) -> None:
    if scaler is not None and state:
        scaler.load_state_dict(state)
