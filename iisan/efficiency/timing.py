"""Timing and profiling helpers of the benchmark and the diagnosis: per-step durations without waiting on
the device between steps (``StepClock``) and their median and p90, mean seconds per call after warm-up,
the GPU's busy fraction and costliest kernels, the caching allocator's activity in a window, allocator
peaks, and the dtypes a model's matmuls really ran in."""

from __future__ import annotations

import gc
import time

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..devices import sync
from ..errors import error_line
from ..memory import peak_memory


class StepClock:
    """Per-step durations, with no wait on the device between steps (a wait would change what is timed:
    the host could no longer queue the next step while the device runs this one).

    On a GPU each ``mark`` records a CUDA event on the current stream; read once after the last mark, the
    gaps between consecutive events are the device's step periods, idle time caused by the host
    included, and they add up to the wall time of the window. On a CPU, the host's clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds between consecutive marks (waits for the device to finish)."""
        sync(self.device)
        pairs = zip(self.marks, self.marks[1:])
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1e3 for a, b in pairs]
        return [b - a for a, b in pairs]


def summary(seconds: list[float]) -> dict:
    """Median, 90th percentile, mean, min and max of per-step seconds."""
    values = np.asarray(seconds, dtype=float)
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "count": len(values)}


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def timed_each(fn, device: torch.device, reps: int) -> dict:
    """Each of ``reps`` calls timed alone, the device synchronised after each: ``host_seconds`` (the call
    returning: the host's work and any wait inside it) beside ``step_seconds`` (until the device is
    done). Host close to step: the host or a wait in the step sets the pace; far below: the device."""
    host, step = [], []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        sync(device)
        step.append(time.perf_counter() - start)
    return {"host_seconds": summary(host), "step_seconds": summary(step), "each_step_seconds": step}


ALLOCATOR_COUNTS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "segment.all.allocated",
                    "segment.all.freed", "allocation.all.allocated")


def allocator_counts(device: torch.device) -> dict:
    """The caching allocator's cumulative counters and reserved bytes (GPU only; empty on a CPU)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    counts = {k: int(stats.get(k, 0)) for k in ALLOCATOR_COUNTS}
    counts["reserved_gib"] = stats.get("reserved_bytes.all.current", 0) / 2**30
    return counts


def allocator_activity(before: dict, after: dict) -> dict:
    """What the allocator did between two ``allocator_counts``: new segments (cudaMalloc) and frees
    inside a timed window mean the window paid for memory growth; retries mean it emptied its cache."""
    return {k: after[k] - before[k] for k in after}


def gpu_profile(run, device: torch.device, steps: int = 3, top: int = 8) -> dict:
    """Over ``steps`` calls of ``run``: the share of wall time the GPU spends in kernels (near 1: the
    kernels themselves are slow; well below: the host or the input pipeline keeps the GPU waiting) and
    the costliest kernels. Empty on a CPU."""
    if device.type != "cuda":
        return {}
    try:
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            wall = time.perf_counter() - start
        kernels = sorted(((e.key, e.self_device_time_total) for e in prof.key_averages()
                          if e.self_device_time_total > 0), key=lambda k: -k[1])
    except Exception as err:  # the profiler is a help here, never a reason to lose the row
        return {"profile_error": error_line(err)}
    if not kernels:  # not "GPU idle": a profiler that saw nothing (some builds drop kernels without CPU activity)
        return {"profile_error": f"the profiler recorded no GPU kernels over {steps} steps"}
    busy = sum(t for _, t in kernels) / 1e6  # microseconds -> seconds
    return {"profiled_steps": steps, "wall_seconds_per_step": wall / steps, "kernel_seconds_per_step": busy / steps,
            "gpu_busy": busy / wall if wall else None,
            "top_kernels": [{"name": name[:140], "ms_per_step": t / 1e3 / steps} for name, t in kernels[:top]]}


def peak_gib(device: torch.device) -> float | None:
    return peak_memory(device).get("max_allocated_gib")  # GPU only: a CPU process's peak is not this run's


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def linear_output_dtypes(model: nn.Module, run) -> dict[str, int]:
    """How many Linear outputs of one ``run()`` came out in each dtype: a matmul left in fp32 under
    autocast (10x slower on a GPU's tensor cores) shows here."""
    seen: dict[str, int] = {}

    def hook(module, inputs, output):
        key = str(output.dtype).replace("torch.", "")
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen
