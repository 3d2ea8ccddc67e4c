"""Static shapes for live steps: the few item counts and title lengths a training step may meet
(``ShapeBuckets``; ``batches.CollateTrain`` applies them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROW_MULTIPLE = 16  # bucket sizes are multiples of this: tensor-core tiles, and few distinct sizes


def round_up(n: float, multiple: int) -> int:
    return -(-int(np.ceil(n)) // multiple) * multiple


@dataclass(frozen=True)
class ShapeBuckets:
    """How a live step's batch is padded and cut.

    A step's matmuls take their row count from the items it encodes. With every step its own count
    (about 110 to 180 distinct items for 32 users of Scientific), each step meets shapes the device has
    not run before and pays first-use costs (kernel selection, lazy kernel loading, new allocator
    segments). So the distinct items are padded with index 0 up to the next size of a short geometric
    ladder (``bucket``), and titles are cut to the batch's longest, rounded up to ``title_multiple``
    tokens (``columns``). Padding rows run through the encoders and are masked to zeros after, so they
    never reach the loss; the work they cost is the benchmark's padding overhead.

    ``growth``: each ladder size is at least this fraction above the previous one, on multiples of
    ``ROW_MULTIPLE`` (0.125: 112, 128, 144, 176, 208, 240, 272, 320, 368, ...: at most 12.5 % + 16 rows
    of padding). 0: no padding rows. ``title_lengths`` (N+1,) real tokens per item (``columns`` needs
    right-padded titles, which ``load_text_encoder`` sets); None: no text tower, nothing to cut."""

    growth: float = 0.125
    title_multiple: int = 8
    title_lengths: np.ndarray | None = None
    title_tokens: int = 30

    def bucket(self, n: int) -> int:
        """The smallest ladder size >= ``n`` (``n`` itself when ``growth`` is 0)."""
        if self.growth <= 0:
            return n
        size = ROW_MULTIPLE
        while size < n:
            size = max(size + ROW_MULTIPLE, round_up(size * (1 + self.growth), ROW_MULTIPLE))
        return size

    def columns(self, ids: np.ndarray) -> int | None:
        """Title columns for items ``ids``: their longest title rounded up to ``title_multiple``, at most
        ``title_tokens``; None (every column) without titles or with ``title_multiple`` 0."""
        if self.title_lengths is None or not self.title_multiple:
            return None
        longest = max(1, int(self.title_lengths[ids].max(initial=0)))
        return min(self.title_tokens, round_up(longest, self.title_multiple))

    def pad(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` followed by index 0 up to ``bucket(len(ids))``."""
        return np.concatenate([ids, np.zeros(self.bucket(len(ids)) - len(ids), dtype=ids.dtype)])
