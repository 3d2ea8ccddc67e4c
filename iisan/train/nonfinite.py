"""A non-finite loss, explained before the run stops (big_vision's fail-fast, with the step range): the
message says which step went first, looks at what it can see from here (the learning rates, the item
states the failing batch fed to the model, the trained weights) and names only files that exist."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.batches import TrainBatch
from ..data.cache import cache_file
from ..errors import TrainingError
from ..model.recommender import IISANItemEncoder
from .progress import LOSS, SCORES

SHOWN = 3  # examples named per finding
log = logging.getLogger(__name__)


def lower(amp: torch.dtype | None) -> str:
    """What to try against an overflow: lower rates, and fp32 where the run computes in a half type."""
    return "lower the learning rates" + (f", or try --amp none (this run computes in {str(amp)[6:]})" if amp else "")


def nonfinite_loss(losses: torch.Tensor, epoch: int, first_step: int, n_steps: int, optimizer: torch.optim.Optimizer,
                   model: torch.nn.Module, batch_states: Callable[[int], list[str]], run_dir: Path,
                   last_good: Callable[[], str], amp: torch.dtype | None = None) -> str | None:
    """The one-line report of the first non-finite entry of ``losses`` (this epoch's per-step losses so
    far), or None when they are all finite. ``first_step``: the run's step count before this epoch;
    ``batch_states(step)``: what ``batch_states`` finds in the epoch's step ``step``; ``last_good()``: the
    newest complete checkpoint, or 'none yet'; ``amp``: the autocast dtype (None: fp32)."""
    bad = torch.nonzero(~torch.isfinite(losses)).flatten()
    if not len(bad):
        return None
    done, step = first_step, int(bad[0])
    findings = learning_rates(optimizer) + batch_states(step) + weights(model)
    if not findings:
        findings = ["the learning rates, the batch's item states and the weights are finite: the loss itself "
                    f"overflowed ({lower(amp)})"]
    best = run_dir / "best.safetensors"
    return "; ".join([f"{LOSS} at step {done + step} (epoch {epoch}, steps {done}..{done + n_steps - 1})",
                      *findings, f"last good checkpoint: {last_good()}",
                      f"best weights: {best if best.is_file() else 'none yet'}"])


def nonfinite_scores(valid: dict[str, float], epoch: int, model: torch.nn.Module, run_dir: Path,
                     last_good: Callable[[], str], amp: torch.dtype | None = None) -> str | None:
    """The one-line report of epoch ``epoch``'s validation metrics that are not finite (a NaN target score:
    the user or item vectors overflowed, weights finite or not), or None when they are all finite."""
    bad = [f"{name} {value}" for name, value in valid.items() if not math.isfinite(value)]
    if not bad:
        return None
    findings = weights(model) or [f"the trained weights are finite: the model's scores overflowed ({lower(amp)})"]
    best = run_dir / "best.safetensors"
    return "; ".join([f"{SCORES} after epoch {epoch} ({', '.join(bad[:SHOWN])})", *findings,
                      f"last good checkpoint: {last_good()}",
                      f"best weights: {best if best.is_file() else 'none yet'}"])


def ends_training(losses: torch.Tensor, mode: str) -> bool:
    """Whether ``losses`` hold one that ends training under ``--nonfinite mode`` (``after_nonfinite``):
    any non-finite loss, or under ``authors`` a NaN."""
    bad = torch.isnan(losses) if mode == "authors" else ~torch.isfinite(losses)
    return bool(bad.any())


def after_nonfinite(problem: str, nan: bool, mode: str, best_epoch: int) -> str:
    """What a run does once ``problem`` (``nonfinite_loss``'s or ``nonfinite_scores``' report; ``nan``: of a
    NaN, else only infinite values) is found: '' to go on, else why training ends. ``fail`` raises it.
    ``authors``, as the authors' code, which checks its running loss sum each step: a NaN ends training with
    the best epoch so far as the result (none yet: the run fails), an infinite loss alone does not stop it."""
    if mode != "authors":
        raise TrainingError(problem)
    if not nan:
        log.warning("%s; --nonfinite authors: an infinite loss does not stop the run", problem)
        return ""
    if best_epoch < 0:
        raise TrainingError(f"{problem}; --nonfinite authors: no epoch had finished before it, so there is no result")
    reason = f"{problem}; --nonfinite authors: training ends here and the best epoch so far ({best_epoch}) is the " \
             "result"
    log.warning("%s", reason)
    return reason


def learning_rates(optimizer: torch.optim.Optimizer) -> list[str]:
    found = []
    for g, group in enumerate(optimizer.param_groups):
        lr = float(group["lr"])
        if not math.isfinite(lr) or lr <= 0:
            found.append(f"the learning rate of group {group.get('name', g)!r} is {lr}")
    return found


def batch_states(model: torch.nn.Module, batch: Callable[[], TrainBatch], device: torch.device,
                 item_ids: list[str], cache_dir: str | Path | None) -> list[str]:
    """Check the states the feed gives the items of ``batch()`` (the failing step's host batch, rebuilt):
    cache rows read from ``cache_dir``, or (None) what the live encoders compute."""
    encoder = model.item_encoder
    if not isinstance(encoder, IISANItemEncoder):  # the baselines encode end to end: no states to check apart
        return []
    feed = encoder.states
    batch = batch()
    with torch.no_grad():
        states = feed(batch.items.to(device))
    found = []
    for m, table in states.items():
        rows = ~torch.isfinite(table.flatten(1)).all(1)  # (U,)
        if rows.any():
            ids = batch.items.ids[rows.cpu()].tolist()
            names = ", ".join(repr(item_ids[i]) for i in ids[:SHOWN])
            source = cache_file(cache_dir, m) if cache_dir is not None else f"the live {m} encoder"
            found.append(f"{len(ids)} item(s) of that batch have non-finite {m} states (e.g. {names}; from {source})")
    return found


def weights(model: torch.nn.Module) -> list[str]:
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if not bad:
        return []
    return [f"{len(bad)} trained weight tensor(s) now hold non-finite values (e.g. {', '.join(bad[:SHOWN])}): "
            "the run diverged; lower the learning rates"]
