"""The training step, the same for every method and both feeds: forward, loss, backward, optimizer
step, zero_grad (``make_train_step``), the optimizer with the authors' learning-rate groups, and the
choices of how a step runs (eager, one CUDA graph, torch.compile; each distinct item once or every
slot). The trainer (``trainer.py``) and the benchmark both run exactly this step.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.batches import ItemBatch, TrainBatch
from ..data.shapes import ShapeBuckets
from ..devices import amp_dtype, device_name
from ..errors import TrainingError
from ..model.inputs import EncodedItems
from ..model.recommender import Recommender
from .graphs import GraphedStep


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device). The order of users needs no global seed
    (``batches.train_loader``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """With ``enabled``, deterministic CUDA kernels inside the block: without them, kernels that accumulate
    with atomics (e.g. the backward of the item-embedding gather) make GPU runs differ in the last bits;
    CPU runs are bit-exact either way. The switches are global, so all of them are put back afterwards
    (a sweep's later points, a benchmark in the same process)."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


class TrainStep:
    """``step(batch) -> loss`` (detached, on the device): forward, loss, backward, optimizer step,
    zero_grad, in that order.

    ``model`` is a ``Recommender`` or the DistributedDataParallel wrapping one. fp16 uses a GradScaler
    (authors' setting; ``scaler``, which checkpoints save and restore); bf16 needs none. ``mode``: 'off'
    (eager) or 'inductor' (torch.compile, mode reduce-overhead; static shapes). A whole-step CUDA graph
    is ``graphs.GraphedStep`` around this step (``make_train_step``).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: torch.dtype | None,
                 device: torch.device, mode: str = "off"):
        self.model, self.optimizer, self.amp, self.device, self.mode = model, optimizer, amp, device, mode
        self.scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        self.loss_of = self.loss
        if mode == "inductor":
            self.loss_of = torch.compile(self.loss, mode="reduce-overhead", dynamic=False)

    def loss(self, seq, ids, pixels, inverse, real=None, title_columns=None, encode_all=False) -> torch.Tensor:
        """The loss of one batch given as tensors (what a compiled or graphed step captures)."""
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                            cache_enabled=False):
            # Through ``forward`` (= calculate_loss), so a DistributedDataParallel model syncs gradients.
            return self.model(TrainBatch(seq, ItemBatch(ids, pixels, real, title_columns, encode_all), inverse))

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        if self.mode == "inductor":
            torch.compiler.cudagraph_mark_step_begin()
        items = batch.items
        # Compiled steps need static shapes, which the (variable) number of real items is not.
        real = items.real if self.mode == "off" else None
        loss = self.loss_of(batch.seq, items.ids, items.pixels, batch.inverse, real, items.title_columns,
                            items.encode_all)
        # No gradient clipping, no scheduler: the authors' step has neither.
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, amp: torch.dtype | None,
                    device: torch.device, compiled: str = "off") -> TrainStep | GraphedStep:
    """The step for ``compiled``: 'off' (eager), 'inductor' (torch.compile) or 'cudagraph' (the whole
    step captured once and replayed, see graphs.py; needs static shapes and a capturable optimizer).
    Either way the result has ``scaler`` and ``mode`` ('off (cudagraph capture failed)' when a graphed
    step fell back to eager)."""
    if compiled == "cudagraph":
        if amp == torch.float16:
            raise ValueError("cudagraph steps need amp=bf16 or none (fp16 loss scaling syncs with the host)")
        eager = TrainStep(model, optimizer, amp, device)
        # DDP does bookkeeping in its first 10 iterations that a capture cannot hold (PyTorch's notes on
        # CUDA graphs with DDP: at least 11 eager iterations before capturing)
        warmup = 11 if isinstance(model, torch.nn.parallel.DistributedDataParallel) else 3
        return GraphedStep(model, optimizer, eager.loss, eager, warmup=warmup)
    return TrainStep(model, optimizer, amp, device, compiled)


def make_optimizer(model: Recommender, cfg: Config, device: torch.device,
                   capturable: bool = False) -> torch.optim.Optimizer:
    # Adam with torch defaults, no weight decay (authors). Fused (one kernel per group) on CUDA and on
    # the CPU, where it is ~3x faster than the per-parameter loop for IISAN's ~130 small tensors;
    # capturable keeps its step counter on the device so the update can live in a CUDA graph.
    cuda = device.type == "cuda"
    return torch.optim.Adam(optimizer_groups(model, cfg), fused=True, capturable=cuda and capturable)


LR_OF_GROUP = {
    "recsys": "lr",
    "image_net": "lr_image",
    "text_encoder": "lr_text",
    "adapter_image": "lr_adapter_image",
    "adapter_text": "lr_adapter_text",
}


def optimizer_groups(model: Recommender, cfg: Config) -> list[dict]:
    """Adam parameter groups with the authors' learning rates; every trainable parameter exactly once."""
    groups = []
    seen: set[int] = set()
    for name, params in model.param_groups().items():
        params = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"name": name, "params": params, "lr": getattr(cfg, LR_OF_GROUP[name])})
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if stray:
        raise RuntimeError(f"trainable parameters in no learning-rate group: {', '.join(stray[:5])}")
    return groups


def trained_by_rate(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """How many trainable parameters each learning-rate key (``lr``, ``lr_text``, ...) sets the rate of: the
    keys a run trains with (results.json's ``parameters.by_rate``; the results table shows no other)."""
    return {LR_OF_GROUP[group["name"]]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}


def use_compile(cfg: Config, device: torch.device) -> str:
    """'off', 'cudagraph' or 'inductor'. auto: CUDA graphs for cached IISAN on a GPU, else eager."""
    if cfg.compile == "auto":
        graphable = device.type == "cuda" and cfg.cached and cfg.amp != "fp16"
        return "cudagraph" if graphable else "off"
    if cfg.compile == "cudagraph" and (device.type != "cuda" or not cfg.cached):
        raise TrainingError("compile=cudagraph needs a CUDA device and cached IISAN (static shapes)")
    return cfg.compile


def describe_step(step, model: Recommender, encoding: str, buckets: ShapeBuckets | None,
                  amp: torch.dtype | None) -> dict:
    """How steps ran (results.json's ``step``): ``step.mode`` says whether a CUDA graph really ran; a cached
    run also says what precision its cache is stored in (what ``cache_dtype`` 'auto' came to)."""
    stored = model.cache_dtypes()
    return {"compiled": step.mode, "item_encoding": encoding, "static_shapes": buckets is not None,
            "amp": str(amp).replace("torch.", "") if amp else "fp32", **({"cache_dtypes": stored} if stored else {})}


ENCODING_OF = {"on": "items", "slots": "slots", "off": "all"}  # --dedup-items -> ``CollateTrain``'s encoding


def item_encoding(cfg: Config, compiled: str, model: Recommender) -> str:
    """How a step runs the item tower over a batch (``CollateTrain``): 'items', 'slots' or 'all'. auto: all
    slots for a compiled step (static shapes); each slot that holds an item where training runs dropout
    inside an encoder, so that each slot gets its own mask, as in the authors' code (the baselines' trained
    BERT, IISAN's frozen one under ``text_encoder_dropout``); else each distinct item once."""
    if cfg.dedup_items != "auto":
        return ENCODING_OF[cfg.dedup_items]
    if compiled != "off":
        return "all"
    return "slots" if encoders_drop_out(model) else "items"


def encoders_drop_out(model: Recommender) -> bool:
    """Whether a training step runs a Dropout of p > 0 inside one of the item tower's encoders."""
    was = model.training
    model.train()
    try:
        return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for inputs in model.item_encoder.modules()
                   if isinstance(inputs, EncodedItems) for m in inputs.encoders.modules())
    finally:
        model.train(was)


def shape_buckets(cfg: Config, model: Recommender) -> ShapeBuckets | None:
    """Static shapes of a live step (``cfg.static_shapes``: uncached IISAN and the baselines), or None.
    Cached IISAN takes none: on a GPU its step is already static (every slot, one CUDA graph), and on a
    CPU padding would only add work. The ID baseline reads no content: its rows cost nothing to pad away."""
    if not cfg.static_shapes or cfg.method == "id" or cfg.cached:
        return None
    return ShapeBuckets(cfg.item_bucket_growth, cfg.title_multiple, model.item_encoder.title_lengths(),
                        cfg.title_tokens)


def batch_layout(cfg: Config, compiled: str, model: Recommender) -> tuple[str, ShapeBuckets | None]:
    """How a step's batches are made: which items the tower runs on (``item_encoding``), and static shapes
    or not."""
    return item_encoding(cfg, compiled, model), shape_buckets(cfg, model)


@dataclass(frozen=True)
class StepPlan:
    """How a run's steps run, decided once for the trainer and the benchmark alike (``plan_step``)."""

    amp: torch.dtype | None  # autocast dtype, None for fp32
    compiled: str  # 'off', 'cudagraph' or 'inductor' (``use_compile``)
    encoding: str  # 'items', 'slots' or 'all' (``item_encoding``)
    buckets: ShapeBuckets | None  # static shapes of live steps (``shape_buckets``)


def plan_step(cfg: Config, device: torch.device, model: Recommender, processes: int = 1) -> StepPlan:
    """``compile=auto`` compiles single-process runs only: CUDA graphs around DDP's gradient hooks are not
    checked here; ``--compile cudagraph|inductor`` asks for it under torchrun anyway."""
    compiled = "off" if processes > 1 and cfg.compile == "auto" else use_compile(cfg, device)
    return StepPlan(amp_dtype(cfg.amp, device), compiled, *batch_layout(cfg, compiled, model))


def out_of_memory_message(err: Exception, batch_size: int, device: torch.device) -> str:
    wanted = re.search(r"Tried to allocate ([\d.]+ [KMG]i?B)", str(err))
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
    held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0
    return (f"batch_size={batch_size} does not fit on {device_name(device)}: the step needed "
            f"{wanted.group(1) if wanted else 'more'} on top of {held:.2f} GiB already allocated "
            f"(device has {total:.1f} GiB); lower --batch-size")
