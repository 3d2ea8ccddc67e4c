"""The sequential recommender: an item encoder (any method's ``ItemEncoder``) + the SASRec user encoder + the loss.

Contract: ``calculate_loss(batch)`` for training, as RecBole's; for full-ranking evaluation, where RecBole
has ``full_sort_predict``, ``item_encoder`` (every item's embedding once, ``evaluate.item_table``) and
``user_vectors``, so that the item table is shared by every batch of users.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..data.batches import ItemBatch, TrainBatch
from .feeds import CachedStates
from .item_encoder import ItemEncoder, LrGroup
from .loss import in_batch_softmax_loss
from .san import SANItemTower
from .sasrec import SASRec


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool):
    """``module`` in training (or eval) mode inside, its own mode put back after: evaluation called from a
    caller's training loop leaves its dropout on, and a look at what a training step runs changes nothing."""
    was = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was)


class IISANItemEncoder(nn.Module):
    """Per-layer states from a feed (live or cached) through the SAN tower (an ``ItemEncoder``)."""

    def __init__(self, states: nn.Module, tower: SANItemTower):
        super().__init__()
        self.states = states
        self.tower = tower

    def title_lengths(self) -> np.ndarray | None:
        return self.states.title_lengths()

    def cache_dtypes(self) -> dict[str, str]:
        """The precision each cached table was stored in ({} for the live feed)."""
        return self.states.dtypes() if isinstance(self.states, CachedStates) else {}

    def forward(self, items: ItemBatch) -> torch.Tensor:
        return self.tower(self.states(items))  # (U, D)

    def param_groups(self) -> dict[LrGroup, list[nn.Parameter]]:
        return self.tower.param_groups()


class Recommender(nn.Module):
    def __init__(self, item_encoder: ItemEncoder, popularity: torch.Tensor, dim: int = 64, max_len: int = 10,
                 blocks: int = 2, heads: int = 2, dropout: float = 0.1):
        super().__init__()
        self.item_encoder = item_encoder
        self.user_encoder = SASRec(dim, max_len, blocks, heads, dropout)
        # Items seen only as valid/test targets have popularity 0; they never enter a training batch,
        # and the clamp keeps their log finite.
        self.register_buffer("log_pop", popularity.double().clamp_min(1e-12).log().float(), persistent=False)


    def cache_dtypes(self) -> dict[str, str]:
        """The precision each table of the item encoder's cache was stored in ({} without a cache)."""
        return self.item_encoder.cache_dtypes()

    def calculate_loss(self, batch: TrainBatch) -> torch.Tensor:
        B, S = batch.seq.shape
        item_vecs = self.item_encoder(batch.items)  # (U, D)
        # index_select, not item_vecs[inverse]: on a CPU the indexing's backward adds rows with parallel
        # atomics (last bits vary run to run with several threads); index_select's adds them in order.
        embs = item_vecs.index_select(0, batch.inverse).view(B, S, -1)  # (B, L+1, D)
        users = self.user_encoder(embs[:, :-1], batch.seq[:, :-1] != 0)  # (B, L, D)
        return in_batch_softmax_loss(users, embs, batch.seq, self.log_pop)

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        """The training loss. A forward, so that DistributedDataParallel (which hooks ``__call__``)
        synchronises the gradients of this step."""
        return self.calculate_loss(batch)

    def user_vectors(self, table: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """table (N+1, D) item embeddings, inputs (U, L) -> (U, D): the state at the last position."""
        return self.user_encoder(table[inputs], inputs != 0)[:, -1]

    def param_groups(self) -> dict[LrGroup, list[nn.Parameter]]:
        groups = self.item_encoder.param_groups()
        groups[LrGroup.RECSYS] = list(self.user_encoder.parameters()) + groups.get(LrGroup.RECSYS, [])
        return groups
