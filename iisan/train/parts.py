"""What training a config needs, built in one order for the trainer and the benchmark alike
(``build_training``): the model (and the pixels of a live image tower), how its steps run (``plan``),
the optimizer and the batch layout. The step itself is made by the caller (``step.make_train_step``):
the trainer first restores a checkpoint into the model and optimizer and wraps the model for DDP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config
from ..data.batches import CollateTrain, PixelSource
from ..data.interactions import SeqRecData
from ..model.build import build_model
from ..model.recommender import Recommender
from .optim import make_optimizer
from .plan import StepPlan, plan_step


@dataclass
class TrainingParts:
    model: Recommender
    pixels: PixelSource | None  # pixels by item index when an image tower runs live
    plan: StepPlan  # precision, compiled or not, the item rows a batch encodes, static shapes
    optimizer: torch.optim.Optimizer
    collate: CollateTrain  # the batch layout of every epoch (``plan.encoding``, ``plan.buckets``)


def build_training(cfg: Config, data: SeqRecData, device: torch.device, processes: int = 1,
                   built: Callable[[Recommender], None] = lambda model: None, trained: bool = False) -> TrainingParts:
    """build_model -> plan_step -> make_optimizer (capturable for a CUDA graph) -> the batch layout.
    ``processes``: how many ranks train (``plan_step`` compiles single-process runs only by default).
    ``built(model)`` runs as soon as the model exists (the trainer logs its parameter line there, before
    the plan can refuse the run). ``trained``: the run has trained in its folder before (``build_model``)."""
    model, pixels = build_model(cfg, data, device, trained=trained)
    built(model)
    plan = plan_step(cfg, device, model, processes)
    optimizer = make_optimizer(model, cfg, device, capturable=plan.compiled == "cudagraph")
    collate = CollateTrain(data.train_sequences(), plan.encoding, pixels, plan.buckets, plan.per_item)
    return TrainingParts(model, pixels, plan, optimizer, collate)
