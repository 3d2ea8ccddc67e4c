"""Training batches: an epoch's users in a reproducible order, collated into ``TrainBatch``es.

The order of users is a pure function of (seed, epoch), so a resumed epoch, another process or another
rank rebuilds exactly the same batches without any stored state. Under torchrun each rank takes its
shard of the same permutation.
"""

from __future__ import annotations

import numpy as np
import torch

from .distributed import Dist, shard_users
from .feeds import ItemBatch, PixelSource, Prefetch, host_tensor
from .model import TrainBatch


class CollateTrain:
    """Rows of user indices -> ``TrainBatch``. With ``dedup`` each distinct item (padding included) is
    encoded once; without it every slot is (static shapes for compiled steps)."""

    def __init__(self, sequences: np.ndarray, dedup: bool, pixels: PixelSource | None):
        self.sequences, self.dedup, self.pixels = sequences, dedup, pixels

    def __call__(self, users: list[int]) -> TrainBatch:
        seq = self.sequences[np.asarray(users)]  # (B, L+1)
        if self.dedup:
            ids, inverse = np.unique(seq, return_inverse=True)
        else:
            ids, inverse = seq.reshape(-1), np.arange(seq.size)
        pixels = None if self.pixels is None else self.pixels(ids)
        return TrainBatch(host_tensor(seq), ItemBatch.from_numpy(ids, pixels), host_tensor(inverse.reshape(-1)))


class TrainBatches:
    """An epoch's batches of users, from a fixed order."""

    def __init__(self, order: np.ndarray, batch_size: int, collate: CollateTrain, start_step: int = 0):
        self.order, self.batch_size, self.collate, self.start_step = order, batch_size, collate, start_step

    def user_batches(self) -> list[np.ndarray]:
        """The user indices of each remaining batch."""
        starts = range(self.start_step * self.batch_size, len(self.order), self.batch_size)
        return [self.order[start: start + self.batch_size] for start in starts]

    def __len__(self) -> int:
        return max(0, -(-len(self.order) // self.batch_size) - self.start_step)

    def __iter__(self):
        for users in self.user_batches():
            yield self.collate(users)


def train_loader(sequences: np.ndarray, batch_size: int, seed: int, epoch: int, dedup: bool,
                 pixels: PixelSource | None = None, rank: int = 0, world_size: int = 1, start_step: int = 0):
    """One epoch of shuffled users; the order depends only on (seed, epoch), so it is reproducible.

    Under torchrun each rank takes its shard of the same permutation (``distributed.shard_users``), and
    a resumed epoch skips the ``start_step`` batches it had done. With the defaults the batches are
    exactly those of ``BatchSampler(RandomSampler(..., generator), batch_size)`` (a test checks it).
    No global random state is drawn, so dropout streams do not depend on how batches were made. When
    images are read, the next batches are prepared in a background thread."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = shard_users(torch.randperm(len(sequences), generator=generator).numpy(), Dist(rank, world_size))
    batches = TrainBatches(order, batch_size, CollateTrain(sequences, dedup, pixels), start_step)
    return Prefetch(batches) if pixels is not None else batches


def steps_per_epoch(users: int, batch_size: int, world_size: int = 1) -> int:
    return -(-(users // world_size) // batch_size)
