"""What a run leaves for people to read: the results file of a run (its config, the metrics at the
best-validation epoch, the per-epoch history, timings, parameters, memory and provenance)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import METHOD_NAMES, Config
from ..devices import device_name, peak_memory
from ..provenance import git_commit
from .progress import Progress


def results_summary(cfg: Config, progress: Progress, parameters: tuple[int, int], step: dict,
                    device: torch.device, world_size: int, versions: dict, run_dir: Path) -> dict:
    """The contents of ``results.json``. ``step``: how the step ran (compiled, dedup, amp)."""
    trainable, total = parameters
    return {
        "method": METHOD_NAMES[cfg.method],
        "feed": cfg.feed if cfg.method == "iisan" else "live",
        "best_epoch": progress.stopper.best_epoch,
        "valid": progress.best_valid,
        "test": progress.best_test,
        "epochs": progress.epochs,
        "timing": progress.timing(),
        "step": step,
        "parameters": {"trainable": trainable, "total": total},
        "peak_memory": peak_memory(device),
        "device": device_name(device),
        "world_size": world_size,
        "resumed_from": progress.resumed_from,
        "versions": versions,
        "git_commit": git_commit(),
        "config": cfg.to_dict(),
        "run_dir": str(run_dir),
    }
