"""Whole-step CUDA graphs for cached IISAN.

The cached step is launch-bound, not compute-bound (docs/performance.md, reference figures: ~20 ms
eager, ~2.5 ms as a CUDA graph on an H200). With static shapes (every slot encoded, no dedup, fixed
batch) the forward, loss, backward and a capturable fused Adam step are captured once and replayed;
batches of another shape (the last, smaller one of an epoch) run eagerly on the same parameters and
optimizer state.

Capture needs a few warm-up iterations, which update the weights and draw dropout masks; the weights,
the optimiser's state and the device's random-number stream are snapshotted before and restored after,
so training is exactly as if the graph had been there from the first step. A replay draws the numbers
the eager step would have drawn from the same stream, so a run resumed mid-way (which captures again)
computes what an uninterrupted one does.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class GraphedStep:
    """``step(batch) -> loss`` as one CUDA graph: ``loss_of(*batch.tensors(real=False))`` (the eager
    ``TrainStep.loss``), backward and the optimizer step captured at the first batch and replayed for
    every batch of the same shapes; ``eager_step`` runs the others."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_of, eager_step,
                 warmup: int = 3):
        self.model, self.optimizer, self.loss_of, self.eager_step = model, optimizer, loss_of, eager_step
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.shapes: tuple | None = None
        self.capture_failed = False  # then every step runs eagerly
        self.scaler = None  # bf16 or fp32 only: fp16 loss scaling is not graphed

    @property
    def mode(self) -> str:
        """How steps run, as results.json records it (``TrainStep.mode``'s values, and what a failed capture
        left)."""
        return "off (cudagraph capture failed)" if self.capture_failed else "cudagraph"

    # ----------------------------------------------------------------------------------------------
    def _snapshot(self) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for p, s in self.optimizer.state.items()}
        return params, state, torch.cuda.get_rng_state(params[0].device)

    def _restore(self, snapshot) -> None:
        params, state, rng = snapshot
        torch.cuda.set_rng_state(rng, params[0].device)  # the warm-up's dropout draws never happened
        with torch.no_grad():
            for p, saved in zip(self.model.parameters(), params):
                p.copy_(saved)
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    if torch.is_tensor(v):  # in place: the graph holds these tensors
                        v.copy_(state[id(p)][k]) if id(p) in state else v.zero_()

    def _run(self, inputs) -> torch.Tensor:
        loss = self.loss_of(*inputs)
        loss.backward()
        self.optimizer.step()
        return loss

    def _capture(self, inputs) -> None:
        self.static_inputs = [x.clone() if torch.is_tensor(x) else x for x in inputs]
        snapshot = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._run(self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(snapshot)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self._run(self.static_inputs)
        self.graph = graph
        # the shapes of (seq, ids, pixels, inverse), the tensors that vary in size
        log.info("captured the training step as a CUDA graph (shapes %s)", self.shapes[:4])

    def __call__(self, batch) -> torch.Tensor:
        # The eager step's loss takes the same values in the same order (``TrainBatch.tensors``); no real
        # positions (their count varies). The other values (title columns, encode_all) are part of the key.
        inputs = batch.tensors(real=False)
        shapes = tuple(tuple(x.shape) if torch.is_tensor(x) else x for x in inputs)
        if self.graph is None and not self.capture_failed:
            self.shapes = shapes
            snapshot = None
            try:
                snapshot = self._snapshot()
                self._capture(inputs)
            except Exception as err:  # a model that cannot be captured still trains, eagerly
                if snapshot is not None:
                    self._restore(snapshot)
                self.optimizer.zero_grad(set_to_none=True)
                self.capture_failed = True
                self.graph = None
                log.warning("CUDA graph capture failed (%s: %s); training eagerly", type(err).__name__,
                            str(err).splitlines()[0] if str(err) else "")
        if self.graph is None or shapes != self.shapes:
            # .grad may still alias the graph's gradient buffers (holding the last replay's values):
            # drop them so the eager backward starts from zero.
            self.optimizer.zero_grad(set_to_none=True)
            return self.eager_step(batch)
        for static, x in zip(self.static_inputs, inputs):
            if torch.is_tensor(x):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_loss.detach().clone()
