"""The two feeds of per-layer backbone states. The SAN never knows which one it reads.

- ``LiveStates``: frozen encoders run on token ids and LMDB pixels (no autograd graph kept for them).
- ``CachedStates``: a gather from the safetensors cache, resident on the device.

Both map an ``ItemBatch`` of item indices to ``{'text': (U, kt, dt), 'image': (U, ki, di)}``, with
zeros for index 0 (padding). The cache is built by running ``LiveStates`` over every item, so the two
agree by construction (a test checks it to 1e-5 in fp32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.batches import ItemBatch
from .inputs import EncodedItems

if TYPE_CHECKING:  # (transformers, 2 s: not for a caller that only evaluates or reads a cache)
    from .backbones import BackboneEncoder


class LiveStates(EncodedItems):
    """Frozen encoders over items' inputs. ``tokens``/``attention`` (N+1, T) index the item list.

    Precision is the caller's: the training step's autocast (bf16/fp16 on a GPU), and fp32 in
    ``evaluate.item_table``, which turns autocast off as the authors' evaluation runs without it."""

    def __init__(self, encoders: dict[str, BackboneEncoder], tokens: torch.Tensor | None = None,
                 attention: torch.Tensor | None = None, text_dropout: bool = False):
        super().__init__(encoders, tokens, attention)
        self.text_dropout = text_dropout

    def train(self, mode: bool = True) -> LiveStates:
        super().train(mode)
        for name, encoder in self.encoders.items():
            # Frozen encoders stay in eval mode (no dropout) unless the authors' BERT-dropout
            # behaviour is asked for (``text_encoder_dropout``; their uncached runs had it on).
            encoder.train(mode and name == "text" and self.text_dropout)
        return self

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (len(e.layers), e.width) for m, e in self.encoders.items()}

    @torch.no_grad()
    def forward(self, items: ItemBatch) -> dict[str, torch.Tensor]:
        return {name: self.encode(name, items, lambda encoder, inputs: encoder.layer_states(**inputs).float(),
                                  (len(encoder.layers), encoder.width))
                for name, encoder in self.encoders.items()}  # (U, k, d) each


class CachedStates(nn.Module):
    """Tables (N+1, k, d) per modality, on the device in their stored dtype (fp32 on a CPU); ``stored``: the
    precision each was stored in."""

    def __init__(self, tables: dict[str, torch.Tensor], stored: dict[str, str]):
        super().__init__()
        self.names = tuple(tables)
        self.stored = stored
        for name, table in tables.items():
            self.register_buffer(f"table_{name}", table, persistent=False)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: tuple(getattr(self, f"table_{m}").shape[1:]) for m in self.names}

    def dtypes(self) -> dict[str, str]:
        """The precision each table is stored in (what ``cache_dtype`` 'auto' came to): 'float32', ..."""
        return dict(self.stored)

    def title_lengths(self) -> None:
        return None  # no titles here: the cache holds their states

    def forward(self, items: ItemBatch) -> dict[str, torch.Tensor]:
        return {m: getattr(self, f"table_{m}")[items.ids].float() for m in self.names}  # (U, k, d) each
