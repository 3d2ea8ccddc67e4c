"""The two feeds of per-layer backbone states. The SAN never knows which one it reads.

- ``LiveStates``: frozen encoders run on token ids and LMDB pixels (no autograd graph kept for them).
- ``CachedStates``: a gather from the safetensors cache, resident on the device.

Both map an ``ItemBatch`` of item indices to ``{'text': (U, kt, dt), 'image': (U, ki, di)}``, with
zeros for index 0 (padding). The cache is built by running ``LiveStates`` over every item, so the two
agree by construction (a test checks it to 1e-5 in fp32).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .backbones import FrozenEncoder, pixels_to_input
from .data.images import ImageStore


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
    the device catches up, every step)."""

    ids: torch.Tensor
    pixels: torch.Tensor | None = None
    real: torch.Tensor | None = None

    @classmethod
    def from_numpy(cls, ids: np.ndarray, pixels: torch.Tensor | None = None) -> ItemBatch:
        return cls(host_tensor(ids), pixels, host_tensor(np.flatnonzero(ids)))

    def real_positions(self) -> torch.Tensor:
        return self.real if self.real is not None else torch.nonzero(self.ids != 0).squeeze(1)

    def to(self, device: torch.device) -> ItemBatch:
        def move(x):
            return None if x is None else x.to(device, non_blocking=True)

        return ItemBatch(move(self.ids), move(self.pixels), move(self.real))


class PixelSource:
    """Pixels of items by index, read from an LMDB keyed by item id (index 0 and absent ids: blank).

    A pool of threads copies records straight from LMDB's memory map into one (pinned, when working
    on a GPU) tensor: one copy per image, no JPEG decoding, no inter-process transfer. Reading a
    batch of ~350 images at 224 px is ~50 MB of memcpy."""

    def __init__(self, store: ImageStore, item_ids: list[str], threads: int = 4):
        self.store = store
        self.item_ids = item_ids
        self.threads = max(1, min(threads, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None

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
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="iisan-pixels")
        jobs = [self._pool.submit(self.store.get, keys[p[0]: p[-1] + 1], view[p[0]: p[-1] + 1])
                for p in parts if len(p)]
        for job in jobs:
            job.result()
        return out

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
                    raise item
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


class LiveStates(nn.Module):
    """Frozen encoders over items' inputs. ``tokens``/``attention`` (N+1, T) index the item list."""

    def __init__(self, encoders: dict[str, FrozenEncoder], tokens: torch.Tensor | None = None,
                 attention: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None,
                 text_dropout: bool = False):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("attention", attention, persistent=False)
        self.amp_dtype = amp_dtype
        self.text_dropout = text_dropout
        self.needs_pixels = "image" in encoders

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
        ids = items.ids
        real = items.real_positions()  # padding (index 0) gets zeros, never an encoder pass
        device = ids.device
        enabled = self.amp_dtype is not None and device.type == "cuda"
        out = {}
        for name, encoder in self.encoders.items():
            states = torch.zeros(len(ids), len(encoder.layers), encoder.width, device=device)
            if len(real):
                with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=enabled):
                    if name == "text":
                        inputs = {"input_ids": self.tokens[ids[real]], "attention_mask": self.attention[ids[real]]}
                    else:
                        pixels = pixels_to_input(items.pixels[real], encoder.norm, encoder.dtype)
                        inputs = {"pixel_values": pixels}
                    states[real] = encoder.layer_states(**inputs).float()
            out[name] = states
        return out


class CachedStates(nn.Module):
    """Tables (N+1, k, d) per modality, kept on the device in their stored dtype (fp16 by default)."""

    needs_pixels = False

    def __init__(self, tables: dict[str, torch.Tensor]):
        super().__init__()
        self.names = tuple(tables)
        for name, table in tables.items():
            self.register_buffer(f"table_{name}", table, persistent=False)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: tuple(getattr(self, f"table_{m}").shape[1:]) for m in self.names}

    def forward(self, items: ItemBatch) -> dict[str, torch.Tensor]:
        return {m: getattr(self, f"table_{m}")[items.ids].float() for m in self.names}
