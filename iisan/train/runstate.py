"""What a resumed run needs besides its weights, as safetensors tensors plus JSON (never pickle).

- Random-number generators: Python and NumPy as JSON; torch CPU and CUDA as uint8 tensors, one per rank
  (dropout masks come from them, so an exact resume needs each rank's own stream). The order of users
  needs nothing stored: it is a pure function of (seed, epoch) (``epochs.epoch_order``).
- The optimiser: per-parameter tensors named ``optim.<group>.<index in group>.<key>``, the rest
  (hyper-parameters of each group, non-tensor state) as JSON.
- The gradient scaler (fp16): its state is a handful of numbers.
- The types of what ``state.json`` holds, and whether its position in the run agrees with itself
  (``state_problem``), checked before a checkpoint is chosen, so that a hand-edited one is refused like a
  damaged one (and the one before it tried).
"""

from __future__ import annotations

import math
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
    elif device.type == "mps":  # (Apple's GPU: one per machine, so one process)
        tensors["rng.mps.0"] = torch.mps.get_rng_state()
    return state, tensors


def restore_rng(state: dict, tensors: dict[str, torch.Tensor], dist: Dist, device: torch.device, seed: int) -> bool:
    """Set this rank's generators; False when the checkpoint has no stream for this rank or device
    (resumed with more processes, or CPU -> CUDA or MPS): that stream is then seeded as a fresh run seeds this rank
    (``seed + rank``: each rank its own dropout masks), and results will not match an uninterrupted run bit
    for bit."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    own = tensors.get(f"rng.torch.{dist.rank}")
    on_device = tensors.get(f"rng.{device.type}.{dist.rank}") if device.type in ("cuda", "mps") else None
    if own is None:
        torch.manual_seed(seed + dist.rank)  # (CUDA's and MPS's streams too)
    else:
        torch.set_rng_state(own)
    if on_device is not None and device.type == "mps":
        torch.mps.set_rng_state(on_device)
    elif on_device is not None:
        torch.cuda.set_rng_state(on_device, device)
    elif device.type == "mps" and own is not None:
        torch.mps.manual_seed(seed + dist.rank)
    elif device.type == "cuda" and own is not None:
        with torch.cuda.device(device):  # (manual_seed seeds the current device)
            torch.cuda.manual_seed(seed + dist.rank)
    return own is not None and (device.type not in ("cuda", "mps") or on_device is not None)


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


# --------------------------------------------------------------------------------------------------
# what state.json holds


def _count(value) -> bool:
    return type(value) is int and value >= 0


def _number(value) -> bool:
    return type(value) in (int, float)


def _metrics(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v) for k, v in value.items())


# The fields of every epoch record (``trainer.Run`` makes them; metrics.jsonl and state.json hold them).
EPOCH = {"epoch": ("a count", _count),  # a loss written null was not finite (--nonfinite authors goes on after it)
         "loss": ("a number or null", lambda v: v is None or _number(v)),
         "train_seconds": ("a number", _number), "eval_seconds": ("a number", _number),
         "steps": ("a count", _count), "valid": ("an object of numbers", _metrics)}
# The fields of state.json that a resume reads, the checkpoint's ``format`` and ``config`` aside (checked
# first); what ``rng``, ``optimizer`` and ``grad_scaler`` hold is checked when restored (``restoring``).
STATE = {"epoch": ("a count", _count), "step": ("a count or null", lambda v: v is None or _count(v)),
         "next_epoch": ("a count", _count), "next_step": ("a count", _count), "global_step": ("a count", _count),
         "train_seconds_in_epoch": ("a finite number", lambda v: _number(v) and math.isfinite(v)),
         "world_size": ("a count of at least 1", lambda v: _count(v) and v >= 1),
         "device": ("text", lambda v: isinstance(v, str)),
         "best_valid": ("an object of numbers", _metrics), "best_test": ("an object of numbers", _metrics),
         "resumed_from": ("a list of names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
         "epochs": ("a list", lambda v: isinstance(v, list)),
         "rng": ("an object", lambda v: isinstance(v, dict)), "optimizer": ("an object", lambda v: isinstance(v, dict)),
         "grad_scaler": ("an object", lambda v: isinstance(v, dict)),
         "early_stopping": ("an object", lambda v: isinstance(v, dict))}
STOPPING = {"best": ("a number or null", lambda v: v is None or _number(v)),
            "best_epoch": ("a whole number", lambda v: type(v) is int), "bad_epochs": ("a count", _count)}


def _fields(values: dict, expected: dict, prefix: str = "") -> str | None:
    for key, (what, fits) in expected.items():
        if key not in values:
            return f"no {prefix}{key}"
        if not fits(values[key]):
            return f"{prefix}{key}={short_repr(values[key])}: expected {what}"
    return None


def short_repr(value) -> str:
    """``repr(value)`` cut to 40 characters, for one-line messages about a hand-edited file."""
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def epoch_problem(record) -> str | None:
    """Why ``record`` is not an epoch record as a run writes it (None when it is)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    problem = _fields(record, EPOCH)
    if problem is None and "test" in record and not _metrics(record["test"]):
        problem = "test: expected an object of numbers"
    return problem


def state_problem(state: dict) -> str | None:
    """Why a checkpoint's ``state`` (its state.json) does not hold the fields a resume reads, of the types
    this version writes (None when it does): a hand edit, or another version's file."""
    if problem := _fields(state, STATE) or _fields(state["early_stopping"], STOPPING, "early_stopping."):
        return problem
    return next((f"epochs[{i}]: {wrong}" for i, record in enumerate(state["epochs"])
                 if (wrong := epoch_problem(record))), None) or position_problem(state)


def position_problem(state: dict) -> str | None:
    """Why the position fields of ``state`` (its fields of the right types) disagree with each other or
    with its epoch records (None when they agree). A run saves after ``step`` steps of ``epoch`` (null: at
    its end), with one record per finished epoch, and goes on from (``next_epoch``, ``next_step``)."""
    epoch, step, records = state["epoch"], state["step"], state["epochs"]
    finished, shown_step = step is None, "null" if step is None else short_repr(step)
    if step == 0:
        return "step=0: expected null (the epoch finished) or at least 1"
    if state["next_step"] != (0 if finished else step):
        return (f"next_step={short_repr(state['next_step'])}: expected "
                + ("0 (step=null: the epoch finished)" if finished else f"{shown_step}, as step={shown_step}"))
    if finished and epoch != len(records) - 1:
        return f"epoch={short_repr(epoch)}: expected {len(records) - 1}, the last of the {len(records)} epochs recorded"
    if not finished and epoch != len(records):
        return (f"epoch={short_repr(epoch)}: expected {len(records)}, the one after the {len(records)} epochs "
                f"recorded (step={shown_step})")
    if state["next_epoch"] != len(records):
        return (f"next_epoch={short_repr(state['next_epoch'])}: expected {len(records)} "
                f"(epoch={epoch}, step={shown_step})")
    if (wrong := next((i for i, record in enumerate(records) if record["epoch"] != i), None)) is not None:
        return f"epochs[{wrong}]: epoch={short_repr(records[wrong]['epoch'])}: expected {wrong}"
    if state["global_step"] != (done := sum(record["steps"] for record in records)):
        return f"global_step={short_repr(state['global_step'])}: expected {done}, the steps of the epochs recorded"
    cap = state["config"].get("max_steps_per_epoch")
    if not finished and type(cap) is int and 0 < cap <= step:
        return f"step={shown_step}: expected fewer than max_steps_per_epoch={cap} (an epoch's last step ends it)"
    if not -1 <= (best := state["early_stopping"]["best_epoch"]) < len(records):
        return f"early_stopping.best_epoch={short_repr(best)}: expected -1 or one of the {len(records)} epochs recorded"
    return None
