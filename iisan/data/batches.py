"""Batches: what a training or encoding step receives, built on the host.

- ``ItemBatch``: the items a step encodes (indices, pixels when an image tower runs live, and the
  positions of the non-padding ones); ``TrainBatch``: users' sequences plus their items.
- ``PixelSource``: pixels by item index from the image LMDB, read by a pool of threads.
- ``CollateTrain``: the batch layout (which item rows, pixels, static shapes), built once per run;
  ``epoch_batches``: an epoch's order collated by it into ``TrainBatch``es.
- ``item_chunks``: every item in fixed-size chunks (item tables for evaluation, cache builds).
Static shapes for live steps (``CollateTrain`` with ``shapes.ShapeBuckets``): a batch's distinct items
padded up to a bucket size and its titles cut to the batch's longest, so that steps meet a few shapes.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..devices import usable_cores
from .images import ImageStore
from .shapes import ShapeBuckets


def pinning() -> bool:
    """Pin host batches when this process works on a GPU (CUDA initialised: a CPU run on a machine with a
    GPU never creates a CUDA context for pinned memory it does not need)."""
    return torch.cuda.is_initialized()


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``, pinned when working on a GPU: a copy to the device from pageable memory
    first waits for the device to finish its queued work (CUDA's rule for pageable transfers), which
    would stall the host once per batch; from pinned memory it is truly asynchronous."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pinning() else tensor


@dataclass
class ItemBatch:
    """Distinct items of a batch: ``ids`` (U,) indices into the feed's item list; ``pixels`` (U, S, S, 3)
    uint8 when an image encoder runs live; ``real`` (R,) the positions in ``ids`` of the non-padding
    items, found on the host when the batch is made (finding them on a GPU would stall the host until
    the device catches up, every step).

    Static shapes (``ShapeBuckets``): ``encode_all`` runs every row through the encoders, padding rows
    (index 0) too, and zeroes their states after, so the encoders see U rows, a bucket size, instead of
    the R real ones; ``title_columns`` (T) cuts the title table to its first T columns.

    Towers by their own rows: where a batch has a row per slot (each its own dropout mask), a tower that
    drops nothing out needs each distinct item once. ``distinct`` is then the batch's distinct items (an
    ItemBatch of their own, padded to their own bucket, with the pixels), ``to_distinct`` (U,) the row of
    ``distinct`` that each row's item is, and ``per_item`` the towers that run on ``distinct``."""

    ids: torch.Tensor
    pixels: torch.Tensor | None = None
    real: torch.Tensor | None = None
    title_columns: int | None = None
    encode_all: bool = False
    distinct: ItemBatch | None = None
    to_distinct: torch.Tensor | None = None
    per_item: tuple[str, ...] = ()

    @classmethod
    def from_numpy(cls, ids: np.ndarray, pixels: torch.Tensor | None = None, title_columns: int | None = None,
                   encode_all: bool = False, **per_tower) -> ItemBatch:
        return cls(host_tensor(ids), pixels, host_tensor(np.flatnonzero(ids)), title_columns, encode_all, **per_tower)

    def tower(self, name: str) -> tuple[ItemBatch, torch.Tensor | None]:
        """The rows tower ``name`` runs on, and where each row of this batch finds its output among them
        (None: its own rows)."""
        return (self.distinct, self.to_distinct) if name in self.per_item else (self, None)

    def real_positions(self) -> torch.Tensor:
        return self.real if self.real is not None else torch.nonzero(self.ids != 0).squeeze(1)

    def encoded_rows(self) -> int:
        """How many rows the encoders run on: every row with static shapes, else the real ones."""
        return len(self.ids) if self.encode_all else len(self.real_positions())

    def to(self, device: torch.device) -> ItemBatch:
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        distinct = None if self.distinct is None else self.distinct.to(device)
        return ItemBatch(move(self.ids), move(self.pixels), move(self.real), self.title_columns, self.encode_all,
                         distinct, move(self.to_distinct), self.per_item)


class PixelSource:
    """Pixels of items by index, read from an LMDB keyed by item id (index 0 and absent ids: blank).

    A pool of threads copies records straight from LMDB's memory map into one (pinned, when working
    on a GPU) tensor: one copy per image, no JPEG decoding, no inter-process transfer. Reading a
    batch of ~350 images at 224 px is ~50 MB of memcpy."""

    def __init__(self, store: ImageStore, item_ids: list[str], threads: int = 4):
        self.store = store
        self.item_ids = item_ids
        self.threads = max(1, min(threads, usable_cores()))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process whose threads they are: a forked child has none of them

    def __call__(self, ids: np.ndarray) -> torch.Tensor:
        ids = np.asarray(ids).reshape(-1)
        size = self.store.size
        out = torch.empty((len(ids), size, size, 3), dtype=torch.uint8, pin_memory=pinning())
        view = out.numpy()
        keys = [self.item_ids[i] for i in ids]
        parts = np.array_split(np.arange(len(ids)), min(self.threads, max(1, len(ids) // 16)))
        if len(parts) == 1:
            self.store.get(keys, view)
            return out
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="iisan-pixels")
            self._pool_pid = os.getpid()
        jobs = [self._pool.submit(self.store.get, keys[p[0]: p[-1] + 1], view[p[0]: p[-1] + 1])
                for p in parts if len(p)]
        for job in jobs:
            job.result()
        return out

    def close(self) -> None:
        """End the reader threads now (not when this object is collected: a kept traceback may hold it long);
        a later call starts them again."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


class Prefetch:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead, so that reading and
    collating the next batches overlaps the current step (the heavy parts release the GIL)."""

    def __init__(self, iterable, depth: int = 3):
        self.iterable, self.depth = iterable, depth

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        buffer: queue.Queue = queue.Queue(self.depth)
        done = object()
        stop = threading.Event()

        def produce():
            try:
                for item in self.iterable:
                    if stop.is_set():
                        return
                    buffer.put(item)
            except BaseException as err:  # re-raised in the consumer
                buffer.put(err)
            buffer.put(done)

        thread = threading.Thread(target=produce, daemon=True, name="iisan-prefetch")
        thread.start()
        try:
            while True:
                item = buffer.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    try:
                        raise item
                    finally:  # the error's traceback holds this frame: no cycle back to the error through it
                        item = None
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    buffer.get_nowait()
                except queue.Empty:
                    thread.join(0.01)


class _Chunks:
    def __init__(self, ids: np.ndarray, size: int, pixels: PixelSource | None, only: list[int] | None = None):
        self.ids, self.size, self.pixels = ids, size, pixels
        self.order = list(range((len(ids) + size - 1) // size)) if only is None else list(only)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for k in self.order:
            ids = self.ids[k * self.size : (k + 1) * self.size]
            yield ItemBatch.from_numpy(ids, None if self.pixels is None else self.pixels(ids))


def item_chunks(ids: np.ndarray, size: int, pixels: PixelSource | None = None, only: list[int] | None = None):
    """Batches of the given item indices; with pixels, read ahead in a background thread. ``only``: the
    numbers of the chunks to yield (a resumed cache build skips the finished ones)."""
    chunks = _Chunks(np.asarray(ids, dtype=np.int64), size, pixels, only)
    return Prefetch(chunks) if pixels is not None else chunks


@dataclass
class TrainBatch:
    """``seq`` (B, L+1) item indices, left-padded; ``items`` the distinct items to encode; ``inverse``
    (B*(L+1),) the position in ``items.ids`` of every slot."""

    seq: torch.Tensor
    items: ItemBatch
    inverse: torch.Tensor

    def to(self, device: torch.device) -> TrainBatch:
        return TrainBatch(self.seq.to(device, non_blocking=True), self.items.to(device),
                          self.inverse.to(device, non_blocking=True))

    def tensors(self, real: bool = True) -> tuple:
        """The batch as the flat tuple a compiled or graphed step takes (``from_tensors`` rebuilds it):
        (seq, ids, pixels, inverse, real, title_columns, encode_all), then for towers by their own rows
        (distinct ids, pixels, real, to_distinct, per_item). ``real=False`` leaves the real positions out
        (None): their count varies, and compiled steps need static shapes."""
        items, distinct = self.items, self.items.distinct or ItemBatch(None)
        return (self.seq, items.ids, items.pixels, self.inverse, items.real if real else None, items.title_columns,
                items.encode_all, distinct.ids, distinct.pixels, distinct.real if real else None, items.to_distinct,
                items.per_item)

    @classmethod
    def from_tensors(cls, seq, ids, pixels, inverse, real=None, title_columns=None, encode_all=False,
                     distinct_ids=None, distinct_pixels=None, distinct_real=None, to_distinct=None,
                     per_item=()) -> TrainBatch:
        distinct = None if distinct_ids is None else ItemBatch(distinct_ids, distinct_pixels, distinct_real,
                                                               title_columns, encode_all)
        return cls(seq, ItemBatch(ids, pixels, real, title_columns, encode_all, distinct, to_distinct, per_item),
                   inverse)


ENCODINGS = ("items", "slots", "all")


@dataclass(eq=False)
class CollateTrain:
    """Rows of user indices -> ``TrainBatch``: the batch layout of a run, built once and shared by
    everything that makes its batches. The item rows the tower runs on, by ``encoding``: 'items',
    each distinct item once (padding included); 'slots', each slot that holds an item once and padding
    once (a repeated item gets a row, so a dropout mask, per slot); 'all', every slot, padding included
    (static shapes for compiled steps). With ``buckets`` the rows of 'items' and 'slots' are padded to a
    bucket size ('all' already has a fixed count: not padded) and the titles cut, and every row runs
    through the encoders (``ItemBatch.encode_all``): with 'all' that is the authors' way. ``pixels``: read
    for the batch's items when an image tower runs live. ``per_item`` (with 'slots' only): the towers that
    drop nothing out, which run on each distinct item once (``ItemBatch.distinct``; the pixels are read for
    those alone)."""

    sequences: np.ndarray  # (users, L+1), ``SeqRecData.train_sequences``
    encoding: str
    pixels: PixelSource | None = None
    buckets: ShapeBuckets | None = None
    per_item: tuple[str, ...] = ()

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, not {self.encoding!r}")
        if self.per_item and self.encoding != "slots":
            raise ValueError(f"towers by distinct item {self.per_item} need the 'slots' encoding, "
                             f"not {self.encoding!r}")

    def __call__(self, users: Sequence[int] | np.ndarray) -> TrainBatch:
        seq = self.sequences[np.asarray(users)]  # (B, L+1)
        if self.encoding == "items":
            ids, inverse = np.unique(seq, return_inverse=True)
        elif self.encoding == "slots":
            flat = seq.reshape(-1)
            real = flat != 0
            ids = np.concatenate([[0], flat[real]]).astype(seq.dtype)
            inverse = np.zeros(flat.size, dtype=np.int64)
            inverse[real] = np.arange(1, int(real.sum()) + 1)  # padding slots: row 0
        else:
            ids, inverse = seq.reshape(-1), np.arange(seq.size)
        distinct, to_distinct = np.unique(ids, return_inverse=True) if self.per_item else (None, None)
        columns = None
        if self.buckets is not None:
            ids = self.buckets.pad(ids) if self.encoding != "all" else ids  # appended rows: no slot points at them
            columns = self.buckets.columns(ids)
        per_tower = {}
        if self.per_item:  # the padding rows are item 0, which is distinct row 0 ('slots' rows start with it)
            distinct = self.buckets.pad(distinct) if self.buckets is not None else distinct
            to_distinct = np.concatenate([to_distinct.reshape(-1), np.zeros(len(ids) - to_distinct.size, np.int64)])
            images = None if self.pixels is None or "image" not in self.per_item else self.pixels(distinct)
            per_tower = {"distinct": ItemBatch.from_numpy(distinct, images, columns, self.buckets is not None),
                         "to_distinct": host_tensor(to_distinct), "per_item": self.per_item}
        pixels = None if self.pixels is None or "image" in self.per_item else self.pixels(ids)
        items = ItemBatch.from_numpy(ids, pixels, columns, encode_all=self.buckets is not None, **per_tower)
        return TrainBatch(host_tensor(seq), items, host_tensor(inverse.reshape(-1)))


def without_padding_rows(batch: TrainBatch) -> TrainBatch:
    """A host batch as it would be without static shapes, titles cut the same: the items up to the last
    one a slot points at, only the real ones encoded. What padding adds is measured against it."""
    used = int(batch.inverse.max()) + 1
    items, kept = batch.items, first_rows(batch.items, used)
    if items.distinct is not None:  # its own padding rows go too
        to_distinct = items.to_distinct[:used]
        kept = replace(kept, distinct=first_rows(items.distinct, int(to_distinct.max()) + 1),
                       to_distinct=to_distinct, per_item=items.per_item)
    return TrainBatch(batch.seq, kept, batch.inverse)


def first_rows(items: ItemBatch, n: int) -> ItemBatch:
    """The first ``n`` rows of ``items``, only the real ones encoded (their positions all fall among them)."""
    return ItemBatch(items.ids[:n], None if items.pixels is None else items.pixels[:n], items.real,
                     items.title_columns)


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


def epoch_batches(order: np.ndarray, batch_size: int, collate: CollateTrain, start_step: int = 0):
    """The batches of ``order`` collated by ``collate``, skipping the ``start_step`` batches a resumed
    epoch had done. When images are read, the next batches are prepared in a background thread."""
    batches = TrainBatches(order, batch_size, collate, start_step)
    return Prefetch(batches) if collate.pixels is not None else batches
