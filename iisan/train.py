"""One trainer for every method and both feeds.

Per epoch: training steps (timed alone, device synchronised), then full-ranking validation; the test
split is evaluated whenever validation HR@10 improves, and those weights are saved. Training stops once
HR@10 has not improved for more than ``patience`` epochs (authors: ``count > 10``). Results: one JSON
per run with the resolved config, metrics at the best-validation epoch, timings, versions and device.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .build import (
    amp_dtype,
    build_model,
    count_parameters,
    load_data,
    optimizer_groups,
    parameter_line,
    resolve_device,
)
from .cache import save_atomic
from .config import METHOD_NAMES, Config
from .evaluate import evaluate_split
from .feeds import ItemBatch, PixelSource, Prefetch, item_chunks
from .model import Recommender, TrainBatch
from .runinfo import device_name, git_commit, versions, write_json_atomic

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, out of memory); one-line message."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# batches


class CollateTrain:
    """Rows of user indices -> ``TrainBatch``. With ``dedup`` each distinct item (padding included) is
    encoded once; without it every slot is (static shapes for compiled steps)."""

    def __init__(self, sequences: np.ndarray, dedup: bool, pixels: PixelSource | None):
        self.sequences, self.dedup, self.pixels = sequences, dedup, pixels

    def __call__(self, users: np.ndarray) -> TrainBatch:
        seq = self.sequences[np.asarray(users)]  # (B, L+1)
        if self.dedup:
            ids, inverse = np.unique(seq, return_inverse=True)
        else:
            ids, inverse = seq.reshape(-1), np.arange(seq.size)
        pixels = None if self.pixels is None else self.pixels(ids)
        return TrainBatch(torch.from_numpy(seq), ItemBatch(torch.from_numpy(ids), pixels),
                          torch.from_numpy(inverse.reshape(-1)))


class TrainBatches:
    """One epoch of shuffled users in batches; the order depends only on (seed, epoch), so a run is
    reproducible and resumable at an epoch boundary."""

    def __init__(self, sequences: np.ndarray, batch_size: int, seed: int, epoch: int, collate: CollateTrain):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        self.order = torch.randperm(len(sequences), generator=generator).numpy()
        self.batch_size, self.collate = batch_size, collate

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            yield self.collate(self.order[start: start + self.batch_size])


def train_loader(sequences: np.ndarray, batch_size: int, seed: int, epoch: int, dedup: bool,
                 pixels: PixelSource | None = None):
    """The epoch's batches; when images are read, the next batches are prepared in a background thread."""
    batches = TrainBatches(sequences, batch_size, seed, epoch, CollateTrain(sequences, dedup, pixels))
    return Prefetch(batches) if pixels is not None else batches


# --------------------------------------------------------------------------------------------------
# the step


def make_train_step(model: Recommender, optimizer: torch.optim.Optimizer, amp: torch.dtype | None,
                    device: torch.device, compiled: str | bool = False):
    """``step(batch) -> loss`` (detached, on the device): forward, loss, backward, step, zero_grad.

    The benchmark reuses exactly this function. fp16 uses a GradScaler (authors' setting); bf16 needs none.
    ``compiled``: False/'off' (eager), 'cudagraph' (whole step captured, see graphs.py; needs static
    shapes and a capturable optimizer) or 'inductor' (torch.compile, mode reduce-overhead).
    """
    compiled = {True: "inductor", False: "off"}.get(compiled, compiled)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    def loss_of(seq, ids, pixels, inverse):
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None, cache_enabled=False):
            return model.calculate_loss(TrainBatch(seq, ItemBatch(ids, pixels), inverse))

    if compiled == "inductor":
        loss_of = torch.compile(loss_of, mode="reduce-overhead", dynamic=False)

    def step(batch: TrainBatch) -> torch.Tensor:
        if compiled == "inductor":
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_of(batch.seq, batch.items.ids, batch.items.pixels, batch.inverse)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    if compiled == "cudagraph":
        if scaler is not None:
            raise ValueError("cudagraph steps need amp=bf16 or none (fp16 loss scaling syncs with the host)")
        from .graphs import GraphedStep

        return GraphedStep(model, optimizer, loss_of, step)
    return step


def make_optimizer(model: Recommender, cfg: Config, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    # Adam with torch defaults, no weight decay (authors). Fused on CUDA: one kernel per group;
    # capturable keeps its step counter on the device so the update can live in a CUDA graph.
    cuda = device.type == "cuda"
    return torch.optim.Adam(optimizer_groups(model, cfg), fused=cuda, capturable=cuda and capturable)


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
               device: torch.device, amp: torch.dtype | None = None) -> torch.Tensor:
    """(N+1, D) embeddings of every item, computed once per evaluation (fp32 unless ``amp``)."""
    model.eval()
    rows = []
    for batch in item_chunks(np.arange(num_items + 1), chunk, pixels):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            rows.append(model.item_encoder(batch.to(device)).float())
    return torch.cat(rows)


@torch.no_grad()
def evaluate_model(model: Recommender, data, split: str, cfg: Config, device: torch.device,
                   pixels: PixelSource | None = None, table: torch.Tensor | None = None) -> dict[str, float]:
    model.eval()
    if table is None:
        table = item_table(model, data.num_items, cfg.encode_batch_size, pixels, device)
    inputs, targets, history = data.eval_split(split)
    return evaluate_split(model.user_vectors, table, inputs, targets, history, cfg.eval_batch_size,
                          cfg.rank_repeated_targets)


# --------------------------------------------------------------------------------------------------
# the loop


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model: torch.nn.Module, path: Path, cfg: Config, extra: dict | None = None) -> None:
    import json

    meta = {"config": json.dumps(cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_atomic(trainable_state(model), path, meta)


def load_weights(model: torch.nn.Module, path: str | Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise TrainingError(f"{path} lacks trained weights for {len(missing)} parameters (e.g. {missing[0]})")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            if name not in params:
                raise TrainingError(f"{path} holds {name!r}, which this model does not have")
            params[name].copy_(value)
    return state


def run_name(cfg: Config) -> str:
    return cfg.run_name or f"{cfg.method}-{cfg.feed}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config) -> dict:
    """Train, validate every epoch, test at the best-validation epoch. Returns the results dict."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    log.info("data: %d users, %d items, %d interactions", data.num_users, data.num_items, data.num_interactions)
    model, pixels = build_model(cfg, data, device)
    trainable, total = count_parameters(model)
    log.info("%s: %s", METHOD_NAMES[cfg.method], parameter_line(model))
    amp = amp_dtype(cfg, device)
    compiled = use_compile(cfg, device)
    optimizer = make_optimizer(model, cfg, device, capturable=compiled == "cudagraph")
    dedup = use_dedup(cfg, compiled)
    step = make_train_step(model, optimizer, amp, device, compiled)

    run_dir = Path(cfg.out_dir) / run_name(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    log.info("run folder %s (device %s, amp %s, compiled %s)", run_dir, device_name(device), amp, compiled)

    sequences = data.train_sequences()
    stopper = EarlyStopping(cfg.patience)
    best_valid: dict = {}
    best_test: dict = {}
    epochs_log = []
    global_step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loader = train_loader(sequences, cfg.batch_size, cfg.seed, epoch, dedup, pixels)
        n_steps = len(loader) if not cfg.max_steps_per_epoch else min(len(loader), cfg.max_steps_per_epoch)
        losses = torch.zeros(n_steps, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i, batch in enumerate(tqdm(loader, total=n_steps, desc=f"epoch {epoch}", leave=False,
                                       disable=None if cfg.progress else True)):
            if i >= n_steps:
                break
            try:
                losses[i] = step(batch.to(device))
            except torch.OutOfMemoryError as err:
                raise TrainingError(out_of_memory_message(err, cfg.batch_size, device)) from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - start
        losses = losses.cpu()
        bad = torch.nonzero(~torch.isfinite(losses)).flatten()
        if len(bad):
            first = global_step + int(bad[0])
            raise TrainingError(f"non-finite loss at step {first} (epoch {epoch}, steps {global_step}.."
                                f"{global_step + n_steps - 1}); last good weights: {run_dir / 'best.safetensors'}")
        global_step += n_steps

        start = time.perf_counter()
        table = item_table(model, data.num_items, cfg.encode_batch_size, pixels, device)
        valid = evaluate_model(model, data, "valid", cfg, device, table=table)
        improved = stopper.update(epoch, valid["hit@10"])
        if improved:
            best_valid = valid
            best_test = evaluate_model(model, data, "test", cfg, device, table=table)
            save_weights(model, run_dir / "best.safetensors", cfg, {"epoch": epoch, "valid": valid})
        eval_seconds = time.perf_counter() - start
        record = {"epoch": epoch, "loss": float(losses.mean()), "train_seconds": train_seconds,
                  "eval_seconds": eval_seconds, "steps": n_steps, "valid": valid}
        if improved:
            record["test"] = best_test
        epochs_log.append(record)
        log.info("epoch %3d | loss %.4f | train %.2f s | eval %.2f s | valid hit@10 %.4f ndcg@10 %.4f%s", epoch,
                 record["loss"], train_seconds, eval_seconds, valid["hit@10"], valid["ndcg@10"],
                 f" | test hit@10 {best_test['hit@10']:.4f} ndcg@10 {best_test['ndcg@10']:.4f} (best)"
                 if improved else f" | {stopper.bad_epochs} epoch(s) without improvement")
        if stopper.should_stop:
            log.info("early stop: valid hit@10 has not improved for %d epochs", stopper.bad_epochs)
            break

    train_times = [e["train_seconds"] for e in epochs_log]
    results = {
        "method": METHOD_NAMES[cfg.method],
        "feed": cfg.feed if cfg.method == "iisan" else "live",
        "best_epoch": stopper.best_epoch,
        "valid": best_valid,
        "test": best_test,
        "epochs": epochs_log,
        "timing": {
            "train_seconds_per_epoch": float(np.mean(train_times[1:] if len(train_times) > 1 else train_times)),
            "first_epoch_train_seconds": train_times[0],
            "eval_seconds_per_epoch": float(np.mean([e["eval_seconds"] for e in epochs_log])),
        },
        "step": {"compiled": compiled, "dedup_items": dedup, "amp": str(amp).replace("torch.", "") if amp else "fp32"},
        "parameters": {"trainable": trainable, "total": total},
        "peak_memory": peak_memory(device),
        "device": device_name(device),
        "versions": versions(),
        "git_commit": git_commit(),
        "config": cfg.to_dict(),
        "run_dir": str(run_dir),
    }
    write_json_atomic(run_dir / "results.json", results)
    log.info("best epoch %d | valid hit@10 %.4f ndcg@10 %.4f | test hit@10 %.4f ndcg@10 %.4f | %s",
             stopper.best_epoch, best_valid.get("hit@10", 0), best_valid.get("ndcg@10", 0),
             best_test.get("hit@10", 0), best_test.get("ndcg@10", 0), run_dir / "results.json")
    return results


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
