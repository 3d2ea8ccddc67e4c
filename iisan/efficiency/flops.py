"""Model FLOPs of a step: matmuls, convolutions and attention, forward and backward, counted by
``torch.utils.flop_counter`` on the very batches a benchmark timed. Set beside a card's measured GEMM
rate, FLOPs per second say how well a step uses the hardware."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry


def _cpu_attention_formulas() -> dict:
    """torch's FLOP counter knows the GPU attention kernels; count the CPU ones with the same formulas
    (the math fallback is counted through its matmuls), so a CPU count equals a GPU one."""
    aten = torch.ops.aten
    mapping = {}
    for cpu, gpu in (("_scaled_dot_product_flash_attention_for_cpu", aten._scaled_dot_product_flash_attention),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward",
                      aten._scaled_dot_product_flash_attention_backward)):
        if hasattr(aten, cpu) and gpu in flop_registry:
            formula = flop_registry[gpu]  # takes the op's arguments as they are ("raw")

            def raw(*args, formula=formula, **kwargs):
                return formula(*args, **kwargs)

            raw._get_raw = True
            mapping[getattr(aten, cpu)] = raw
    return mapping


def count_flops(run) -> int:
    """Floating-point operations of ``run()``: matmuls, convolutions and attention, forward and backward
    (``torch.utils.flop_counter``); elementwise work and optimizer updates are not counted."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
        run()
    return int(counter.get_total_flops())


def step_flops(setup, batch) -> int:
    """FLOPs of one training step on ``batch``: the loss's forward and its gradients for the trainable
    parameters, as the step computes them (under the same autocast). No parameter, gradient or optimizer
    state is touched, so it is safe after the timed steps, also for a graphed step."""
    trainable = [p for p in setup.model.parameters() if p.requires_grad]

    def run():
        with torch.autocast(setup.device.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
            loss = setup.model(batch)
        torch.autograd.grad(loss, trainable, allow_unused=True)  # e.g. an ablation leaves a part unused

    return count_flops(run)


def shape_key(batch) -> tuple:
    """What a step's FLOPs depend on: the users' slots, the item rows (and how many run through the
    encoders, and through the towers that take each distinct item once) and the title columns. Two batches
    with one key do the same work."""
    items, distinct = batch.items, batch.items.distinct
    by_item = () if distinct is None else (items.per_item, len(distinct.ids), distinct.encoded_rows())
    return tuple(batch.seq.shape), len(items.ids), items.encoded_rows(), items.title_columns, *by_item


class StepFlops:
    """``step_flops`` of a setup per batch, counted once per ``shape_key``: with static shapes a few
    counts cover a whole benchmark."""

    def __init__(self, setup):
        self.setup = setup
        self.known: dict[tuple, int] = {}

    def __call__(self, host_batch) -> int:
        key = shape_key(host_batch)
        if key not in self.known:
            self.known[key] = step_flops(self.setup, host_batch.to(self.setup.device))
        return self.known[key]
