"""One trainer for every method and both feeds: ``train(cfg)`` and its parts.

Per epoch: training steps (timed alone, device synchronised), then full-ranking validation; the test
split is evaluated whenever validation HR@10 improves, and those weights are saved. Training stops once
HR@10 has not improved for more than ``patience`` epochs (authors: ``count > 10``). Results: one JSON
per run with the resolved config, metrics at the best-validation epoch, timings, versions and device.
The loop itself, with its checkpoints and resume, is ``loop.Run``; data parallelism under torchrun is
``distributed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .build import optimizer_groups
from .cache import save_atomic
from .config import Config
from .distributed import SINGLE, Dist, chunk_block, gather_rows
from .evaluate import metrics_from_ranks, split_ranks
from .feeds import ItemBatch, PixelSource, item_chunks
from .interrupt import RunInterrupted, StopRequests  # noqa: F401  (RunInterrupted: raised by train)
from .model import Recommender, TrainBatch
from .runinfo import device_name

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); one-line message."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device). The order of users needs no global seed
    (``batches.train_loader``). ``deterministic`` also asks for deterministic CUDA kernels: without it, kernels
    that accumulate with atomics (e.g. the backward of the item-embedding gather) make GPU runs differ in
    the last bits; CPU runs are bit-exact either way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------------
# the step


def make_train_step(model: Recommender, optimizer: torch.optim.Optimizer, amp: torch.dtype | None,
                    device: torch.device, compiled: str | bool = False):
    """``step(batch) -> loss`` (detached, on the device): forward, loss, backward, step, zero_grad.

    ``model`` is a ``Recommender`` or the DistributedDataParallel wrapping one. The benchmark reuses
    exactly this function. fp16 uses a GradScaler (authors' setting); bf16 needs none.
    ``compiled``: False/'off' (eager), 'cudagraph' (whole step captured, see graphs.py; needs static
    shapes and a capturable optimizer) or 'inductor' (torch.compile, mode reduce-overhead).
    """
    compiled = {True: "inductor", False: "off"}.get(compiled, compiled)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    def loss_of(seq, ids, pixels, inverse, real=None):
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False):
            # Through ``forward`` (= calculate_loss), so a DistributedDataParallel model syncs gradients.
            return model(TrainBatch(seq, ItemBatch(ids, pixels, real), inverse))

    if compiled == "inductor":
        loss_of = torch.compile(loss_of, mode="reduce-overhead", dynamic=False)

    def step(batch: TrainBatch) -> torch.Tensor:
        if compiled == "inductor":
            torch.compiler.cudagraph_mark_step_begin()
        # Compiled steps need static shapes, which the (variable) number of real items is not.
        real = batch.items.real if compiled == "off" else None
        loss = loss_of(batch.seq, batch.items.ids, batch.items.pixels, batch.inverse, real)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    step.scaler = scaler  # checkpoints save and restore its state
    if compiled == "cudagraph":
        if scaler is not None:
            raise ValueError("cudagraph steps need amp=bf16 or none (fp16 loss scaling syncs with the host)")
        from .graphs import GraphedStep

        return GraphedStep(model, optimizer, loss_of, step)
    return step


def make_optimizer(model: Recommender, cfg: Config, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    # Adam with torch defaults, no weight decay (authors). Fused (one kernel per group) on CUDA and on
    # the CPU, where it is ~3x faster than the per-parameter loop for IISAN's ~130 small tensors;
    # capturable keeps its step counter on the device so the update can live in a CUDA graph.
    cuda = device.type == "cuda"
    return torch.optim.Adam(optimizer_groups(model, cfg), fused=True, capturable=cuda and capturable)


def use_compile(cfg: Config, device: torch.device) -> str:
    """'off', 'cudagraph' or 'inductor'. auto: CUDA graphs for cached IISAN on a GPU, else eager."""
    if cfg.compile == "auto":
        graphable = device.type == "cuda" and cfg.method == "iisan" and cfg.feed == "cached" and cfg.amp != "fp16"
        return "cudagraph" if graphable else "off"
    if cfg.compile == "cudagraph" and (device.type != "cuda" or cfg.method != "iisan" or cfg.feed != "cached"):
        raise TrainingError("compile=cudagraph needs a CUDA device and cached IISAN (static shapes)")
    return cfg.compile


def use_dedup(cfg: Config, compiled: str) -> bool:
    """Encode each distinct item once, unless the step is compiled (static shapes)."""
    return compiled == "off" if cfg.dedup_items == "auto" else cfg.dedup_items == "on"


def out_of_memory_message(err: Exception, batch_size: int, device: torch.device) -> str:
    wanted = re.search(r"Tried to allocate ([\d.]+ [KMG]i?B)", str(err))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0
    return (f"batch_size={batch_size} does not fit on {device_name(device)}: the step needed "
            f"{wanted.group(1) if wanted else 'more'} on top of {held:.2f} GiB already allocated "
            f"(device has {total:.1f} GiB); lower --batch-size")


# --------------------------------------------------------------------------------------------------
# evaluation of a model


@torch.no_grad()
def item_table(model: Recommender, num_items: int, chunk: int, pixels: PixelSource | None,
               device: torch.device, amp: torch.dtype | None = None,
               ids: np.ndarray | None = None) -> torch.Tensor:
    """(N+1, D) embeddings of every item (or of the items ``ids``), computed once per evaluation (fp32
    unless ``amp``)."""
    model.eval()
    rows = []
    for batch in item_chunks(np.arange(num_items + 1) if ids is None else ids, chunk, pixels):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            rows.append(model.item_encoder(batch.to(device)).float())
    return torch.cat(rows)


@torch.no_grad()
def shared_item_table(model: Recommender, num_items: int, cfg: Config, pixels: PixelSource | None,
                      device: torch.device, dist: Dist = SINGLE) -> torch.Tensor:
    """``item_table`` with the work split across ranks in whole chunks; every rank gets the whole table."""
    if not dist.enabled:
        return item_table(model, num_items, cfg.encode_batch_size, pixels, device)
    lo, hi = chunk_block(num_items + 1, cfg.encode_batch_size, dist)
    part = item_table(model, num_items, cfg.encode_batch_size, pixels, device,
                      ids=np.arange(lo, hi)) if hi > lo else torch.zeros(0, cfg.embedding_dim, device=device)
    return gather_rows(part, dist)


@torch.no_grad()
def evaluate_ranks(model: Recommender, data, split: str, cfg: Config, device: torch.device,
                   pixels: PixelSource | None = None, table: torch.Tensor | None = None,
                   dist: Dist = SINGLE) -> torch.Tensor:
    """(users,) 1-based target ranks in user order. Under torchrun each rank ranks a block of whole
    evaluation chunks and the blocks are gathered in order: every user exactly once, and the same
    numbers as one process computes."""
    model.eval()
    if table is None:
        table = shared_item_table(model, data.num_items, cfg, pixels, device, dist)
    inputs, targets, history = data.eval_split(split)
    chunk = cfg.eval_batch_size or (2048 if device.type == "cuda" else 128)
    lo, hi = chunk_block(len(targets), chunk, dist)
    ranks = split_ranks(model.user_vectors, table, inputs[lo:hi], targets[lo:hi], history[lo:hi],
                        chunk, cfg.rank_repeated_targets)
    ranks = gather_rows(ranks.to(table.device), dist).cpu()
    if len(ranks) != len(targets):
        raise RuntimeError(f"evaluation gathered {len(ranks)} ranks for {len(targets)} users")
    return ranks


def evaluate_model(model: Recommender, data, split: str, cfg: Config, device: torch.device,
                   pixels: PixelSource | None = None, table: torch.Tensor | None = None,
                   dist: Dist = SINGLE) -> dict[str, float]:
    return metrics_from_ranks(evaluate_ranks(model, data, split, cfg, device, pixels, table, dist))


# --------------------------------------------------------------------------------------------------
# pieces of the loop (the loop itself: ``loop.py``)


@dataclass
class EarlyStopping:
    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)

    def update(self, epoch: int, score: float) -> bool:
        """True if ``score`` is a new best."""
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > self.patience

    def state(self) -> dict:
        return {"best": None if self.best == -math.inf else self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}

    def load(self, state: dict) -> None:
        self.best = -math.inf if state["best"] is None else state["best"]
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model: torch.nn.Module, path: Path, cfg: Config, extra: dict | None = None) -> None:
    meta = {"config": json.dumps(cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_atomic(trainable_state(model), path, meta)


def load_weights(model: torch.nn.Module, path: str | Path) -> dict:
    from safetensors.torch import load_file

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


def run_name(cfg: Config) -> str:
    smoke = "-smoke" if cfg.smoke else ""
    return cfg.run_name or f"{cfg.method}-{cfg.feed}{smoke}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config) -> dict:
    """Train, validate every epoch, test at the best-validation epoch. Returns the results dict.

    Checkpoints every epoch and resumes from the run folder's newest intact one (``checkpoint.py``);
    Ctrl-C saves and raises ``RunInterrupted``. Under torchrun: data-parallel (``distributed.py``)."""
    from .loop import Run

    deterministic = torch.are_deterministic_algorithms_enabled()
    seed_everything(cfg.seed, cfg.deterministic)
    dist, device, created = distributed.setup(cfg.device)
    try:
        with StopRequests(escalate=not dist.enabled) as stop:
            run = Run(cfg, dist, device, stop)
            try:
                return run.run()
            finally:
                run.close()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # the setting is global: leave it as found
        if created:
            distributed.teardown()


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    import psutil

    return {"peak_rss_gib": _peak_rss() / 2**30, "current_rss_gib": psutil.Process().memory_info().rss / 2**30}


def _peak_rss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
