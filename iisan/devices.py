"""Devices: which one a run uses, its mixed precision, how to wait for it and its name (its memory:
``memory``)."""

from __future__ import annotations

import logging
import os
import platform

import torch

from . import once
from .errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA where there is one, else the CPU (Apple's MPS, which runs this code untested, is named in a
    line: ``--device mps`` takes it)."""
    if name == "auto":
        if not torch.cuda.is_available() and torch.backends.mps.is_available() and once.first("mps left unused", ""):
            log.info("--device auto runs on the CPU; this Mac's GPU is there too: --device mps uses it (Apple MPS, "
                     "not among the devices IISAN's tests run on)")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None  # (ROCm's has hip)
        why = " (this torch is a build without CUDA)" if cpu_only else "" if hidden is None else \
            f" with CUDA_VISIBLE_DEVICES={hidden!r}, which chooses the GPUs this process sees"
        raise ConfigError(f"device={name} but no CUDA device is available{why}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} but no Apple MPS device is available")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``: none on the CPU (bf16 is often emulated there)."""
    if device.type != "cuda" or amp == "none":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU's is asynchronous: a step's time would be its dispatch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device running out of memory: CUDA's own error, or Apple MPS's plain RuntimeError."""
    return isinstance(err, torch.OutOfMemoryError) or \
        (isinstance(err, RuntimeError) and str(err).startswith("MPS backend out of memory"))


def device_name(device: torch.device | str, model: bool = True) -> str:
    """What a run says it ran on; ``model`` False: a CPU without its model, as versions before commit aec5b7f named
    it (a resume of their runs on the same machine is not another device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":  # (its memory is the host's: the CPU's cores say which machine it is)
        return f"Apple MPS ({platform.machine()}, {os.cpu_count() or 1} cores)"
    model, usable, every = cpu_model() if model else "", usable_cores(), os.cpu_count() or 1
    cores = f"{usable} cores" if usable == every else f"{usable} of {every} cores"  # a job given 4 of a node's 128
    return f"CPU ({platform.processor() or platform.machine()}, {f'{model}, ' if model else ''}{cores}, " \
           f"{torch.get_num_threads()} torch threads)"


def usable_cores() -> int:
    """The cores this process may run on: under a scheduler (SLURM, ``taskset``) fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


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
