"""What the recommender asks of an item encoder (``ItemEncoder``), and the names of the learning-rate groups
its parameters train in (``LrGroup``; ``train.optim.LR_OF_GROUP`` says which config key sets each rate).

The encoders: ``recommender.IISANItemEncoder`` (a feed's states through the SAN tower),
``baselines.BaselineItemEncoder`` (trained backbones) and ``id_embedding.ItemIDEncoder`` (one learned vector
per item).
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ..data.batches import ItemBatch

MODALITIES = ("image", "text")  # the authors' order of the towers' outputs before the combining layer


def init_image_head(head: nn.Linear) -> None:
    """The authors replace ViT's classifier with a xavier-normal Linear (zero bias) and use it as the image
    tower's head, in IISAN and in every baseline alike."""
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)


class LrGroup(str, enum.Enum):
    """The authors' learning-rate groups. Members are their names as plain strings ("recsys" == RECSYS, and
    str() and format() give the name, as ``enum.StrEnum``'s, which Python 3.10 lacks), so optimizer state,
    checkpoints and results files read as before."""

    RECSYS = "recsys"
    IMAGE = "image_net"
    TEXT = "text_encoder"
    ADAPTER_IMAGE = "adapter_image"
    ADAPTER_TEXT = "adapter_text"

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def backbone(cls, modality: str) -> LrGroup:
        """A tower's own group: the image tower's IMAGE (fc_cv, ViT weights), the text tower's TEXT."""
        return cls.IMAGE if modality == "image" else cls.TEXT

    @classmethod
    def adapter(cls, modality: str) -> LrGroup:
        """A tower's adapter group: ADAPTER_IMAGE or ADAPTER_TEXT."""
        return cls.ADAPTER_IMAGE if modality == "image" else cls.ADAPTER_TEXT


@runtime_checkable
class ItemEncoder(Protocol):
    """An ``ItemBatch`` -> (U, D) item embeddings, with what the trainer asks of it besides."""

    def forward(self, items: ItemBatch) -> torch.Tensor:
        """(U, D): an embedding for each slot of ``items``, padding included."""

    def param_groups(self) -> dict[LrGroup, list[nn.Parameter]]:
        """Its parameters by learning-rate group (trainable or not; the optimizer keeps the trainable ones)."""

    def title_lengths(self) -> np.ndarray | None:
        """(N+1,) real tokens per title on the host, for static shapes' title cuts; None: no titles to cut."""

    def cache_dtypes(self) -> dict[str, str]:
        """The precision each table of its cache was stored in, by modality ({} without a cache)."""
