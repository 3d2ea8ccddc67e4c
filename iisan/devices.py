"""Devices: which one a run uses, its mixed precision, how to wait for it, its name and its peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys

import psutil
import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} but no Apple MPS device is available")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``: none on the CPU (bf16 is emulated there)."""
    if device.type != "cuda" or amp == "none":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_model()
    return f"CPU ({platform.processor() or platform.machine()}, {f'{model}, ' if model else ''}{os.cpu_count()} " \
           f"cores, {torch.get_num_threads()} torch threads)"


def cpu_model() -> str:
    """The CPU's model as Linux names it ('AMD EPYC', 'Intel(R) Xeon(R) ...'; '' elsewhere): two CPUs print
    other last digits of a result, so a result says which it came from."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return " ".join(line.partition(":")[2].split())
    except OSError:
        pass
    return ""


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak over from now: the GPU allocator's peaks; on a Linux CPU the process's resident
    high-water mark (VmHWM, reset to the current resident set by writing 5 to /proc/self/clear_refs).
    False where it cannot be reset (elsewhere, or /proc refuses): the peak is then the process's whole life."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return own_peak_rss() is not None


def own_peak_rss() -> int | None:
    """Bytes of this process's resident high-water mark on Linux (VmHWM): a fresh process image starts its
    own, unlike ``ru_maxrss``, which a child inherits from its parent across fork and exec. None elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as fh:  # (a name cut inside a character)
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory(device: torch.device, reset_at: str | None = None) -> dict:
    """GPU: the allocator's peaks since the last reset; CPU: the process's peak resident set and which figure
    it is (``rss_peak_source``: VmHWM on Linux, else ``ru_maxrss``, which on Linux would be the larger of
    the parent's and the child's), since ``reset_at`` (when ``reset_peak_memory`` returned True: "the
    warm-up's end") or since the process started (``rss_peak_since``)."""
    if device.type == "cuda":
        return {"max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    peak, source = own_peak_rss(), "VmHWM"
    if peak is None:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        peak = peak if sys.platform == "darwin" else peak * 1024
    since = reset_at if reset_at and source == "VmHWM" else "the process's start"
    return {"peak_rss_gib": peak / 2**30, "current_rss_gib": psutil.Process().memory_info().rss / 2**30,
            "rss_peak_source": source, "rss_peak_since": since}
