"""Efficiency measurement shared by the benchmark scripts: the trainer's exact step, timed after a
warm-up with device synchronisation and extrapolated to a full epoch; peak memory; parameters; TPME.

Each measurement runs in a fresh (spawned) process, so peak memory (GPU allocator peaks or, on CPU,
the process's peak resident set) belongs to that method alone and no compiled state leaks across.
"""

from __future__ import annotations

import math
import multiprocessing
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import METHOD_NAMES, Config
from ..console import setup_logging
from ..data.batches import train_loader
from ..data.interactions import SeqRecData
from ..devices import amp_dtype, device_name, peak_memory, resolve_device, sync
from ..model.build import build_model, count_parameters, load_data
from ..model.caching import build_cache_from_config
from ..train.step import make_optimizer, make_train_step, use_compile, use_dedup
from .flops import step_flops

# (label, config overrides) for the six settings of the paper's efficiency table.
SETTINGS = {
    "FFT": {"method": "fft"},
    "Adapter": {"method": "adapter"},
    "LoRA": {"method": "lora"},
    "BitFit": {"method": "bitfit"},
    "IISAN (uncached)": {"method": "iisan", "feed": "live"},
    "IISAN (cached)": {"method": "iisan", "feed": "cached"},
}
TPME_WEIGHTS = {"time": 0.45, "params": 0.1, "memory": 0.45}


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``: how a failed measurement is recorded in a row."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{type(err).__name__}: {message}"


@dataclass
class TrainingSetup:
    """What measuring (or profiling) a method's training step needs, built exactly as the trainer does."""

    cfg: Config
    data: SeqRecData
    model: torch.nn.Module
    pixels: object  # PixelSource or None
    step: object  # train.step.make_train_step's step: batch -> loss
    device: torch.device
    amp: torch.dtype | None
    compiled: str
    encoded: list[int] = field(default_factory=list)  # non-padding items per batch yielded, counted on the host

    def full_batches(self):
        """Endless full-size batches on the device (the timed steps must all have the measured shape)."""
        cfg, sequences, epoch = self.cfg, self.data.train_sequences(), 0
        while True:
            for batch in train_loader(sequences, cfg.batch_size, cfg.seed, epoch, use_dedup(cfg, self.compiled),
                                      self.pixels):
                if len(batch.seq) == cfg.batch_size:
                    self.encoded.append(len(batch.items.real))
                    yield batch.to(self.device)
            epoch += 1


def training_setup(cfg: Config) -> TrainingSetup:
    """The model, optimizer and step of ``cfg``, in training mode."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, device)
    amp = amp_dtype(cfg.amp, device)
    compiled = use_compile(cfg, device)
    optimizer = make_optimizer(model, cfg, device, capturable=compiled == "cudagraph")
    step = make_train_step(model, optimizer, amp, device, compiled)
    model.train()
    return TrainingSetup(cfg, data, model, pixels, step, device, amp, compiled)


def measure_training(cfg: Config, warmup: int = 3, steps: int = 10) -> dict:
    """Seconds per training step (timed alone) and per epoch, peak memory and parameters of ``cfg``."""
    setup = training_setup(cfg)
    data, model, step, device, amp, compiled = (setup.data, setup.model, setup.step, setup.device, setup.amp,
                                                 setup.compiled)
    steps_per_epoch = math.ceil(data.num_users / cfg.batch_size)
    stream = setup.full_batches()
    for _ in range(warmup):
        step(next(stream))
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup.encoded.clear()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step(next(stream)))
    sync(device)
    elapsed = time.perf_counter() - start
    compiled = step.mode  # 'off (cudagraph capture failed)' when a graph could not be captured
    memory = peak_memory(device)  # before counting FLOPs, which runs more passes
    items = float(np.mean(setup.encoded))
    # The timed batches again (the stream is deterministic), each counted: the exact mean work per step.
    replay = setup.full_batches()
    for _ in range(warmup):
        next(replay)
    flops = float(np.mean([step_flops(setup, next(replay)) for _ in range(steps)]))
    trainable, total = count_parameters(model)
    return {
        "method": METHOD_NAMES[cfg.method],
        "feed": cfg.feed if cfg.method == "iisan" else "live",
        "batch_size": cfg.batch_size,
        "seconds_per_step": elapsed / steps,
        "steps_per_epoch": steps_per_epoch,
        "epoch_seconds": elapsed / steps * steps_per_epoch,
        "timed_steps": steps,
        # non-padding items a step encodes: distinct ones when deduplicated, else every non-padding slot
        "items_per_step": items,
        # model FLOPs (matmul, conv, attention; forward and backward) per timed step, and the rate the
        # device sustained on them: a direct measure of how well the step uses the hardware
        "flops_per_step": flops,
        "model_tflops_per_second": flops / (elapsed / steps) / 1e12,
        "warmup_steps": warmup,
        "compiled": compiled,
        "amp": str(amp).replace("torch.", "") if amp else "fp32",
        "loss_finite": bool(torch.isfinite(torch.stack(losses)).all()),
        "trainable_params": trainable,
        "total_params": total,
        "memory": memory,
        "device": device_name(device),
        "users": data.num_users,
        "items": data.num_items,
    }


def measure_cache_build(cfg: Config) -> dict:
    """Seconds to run both encoders once over every item and write the cache."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, timings = time.perf_counter(), {}
    build_cache_from_config(cfg, dtype="float16" if device.type == "cuda" else "float32", timings=timings,
                            overwrite=True)  # the benchmark's own work folder, rebuilt to be timed
    sync(device)
    # the whole build, and its parts: loading data and encoders, encoding (reading pixels, both
    # towers, writing shards, overlapped), assembling the final files
    return {"cache_build_seconds": time.perf_counter() - start, **timings, "memory": peak_memory(device)}


def _child(fn_name: str, cfg_dict: dict, kwargs: dict, queue) -> None:
    try:
        setup_logging()
        result = globals()[fn_name](Config(**cfg_dict), **kwargs)
        queue.put(("ok", result))
    except BaseException as err:  # reported in the row, never a crash of the whole benchmark
        queue.put(("error", error_line(err), traceback.format_exc()))


def in_fresh_process(fn_name: str, cfg: Config, **kwargs) -> dict:
    """Run ``measure_training`` or ``measure_cache_build`` in a spawned process; errors become a row field."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn_name, cfg.to_dict(), kwargs, queue))
    proc.start()
    try:
        outcome = queue.get()
    finally:
        proc.join()
    if outcome[0] == "ok":
        return outcome[1]
    return {"error": outcome[1], "traceback": outcome[2]}


def memory_gib(row: dict) -> float | None:
    memory = row.get("memory", {})
    return memory.get("max_allocated_gib", memory.get("peak_rss_gib"))


def add_tpme(rows: list[dict]) -> list[dict]:
    """TPME = 0.45 t + 0.1 p + 0.45 m over min-max-normalised time per epoch, trainable parameters and
    peak memory of the compared methods (lower is better). A constant column normalises to 0."""
    ok = [r for r in rows if "error" not in r]
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
        prof.export_chrome_trace(trace)
    return prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                     row_limit=30)
