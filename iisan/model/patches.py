"""The image towers' patch embedding (a convolution whose kernel equals its stride) computed as the one
matmul over non-overlapping patches that it is. ``--patch-embedding conv`` keeps the model's own conv."""

from __future__ import annotations

import torch
from torch import nn


class PatchProjection(nn.Module):
    """A patch embedding's convolution (kernel = stride, no padding or dilation, one group) computed as
    what it is: one matmul over the non-overlapping patches.

    It holds the convolution's own parameters (``weight`` (out, in, p, p) and ``bias``, same names, so
    state dicts, PEFT targets, BitFit and the optimizer groups see no change) and returns the
    convolution's layout (N, out, H/p, W/p) as a view, so the model around it is untouched. Why: for
    this shape (3 input channels, stride 16) cuDNN's kernel choice has repeatedly been a performance
    trap, depending on the cuDNN version, dtype and memory layout (e.g. pytorch/pytorch#146096,
    #174051; transformers#45750 replaced such a conv by a linear layer); a GEMM is always well served.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)  # None for bias-free projections (CLIP)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv2d and tuple(conv.kernel_size) == tuple(conv.stride) and conv.groups == 1
                and tuple(conv.dilation) == (1, 1) and conv.padding in ((0, 0), "valid")
                and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.kernel_size
        gh, gw = h // ph, w // pw  # as the convolution, rows and columns past the last whole patch are dropped
        patches = (x[:, :, : gh * ph, : gw * pw].reshape(n, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
                   .reshape(n, gh * gw, c * ph * pw))  # each patch flattened in the weight's (c, p, p) order
        out = nn.functional.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.transpose(1, 2).unflatten(2, (gh, gw))  # (n, out, gh, gw), a view

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=stride={self.kernel_size}, as a matmul"


def patches_as_matmul(model: nn.Module) -> int:
    """Swap every patch-embedding convolution of ``model`` for a ``PatchProjection`` over the same
    parameters; returns how many were swapped."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if PatchProjection.fits(child)]
    for parent, name, child in swaps:
        setattr(parent, name, PatchProjection(child))
    return len(swaps)
