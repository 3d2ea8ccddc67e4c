"""Timing and profiling helpers of the diagnosis: mean seconds per call after warm-up (device
synchronised), the GPU's busy fraction and costliest kernels, allocator peaks, and the dtypes a model's
matmuls really ran in."""

from __future__ import annotations

import gc
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..devices import peak_memory, sync
from .bench import error_line


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
