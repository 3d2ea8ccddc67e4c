"""The ID baseline's item encoder: one learned vector per item index, no content at all (method ``id``).

With it the recommender is plain SASRec over item IDs, trained with the same in-batch loss, negatives,
evaluation and early stopping as every other method, so the multimodal methods can be compared with it
on the same split. The authors' ``Model``/``ModelMM`` build the same table for a non-modal run
(``nn.Embedding(item_num + 1, 64, padding_idx=0)``, xavier-normal), but their forward passes never read
it and their ID dataset (``Build_Id_Dataset``) is not defined, so they never ran it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.batches import ItemBatch
from .item_encoder import LrGroup


class ItemIDEncoder(nn.Module):
    """``items.ids`` (U,) -> (U, D): a row of a learned (N+1, D) table, xavier-normal at start (the
    authors' init). Row 0 (padding) never trains (``padding_idx``) and, unlike theirs, starts at zero;
    its column is masked in the loss and its key in SASRec, so the difference never reaches a number."""

    def __init__(self, num_items: int, dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.xavier_normal_(self.embedding.weight)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, items: ItemBatch) -> torch.Tensor:
        return self.embedding(items.ids)  # (U, D)

    def param_groups(self) -> dict[LrGroup, list[nn.Parameter]]:
        """The table trains with the recsys group (``lr``), like the rest of SASRec."""
        return {LrGroup.RECSYS: [self.embedding.weight]}

    def title_lengths(self) -> None:
        return None  # no titles: nothing for static shapes to cut

    def cache_dtypes(self) -> dict[str, str]:
        return {}  # no cache
