"""Training batches for tests, made as a run makes them: ``epoch_order`` collated by a ``CollateTrain``."""

from __future__ import annotations

from iisan.data.batches import CollateTrain, epoch_batches
from iisan.data.epochs import epoch_order


def first_epoch(sequences, seed, encoding="items", pixels=None, buckets=None, batch_size=16):
    """Epoch 0's batches of ``batch_size`` users of one process."""
    order = epoch_order(len(sequences), seed, 0)
    return epoch_batches(order, batch_size, CollateTrain(sequences, encoding, pixels, buckets))
