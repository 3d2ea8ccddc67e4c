"""An epoch's users: a reproducible order, a pure function of (seed, epoch), so a resumed epoch, another
process or another rank rebuilds exactly the same batches without any stored state; under torchrun each rank
takes its shard of the same permutation; and the steps that makes."""

from __future__ import annotations

import numpy as np
import torch


def shard_users(order: np.ndarray, rank: int, world_size: int, pad: bool = False) -> np.ndarray:
    """This rank's users of one epoch's global permutation: every ``world_size``-th from ``rank``.

    Every rank gets the same count, because DDP needs the same number of steps on every rank: the last
    ``len(order) % world_size`` users of the permutation (a different few each epoch) sit this epoch out,
    or with ``pad`` (the authors' ``DistributedSampler``) the permutation is filled up to a multiple of
    ``world_size`` by repeating its first users, who then train twice in the epoch."""
    if pad and len(order) % world_size:
        order = np.resize(order, -(-len(order) // world_size) * world_size)  # np.resize repeats from the start
    usable = len(order) - len(order) % world_size
    return order[rank:usable:world_size]


def epoch_order(n: int, seed: int | None, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's users of one epoch, shuffled; the order depends only on (seed, epoch), so it is
    reproducible, and no two pairs share one (``order_seed``). A seed of None:
    the authors' order, ``DistributedSampler``'s (its seed 0, ``set_epoch(epoch + 1)``), the same for
    every run seed. Under torchrun each rank takes its shard of the same permutation (``shard_users``;
    the authors' order padded as their sampler pads it).
    Batched, a single process's order is exactly that of ``BatchSampler(RandomSampler(..., generator),
    batch_size)`` (a test checks it). No global random state is drawn, so dropout streams do not depend
    on how batches were made."""
    generator = torch.Generator().manual_seed(epoch + 1 if seed is None else order_seed(seed, epoch))
    return shard_users(torch.randperm(n, generator=generator).numpy(), rank, world_size, pad=seed is None)


def order_seed(seed: int, epoch: int) -> int:
    """What an epoch's order is drawn from: ``seed * 1000 + epoch`` for the first 1000 epochs (every run's
    order so far), then a 64-bit number NumPy's ``SeedSequence`` makes of the pair, so that seed s at
    epoch 1000 does not repeat seed s + 1's first epoch."""
    if epoch < 1000:
        return seed * 1000 + epoch
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


def steps_per_epoch(users: int, batch_size: int, world_size: int = 1, padded: bool = False) -> int:
    """Steps of one rank's epoch (``epoch_order``'s shard; ``padded``: the authors' order, filled up)."""
    per_rank = -(-users // world_size) if padded else users // world_size
    return -(-per_rank // batch_size)
