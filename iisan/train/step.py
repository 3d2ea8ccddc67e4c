"""The training step, the same for every method and both feeds: forward, loss, backward, optimizer
step, zero_grad (``make_train_step``: eager, or one CUDA graph), seeding and deterministic kernels. The
trainer (``trainer.py``) and the benchmark both run exactly this step; the optimizer is ``optim``'s and
how steps run is decided by ``plan``."""

from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from ..data.batches import TrainBatch
from ..devices import device_name
from .graphs import GraphedStep


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device). The order of users needs no global seed
    (``epochs.epoch_order``)."""
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


@contextlib.contextmanager
def as_in_a_fresh_process(seed: int):
    """Inside the block, a run computes as a command's does, whatever its Python caller set: the global random
    streams seeded with ``seed``, gradients on, float32 the default dtype, no autocast but the run's own (a
    notebook's ``torch.no_grad``, ``inference_mode`` or ``set_default_dtype(torch.float64)`` made a run fail
    with a message of torch's). The caller's streams and default dtype are put back afterwards: the CPU's,
    and CUDA's where CUDA had started before (until it starts, torch keeps only the last seed asked for)."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_default_dtype()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    seed_everything(seed)
    torch.set_default_dtype(torch.float32)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.set_default_dtype(saved[3])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


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
        # (no bound method of its own kept eagerly: a step that refers to itself lives until a full garbage
        # collection, and with it the model and optimizer of a sweep's finished point)
        self.compiled = torch.compile(self.loss, mode="reduce-overhead", dynamic=False) if mode == "inductor" else None

    def loss(self, *tensors) -> torch.Tensor:
        """The loss of one batch given as ``TrainBatch.tensors()`` (what a compiled or graphed step captures)."""
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None,
                            cache_enabled=False):
            # Through ``forward`` (= calculate_loss), so a DistributedDataParallel model syncs gradients.
            return self.model(TrainBatch.from_tensors(*tensors))

    def __call__(self, batch: TrainBatch) -> torch.Tensor:
        if self.mode == "inductor":
            torch.compiler.cudagraph_mark_step_begin()
        # Compiled steps need static shapes, which the (variable) number of real items is not.
        loss = (self.compiled or self.loss)(*batch.tensors(real=self.mode == "off"))
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


def out_of_memory_message(err: Exception, batch_size: int, device: torch.device) -> str:
    wanted = re.search(r"Tried to allocate ([\d.]+ [KMG]i?B)", str(err))
    total = held = 0
    if device.type == "cuda":
        total, held = torch.cuda.get_device_properties(device).total_memory, torch.cuda.memory_allocated(device)
    elif device.type == "mps":  # (what the host lets the GPU take of the memory they share)
        total, held = torch.mps.recommended_max_memory(), torch.mps.current_allocated_memory()
    total, held = total / 2**30, held / 2**30
    return (f"batch_size={batch_size} does not fit on {device_name(device)}: the step needed "
            f"{wanted.group(1) if wanted else 'more'} on top of {held:.2f} GiB already allocated "
            f"(device has {total:.1f} GiB); lower --batch-size")
