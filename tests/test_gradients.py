"""Gradients against finite differences, in float64: the side network and SASRec, through their inputs and
every trainable parameter, each parameter first moved off its initial zeros (theta = 0, zero biases) that
could hide a wrong derivative. No custom autograd exists today; this holds any that comes."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from iisan.model.san import SANItemTower
from iisan.model.sasrec import SASRec


def moved(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


def holds(module: torch.nn.Module, inputs: tuple, *fixed) -> bool:
    """gradcheck of ``module(*inputs, *fixed)`` over the float inputs and every trainable parameter."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = tuple(p.detach().clone().requires_grad_() for n, p in module.named_parameters() if n in names)
    count = len(inputs)

    def call(*args):
        return functional_call(module, dict(zip(names, args[count:], strict=True)), (*args[:count], *fixed))

    return gradcheck(call, tuple(x.detach().clone().requires_grad_() for x in inputs) + params, fast_mode=True)


@pytest.mark.parametrize("settings", [
    {"widths": {"text": 6, "image": 6}},                                   # IISAN: equal widths
    {"widths": {"text": 6, "image": 5}, "bottleneck": {"text": 3, "image": 2}},  # Versa: the inter map
    {"widths": {"text": 6, "image": 6}, "seeded": True},
    {"widths": {"text": 6, "image": 6}, "fusion": "add", "modality": "inter"},
])
def test_the_side_network_has_the_gradients_finite_differences_give(settings):
    settings = dict(settings)
    widths = settings.pop("widths")
    steps = {"text": 4, "image": 3}
    tower = moved(SANItemTower(widths, steps, 4, settings.pop("bottleneck", None), **settings).double(), seed=1)
    states = {m: torch.randn(3, steps[m], widths[m], dtype=torch.float64) for m in widths}

    class Flat(torch.nn.Module):  # gradcheck takes tensors, the tower a dict of them
        def __init__(self):
            super().__init__()
            self.tower = tower

        def forward(self, text, image):
            return self.tower({"text": text, "image": image})

    assert holds(Flat(), (states["text"], states["image"]))


def test_sasrec_has_the_gradients_finite_differences_give():
    sasrec = moved(SASRec(dim=8, max_len=5, blocks=2, heads=2, dropout=0.0).double().eval(), seed=2)
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    assert holds(sasrec, (torch.randn(2, 5, 8, dtype=torch.float64),), valid)
