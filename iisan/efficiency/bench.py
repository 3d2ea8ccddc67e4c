"""Efficiency measurement shared by the benchmark scripts: the trainer's exact step, timed step by step
after a warm-up (median and p90; an epoch is the median times its steps), or a real epoch end to end;
the padding static shapes add (rows and FLOPs); peak memory; parameters; TPME; the cache build and the
full-ranking evaluation of every user.

Each measurement runs in a fresh (spawned) process, so peak memory (GPU allocator peaks or, on CPU,
the process's own resident high-water mark: ``memory.peak_memory``), reset after warm-up, belongs to that
method alone and no compiled state leaks across.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..config import Config
from ..data.batches import CollateTrain, PixelSource, TrainBatch, epoch_batches, without_padding_rows
from ..data.cache import cache_file, read_metadata
from ..data.cache_build import discard_partial_build
from ..data.epochs import epoch_order
from ..data.interactions import SeqRecData
from ..data.run_data import load_data
from ..data.shapes import ROW_MULTIPLE, ShapeBuckets
from ..devices import device_name, resolve_device, sync
from ..errors import ConfigError
from ..evaluate import eval_chunk, evaluate_model
from ..files import atomic_path
from ..memory import peak_memory, reset_peak_memory
from ..methods import METHOD_NAMES
from ..model.build import build_model, count_parameters
from ..model.caching import build_cache_from_config
from ..train.graphs import GraphedStep
from ..train.parts import build_training
from ..train.step import TrainStep, make_train_step
from .flops import StepFlops, shape_key
from .rows import memory_gib
from .timing import StepClock, summary, timed_each

log = logging.getLogger(__name__)

ENCODES = {"items": "distinct items", "slots": "every slot with an item", "all": "every slot"}  # layout_summary
TPME_WEIGHTS = {"time": 0.45, "params": 0.1, "memory": 0.45}
OWN = object()  # ``TrainingSetup.host_batches``' default: the setup's own static-shape policy


@dataclass
class TrainingSetup:
    """What measuring (or profiling) a method's training step needs, built exactly as the trainer does."""

    cfg: Config
    data: SeqRecData
    model: torch.nn.Module
    pixels: PixelSource | None
    step: TrainStep | GraphedStep  # ``train.step.make_train_step``'s: batch -> loss
    device: torch.device
    amp: torch.dtype | None
    compiled: str
    collate: CollateTrain  # the batch layout, the trainer's (``train.parts.build_training``)
    # per batch yielded by ``full_batches``, counted on the host: (items, rows, title columns, shape key)
    layouts: list[tuple] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return self.cfg.cached

    @property
    def encoding(self) -> str:
        return self.collate.encoding

    @property
    def buckets(self) -> ShapeBuckets | None:
        return self.collate.buckets

    def host_batches(self, buckets=OWN):
        """Endless full-size host batches, epoch after epoch (every timed step has the measured batch size).
        ``buckets``: another static-shape policy than the setup's (None: none; the diagnosis compares)."""
        cfg, epoch = self.cfg, 0
        collate = self.collate if buckets is OWN else replace(self.collate, buckets=buckets)
        if cfg.batch_size > len(collate.sequences):  # no full batch ever: the loop below would never yield
            raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(collate.sequences):,} users of "
                              f"{cfg.users}; a timed step needs a full batch: choose at most {len(collate.sequences)}")
        while True:
            order = epoch_order(len(collate.sequences), cfg.order_seed, epoch)
            for batch in epoch_batches(order, cfg.batch_size, collate):
                if len(batch.seq) == cfg.batch_size:
                    yield batch
            epoch += 1

    def full_batches(self):
        """``host_batches`` on the device, each one's layout logged."""
        for batch in self.host_batches():
            self.layouts.append(layout(batch, self.cached))
            yield batch.to(self.device)


def layout(batch: TrainBatch, cached: bool) -> tuple:
    """(real items, rows, title columns, shape key, distinct real items and rows) of a host batch. Rows: those
    the item encoders run on, padding rows included; for cached IISAN, which runs no encoder, the rows
    gathered for the SAN. The last two: those of the towers that take each distinct item once (None: none)."""
    items, distinct = batch.items, batch.items.distinct
    rows = len(items.ids) if cached else items.encoded_rows()
    by_item = (None, None) if distinct is None else (len(distinct.real), distinct.encoded_rows())
    return len(items.real), rows, items.title_columns, shape_key(batch), *by_item


def training_setup(cfg: Config) -> TrainingSetup:
    """The model, optimizer, batch layout and step of ``cfg``, in training mode, built as the trainer builds
    them (``train.parts.build_training``, a single process)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    parts = build_training(cfg, data, device)
    model, plan = parts.model, parts.plan
    step = make_train_step(model, parts.optimizer, plan.amp, device, plan.compiled)
    model.train()
    return TrainingSetup(cfg, data, model, parts.pixels, step, device, plan.amp, plan.compiled, parts.collate)


def padding_flops(setup: TrainingSetup, warmup: int, steps: int) -> dict:
    """Model FLOPs of the timed steps as run, and of the same batches without padding rows (titles cut
    the same): the replayed stream is deterministic, so these are the timed batches. Counted once per
    batch shape (``StepFlops``); ``steps`` may be the first few timed batches only (a sample). Cached
    IISAN adds no padding rows of its own (on a GPU it gathers every slot): its FLOPs are as run only."""
    as_run, useful = StepFlops(setup), StepFlops(setup)
    replay = setup.host_batches()
    for _ in range(warmup):
        next(replay)
    counts = []
    for _ in range(steps):
        batch = next(replay)
        flops = as_run(batch)
        counts.append((flops, useful(without_padding_rows(batch)) if batch.items.encode_all else flops))
    flops, needed = np.mean(counts, axis=0)
    if setup.cached:
        return {"flops_per_step": float(flops), "useful_flops_per_step": None, "padding_overhead_flops": None,
                "flop_batches": steps}
    return {"flops_per_step": float(flops), "useful_flops_per_step": float(needed),
            "padding_overhead_flops": float(flops / needed - 1) if needed else 0.0, "flop_batches": steps}


def layout_summary(setup: TrainingSetup) -> dict:
    """Items, rows and title columns per step over the logged batches, and the static-shape settings."""
    items, rows, columns, keys, distinct, distinct_rows = zip(*setup.layouts)
    cfg, buckets, per_item = setup.cfg, setup.buckets, setup.collate.per_item
    cut = [c for c in columns if c is not None]
    by_item = {}
    if per_item:  # e.g. the ViT beside a baseline's BERT: the same images, each once
        by_item = {"towers_by_item": list(per_item), "distinct_items_per_step": float(np.mean(distinct)),
                   "distinct_rows_per_step": float(np.mean(distinct_rows)),
                   "distinct_padding_overhead_items": float(np.sum(distinct_rows) / np.sum(distinct) - 1)}
    return {
        "encodes": ENCODES[setup.encoding] + (f"; {', '.join(per_item)}: distinct items" if per_item else ""),
        **by_item,
        "static_shapes": buckets is not None,
        "buckets": None if buckets is None else {"item_bucket_growth": buckets.growth, "row_multiple": ROW_MULTIPLE,
                                                 "title_multiple": buckets.title_multiple,
                                                 "title_tokens": cfg.title_tokens},
        # non-padding items a step encodes: distinct ones, or every slot that holds one
        "items_per_step": float(np.mean(items)),
        "encoded_rows_per_step": float(np.mean(rows)),  # padding rows included (``layout``)
        "padding_rows_per_step": float(np.mean(rows) - np.mean(items)),
        "padding_overhead_items": float(np.sum(rows) / np.sum(items) - 1),
        "title_columns_per_step": float(np.mean(cut)) if cut else None,
        "distinct_shapes": len(set(keys)),
    }


def timed_window(setup: TrainingSetup, stream, steps: int) -> tuple[list[float], float, list[torch.Tensor]]:
    """``steps`` steps on the stream's batches: per-step seconds (``StepClock``), wall seconds, losses."""
    clock, losses = StepClock(setup.device), []
    start = time.perf_counter()
    clock.mark()
    for _ in range(steps):
        losses.append(setup.step(next(stream)))
        clock.mark()
    durations = clock.durations()  # waits for the device
    return durations, time.perf_counter() - start, losses


def measure_training(cfg: Config, warmup: int = 10, steps: int = 50, full_epoch: bool = False,
                     flop_batches: int = 0) -> dict:
    """A method's step timed one by one over ``steps`` full batches after ``warmup`` ones: median and p90
    seconds, an epoch as median x steps per epoch; with ``full_epoch`` also a real epoch end to end. Peak
    memory, items, padding and FLOPs per step (FLOPs over the first ``flop_batches`` timed batches, or
    all of them: 0), parameters."""
    setup = training_setup(cfg)
    data, model, device, amp = setup.data, setup.model, setup.device, setup.amp
    steps_per_epoch = math.ceil(data.num_users / cfg.batch_size)
    stream = setup.full_batches()
    for _ in range(warmup):
        setup.step(next(stream))
    sync(device)
    reset_at = "the warm-up's end" if reset_peak_memory(device) else None  # as the GPU's peaks: after warm-up
    setup.layouts.clear()
    durations, wall, losses = timed_window(setup, stream, steps)
    memory = peak_memory(device, reset_at)  # before counting FLOPs, which runs more passes
    times = summary(durations)
    row = {
        "method": METHOD_NAMES[cfg.method],
        "feed": cfg.feed,
        "batch_size": cfg.batch_size,
        "seconds_per_step": times["median"],
        "p90_seconds_per_step": times["p90"],
        "step_seconds": times,
        "wall_seconds_per_step": wall / steps,  # the timed window's wall time per step (mean)
        "steps_per_epoch": steps_per_epoch,
        "epoch_seconds": times["median"] * steps_per_epoch,
        "timed_steps": steps,
        "warmup_steps": warmup,
        **layout_summary(setup),
        # model FLOPs (matmul, conv, attention; forward and backward) per timed step, as run and without
        # padding rows, and the rate the device sustained on them (at the median step time)
        **padding_flops(setup, warmup, min(steps, flop_batches) if flop_batches > 0 else steps),
        "compiled": setup.step.mode,  # 'off (cudagraph capture failed)' when a graph could not be captured
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
        "memory": memory,
        "device": device_name(device),
        "users": data.num_users,
        "items": data.num_items,
    }
    row["model_tflops_per_second"] = row["flops_per_step"] / times["median"] / 1e12
    row["trainable_params"], row["total_params"] = count_parameters(model)
    if full_epoch:
        row.update(measure_full_epoch(setup, epoch=1))
    return row


def measure_full_epoch(setup: TrainingSetup, epoch: int) -> dict:
    """One real epoch end to end, as the trainer runs it: its own loader (image pipeline started cold,
    batches read in the background), every batch including the last, smaller one."""
    cfg, device = setup.cfg, setup.device
    sync(device)
    start = time.perf_counter()
    loader = epoch_batches(epoch_order(len(setup.collate.sequences), cfg.order_seed, epoch), cfg.batch_size,
                           setup.collate)
    done = 0
    for batch in loader:
        setup.step(batch.to(device))
        done += 1
    sync(device)
    return {"full_epoch_seconds": time.perf_counter() - start, "full_epoch_steps": done}


def measure_cache_build(cfg: Config) -> dict:
    """Seconds to run both encoders once over every item and write the cache (in ``cfg.cache_dtype``)."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.init()  # a first CUDA call naming an index (cuda:0) needs the context up
    reset_at = "the build's start" if reset_peak_memory(device) else None
    # the benchmark's own work folder, rebuilt to be timed whole: not resumed from a build that was cut
    if discard_partial_build(cfg.cache_dir):
        log.info("discarded the shards of an earlier, unfinished build in %s", cfg.cache_dir)
    start, timings = time.perf_counter(), {}
    build_cache_from_config(cfg, timings=timings, overwrite=True)
    sync(device)
    seconds = time.perf_counter() - start
    # the whole build, and its parts: loading data and encoders, encoding (reading pixels, both
    # towers, writing shards, overlapped), assembling the final files; the precision it was stored in (a
    # half type computes under autocast in that type on a GPU)
    return {"cache_build_seconds": seconds, **timings, "memory": peak_memory(device, reset_at),
            "cache_dtype": read_metadata(cache_file(cfg.cache_dir, "text"))["dtype"]}


def measure_evaluation(cfg: Config, warmup: int = 1, reps: int = 5) -> dict:
    """The full-ranking evaluation of every user (test split) as the trainer runs it after an epoch: the
    item table through the item encoder, then every user's scores over all items, history masked. Each
    repetition timed alone (the metrics are read back, so each ends synchronised)."""
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model, pixels = build_model(cfg, data, device)
    for _ in range(warmup):
        evaluate_model(model, data, "test", cfg, device, pixels)
    sync(device)
    reset_at = "the warm-up's end" if reset_peak_memory(device) else None
    times = timed_each(lambda: evaluate_model(model, data, "test", cfg, device, pixels), device, reps)["step_seconds"]
    return {"label": f"evaluation, {METHOD_NAMES[cfg.method]} ({cfg.feed})", "evaluation_seconds": times["median"],
            "p90_evaluation_seconds": times["p90"], "evaluation_times": times, "users": data.num_users,
            "items": data.num_items, "eval_batch_size": eval_chunk(cfg, device, data.num_items),
            "memory": peak_memory(device, reset_at), "device": device_name(device)}


def add_tpme(rows: list[dict]) -> list[dict]:
    """TPME = 0.45 t + 0.1 p + 0.45 m over min-max-normalised time per epoch, trainable parameters and
    peak memory of the compared methods (lower is better). A constant column normalises to 0. A row without
    one of the three (failed, or a hand-made row with no memory) gets no TPME and leaves the others' alone."""
    ok = [r for r in rows if "error" not in r and memory_gib(r) is not None]
    columns = {"time": [r["epoch_seconds"] for r in ok], "params": [r["trainable_params"] for r in ok],
               "memory": [memory_gib(r) for r in ok]}
    normalised = {}
    for name, values in columns.items():
        values = np.asarray(values, dtype=float)
        span = values.max() - values.min() if len(values) else 0.0
        normalised[name] = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    for i, row in enumerate(ok):
        row["tpme_terms"] = {k: float(v[i]) for k, v in normalised.items()}
        row["tpme"] = float(sum(TPME_WEIGHTS[k] * normalised[k][i] for k in TPME_WEIGHTS))
    return rows


def profile_steps(cfg: Config, steps: int = 5, trace: str = "") -> str:
    """torch.profiler's table of the top operators over ``steps`` training steps of ``cfg`` (after three
    warm-up steps); with ``trace``, a Chrome trace written there too."""
    setup = training_setup(cfg)
    batches, step, device = setup.full_batches(), setup.step, setup.device
    for _ in range(3):
        step(next(batches))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step(next(batches))
        sync(device)
    if trace:
        with atomic_path(trace) as tmp:
            prof.export_chrome_trace(str(tmp))
    return prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                     row_limit=30)
