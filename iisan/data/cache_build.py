"""Building the hidden-state cache: batched, memory-bounded, resumable and byte-reproducible.

The frozen encoders run over the items chunk by chunk (``chunk_size`` items). Each finished chunk is
written at once, atomically, as a shard ``<cache_dir>/.building/chunk-000012.safetensors`` holding the
pooled states of the selected layers only, beside a ``manifest.json`` that names the build (encoders,
layers, items, precision, chunk size). A build started again with the same settings keeps the shards
it finds and encodes only the missing chunks; a build with other settings discards them. At the end
each modality's file is streamed from the shards into ``<modality>.safetensors`` (tmp, then rename)
and the sidecar folder is removed.

Progress: a tqdm bar on a terminal, or where none can be shown (stderr is a batch job's log) a log line
at most every 30 seconds (``ProgressLog``); either way a last line with the speed once every chunk is
encoded (only that line with ``--no-progress``). SIGTERM (a preempted job) stops the build as Ctrl-C does.

Memory: one chunk's hidden states on the device and two chunks' pooled states in RAM (one being written
in the background while the next is computed), with up to three chunks of pixels read ahead; the final file
is written shard by shard, never held whole, with a canonical header (``tensorfiles.write_safetensors``):
two builds of the same cache are the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ..console import ProgressLog, sigterm_as_ctrl_c
from ..errors import CacheError, OutputError, parse_json
from ..files import (
    TEMPORARY,
    atomic_path,
    failure_reason,
    only_temporaries_of,
    put_back_on_failure,
    remove,
    shown_bytes,
    stale_temporaries,
    write_failure,
    write_json_atomic,
)
from ..streams import bar_disable
from ..tensorfiles import raw_bytes, write_safetensors
from .batches import ItemBatch, PixelSource, item_chunks
from .cache import SIDECAR, UNTOLD_SINCE, VOLATILE, cache_file, nonfinite_rows, require_cache_space

log = logging.getLogger(__name__)
CHUNK = re.compile(r"chunk-\d{6,}\.safetensors")  # a shard's name (``ShardDir.shard``)

BUILD_FORMAT = "iisan-cache-build/1"


def write_together(files: dict[Path, tuple[dict, Iterable[tuple[str, torch.Tensor]], dict[str, str]]]) -> None:
    """The files of one cache (path -> ``write_safetensors``' specs, parts and metadata), each written to a
    temporary, then all renamed at the end: a stop while writing leaves the earlier files as they were, and so
    does a rename that fails (the files renamed before it are put back: ``put_back_on_failure``), never a new
    text file beside an old image file."""
    with put_back_on_failure(*files), ExitStack() as stack:
        for path, (specs, parts, metadata) in files.items():
            write_safetensors(stack.enter_context(atomic_path(path)), specs, parts, metadata, atomic=False)


# --------------------------------------------------------------------------------------------------
# shards of a build in progress


def manifest_in(sidecar: Path) -> dict | None:
    """The manifest of the build in progress at ``sidecar`` (None when there is none of ours). One this user may
    not read is refused: it may be ours, so it is not taken for another's folder. A link there is not ours
    (a build makes a folder), whatever it points to."""
    manifest = sidecar / "manifest.json"
    if sidecar.is_symlink():
        return None
    try:
        found = parse_json(manifest.read_text(encoding="utf-8"))
    except PermissionError as err:
        raise OutputError(f"{manifest} cannot be read ({failure_reason(err)}): make it readable, or move {sidecar} "
                          "away") from None
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("format") == BUILD_FORMAT else None


def discard_partial_build(out_dir: str | Path, left: bool = False) -> bool:
    """Remove the build in progress in ``out_dir`` (ours: it has our manifest), whatever its settings, so
    that the next build starts from nothing; True if there was one. ``left``: one left behind by a build whose
    cache is whole, which stays where it cannot be removed (another user's: the build that left it said so)."""
    sidecar = Path(out_dir) / SIDECAR
    if manifest_in(sidecar) is None:
        return False
    try:
        remove_build(sidecar)
    except OutputError:
        if not left:
            raise
    return True


def remove_build(path: Path) -> None:
    """Remove a build folder of ours (``.building``); one that cannot be (another user's files) is an error
    naming the file in it, not that file's bare name, as ``shutil.rmtree`` says it."""
    try:
        shutil.rmtree(path)
    except OSError as err:  # rmtree names a file inside by its bare name, the folder itself as given
        name = err.filename if isinstance(err.filename, str) else ""
        full = name if os.path.isabs(name) or os.path.normpath(name) == os.path.normpath(path) else str(path / name)
        inside = f" ({full})" if name and os.path.normpath(full) != os.path.normpath(path) else ""
        raise OutputError(f"could not remove {path}, a cache build's folder{inside}: {failure_reason(err)}; "
                          "remove it by hand, or build into another --cache-dir") from None


class ShardDir:
    """``<out_dir>/.building``: the manifest and one shard per finished chunk."""

    def __init__(self, out_dir: Path, key: str, chunks: int, chunk_size: int, earlier_keys: frozenset = frozenset()):
        self.path = Path(out_dir) / SIDECAR
        self.manifest = {"format": BUILD_FORMAT, "key": key, "chunks": chunks, "chunk_size": chunk_size}
        self.earlier_keys = earlier_keys  # the same settings as versions that recorded fewer keys named them

    def shard(self, k: int) -> Path:
        return self.path / f"chunk-{k:06d}.safetensors"

    def open(self) -> None:
        """Keep the shards of an interrupted build with the same settings; discard those of a build with
        other settings. Anything else found at the sidecar's path is not ours, and is refused."""
        if os.path.lexists(self.path):
            found = manifest_in(self.path)
            if found == self.manifest:
                return
            if found is not None and str(found.get("key")) in self.earlier_keys and \
                    found == {**self.manifest, "key": found["key"]}:
                log.info("%s: resuming a build an earlier version began", self.path)
                write_json_atomic(self.path / "manifest.json", self.manifest)
                return
            # without a manifest, ours only when empty or holding the manifest's temporary (a build killed then),
            # or chunks (a build that another node's, finished, removed the manifest of: node-local locks)
            if found is None and not (self.path.is_dir() and not self.path.is_symlink() and
                                      (only_temporaries_of(self.path, "manifest.json") or only_chunks(self.path))):
                raise OutputError(f"{self.path} exists and is not a cache build in progress (no {BUILD_FORMAT} "
                                  "manifest); IISAN replaces only what it wrote itself: move it away")
            if found is not None:
                log.info("%s holds a partial build for other settings; discarding it", self.path)
            remove_build(self.path)
        try:
            self.path.mkdir(parents=True)
        except OSError as err:
            raise write_failure(self.path, err) from None
        write_json_atomic(self.path / "manifest.json", self.manifest)

    def done(self, k: int, ids: np.ndarray, modalities: Iterable[str]) -> bool:
        """Shard k exists, is readable, its data bytes match the sha256 recorded in its metadata when it
        was written, it covers exactly ``ids`` and holds ``modalities`` (a torn, stray or altered file is
        redone; an unaltered one holds what was written, and every state was checked finite then)."""
        try:
            with safe_open(str(self.shard(k)), framework="pt") as fh:
                if (fh.metadata() or {}).get("sha256") != _data_sha256(self.shard(k)):
                    log.warning("%s does not match the sha256 it was written with (altered); redoing it",
                                self.shard(k))
                    return False
                return torch.equal(fh.get_tensor("ids"), torch.from_numpy(ids)) and set(modalities) <= set(fh.keys())
        except Exception:  # missing or damaged: safetensors raises its own error types
            return False

    def write(self, k: int, ids: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        """Write shard k atomically, with the sha256 of its data bytes (the tensors in sorted name order,
        as ``write_safetensors`` lays them out) in its metadata, for ``done`` to check."""
        tensors = {"ids": ids, **states}
        specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
        digest = hashlib.sha256()
        for n in sorted(tensors):
            digest.update(raw_bytes(tensors[n]))
        write_safetensors(self.shard(k), specs, ((n, tensors[n]) for n in sorted(tensors)),
                          {"sha256": digest.hexdigest()}, bulk=True)  # (checked by its digest when resumed)

    def read(self, k: int, modality: str) -> torch.Tensor:
        try:
            with safe_open(str(self.shard(k)), framework="pt") as fh:
                return fh.get_tensor(modality)
        except FileNotFoundError:  # (checked whole by ``done`` before: what else can go is the file itself)
            raise CacheError(f"{self.shard(k)} went away while this build assembled its cache: another process, on "
                             "another node where locks do not reach (docs/robust_runs.md), built or removed this "
                             "folder's cache; run the same command again") from None


def only_chunks(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but chunks ``ShardDir.write`` wrote (by their names and the sha256 in their
    metadata) and temporaries of them or of the manifest."""
    def chunk(path: Path) -> bool:
        if (found := TEMPORARY.match(path.name)) and (CHUNK.fullmatch(found.group("name")) or
                                                      found.group("name") == "manifest.json"):
            return True
        try:
            with safe_open(str(path), framework="pt") as fh:
                return bool(CHUNK.fullmatch(path.name)) and "sha256" in (fh.metadata() or {})
        except Exception:  # no safetensors file: safetensors raises its own error types
            return False
    return all(chunk(p) for p in folder.iterdir())


def _data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's data bytes (all that follows its header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + length)
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checked(states: torch.Tensor, dtype: torch.dtype, ids: torch.Tensor, item_ids: list[str], m: str):
    """Cast to the stored precision where the states are (on a GPU: half the bytes to copy back, no
    CPU cast); refuse NaN states and values that overflow it (fp16 tops at 65504, and LLM hidden states
    can exceed that). Returns the stored states on the host."""
    stored = states.to(dtype)
    if len(bad := nonfinite_rows(stored)):
        row = int(bad[0])
        stored_as = str(dtype).removeprefix("torch.")
        why = ("NaN" if torch.isnan(states[row]).any() else "infinite values as the encoder computed them"
               if torch.isinf(states[row]).any() else f"values beyond {stored_as}'s range")
        hint = "; store as --cache-dtype bfloat16 or float32" if why.startswith("values beyond") else ""
        raise CacheError(f"{m} states of item {item_ids[int(ids[row])]!r} hold {why}{hint}")
    return stored.cpu()


# --------------------------------------------------------------------------------------------------
# the build


@torch.no_grad()
@sigterm_as_ctrl_c()  # while encoding and while writing the final files
def build_caches(encode: Callable[[ItemBatch], dict[str, torch.Tensor]], shapes: dict[str, tuple[int, int]],
                 metadata: dict[str, dict[str, str]], item_ids: list[str], out_dir: str | Path, *,
                 chunk_size: int, device: torch.device, dtype: torch.dtype, pixels: PixelSource | None = None,
                 progress: bool = True,
                 timings: dict | None = None) -> dict[str, Path]:
    """Run ``encode`` once over items 1..len(item_ids)-1 and write one cache file per modality.

    ``encode(batch)`` gives ``{modality: (n, layers, width)}`` for an ``ItemBatch`` on ``device`` (the
    live feed: the states are exactly what training reads live); ``shapes`` names each modality's
    (layers, width) and ``metadata`` its final file's metadata. ``item_ids[0]`` is padding (""),
    stored as a zero row. Resumable: see the module docstring. Chunk k's shard is written in a
    background thread while the device encodes chunk k + 1 (one write in flight; its errors surface
    at the next chunk). ``timings``, if given, receives ``encode_seconds`` (reading, encoding and
    writing the shards) and ``assemble_seconds`` (streaming the shards into the final files)."""
    out_dir = Path(out_dir)
    indices = np.arange(1, len(item_ids), dtype=np.int64)
    n_chunks = math.ceil(len(indices) / chunk_size)
    chunk_ids = [indices[k * chunk_size : (k + 1) * chunk_size] for k in range(n_chunks)]
    # What the shards hold: the settings, not where the encoder's files are or their times (a model copied to
    # a node's scratch disk, touched or rsynced is the same model: its weights digest says so).
    settings = {m: {k: v for k, v in meta.items() if k not in VOLATILE} for m, meta in metadata.items()}
    def key_of(values: dict) -> str:
        return hashlib.sha256(json.dumps([values, chunk_size], sort_keys=True).encode()).hexdigest()

    # a build an earlier version began recorded only the UNTOLD keys of its day: resumed, as it would have been
    key = key_of(settings)
    earlier = {key_of({m: {k: v for k, v in s.items() if k not in UNTOLD_SINCE[n:]} for m, s in settings.items()})
               for n in range(len(UNTOLD_SINCE))} - {key}
    shards = ShardDir(out_dir, key, n_chunks, chunk_size, frozenset(earlier))
    shards.open()
    for m in shapes:  # left by a build that was killed while writing (the caller holds the folder's lock)
        for stale in stale_temporaries(cache_file(out_dir, m)):
            remove(stale)
    todo = [k for k in range(n_chunks) if not shards.done(k, chunk_ids[k], shapes)]
    if len(todo) < n_chunks:
        log.info("resuming the cache build in %s: %d of %d chunks already done", shards.path,
                 n_chunks - len(todo), n_chunks)
    total = len(indices)
    already = total - sum(len(chunk_ids[k]) for k in todo)
    final = sum(len(item_ids) * layers * width for layers, width in shapes.values()) * dtype.itemsize
    # the shards still to write, then the files
    require_cache_space(out_dir, final + final * (total - already) // max(total, 1), shapes, total, dtype)
    bar = tqdm(total=total, initial=already, desc="cache", unit="item", disable=bar_disable(progress),
               leave=False)  # (the summary line after it says what it counted)
    # tqdm shows no bar where stderr is not a terminal (a batch job's log): log lines take its place
    lines = ProgressLog(f"cache ({', '.join(shapes)})", total, already, unit="items",
                        every=30.0 if progress and bar.disable else math.inf)
    start = time.perf_counter()
    with bar, ThreadPoolExecutor(1, thread_name_prefix="iisan-cache-writer") as writer:
        pending = None
        for k, batch in zip(todo, item_chunks(indices, chunk_size, pixels, only=todo), strict=True):
            states = encode(batch.to(device))
            ids = batch.ids.cpu()
            stored = {m: _checked(states[m], dtype, ids, item_ids, m) for m in shapes}
            if pending is not None:
                pending.result()
            pending = writer.submit(shards.write, k, ids, stored)
            bar.update(len(ids))
            lines.advance(len(ids))
        if pending is not None:
            pending.result()
    lines.finish()
    encoded = time.perf_counter()

    paths = {m: cache_file(out_dir, m) for m in shapes}
    files = {}
    for m, (layers, width) in shapes.items():
        zero_row = torch.zeros(1, layers, width, dtype=dtype)  # index 0: padding
        parts = (("states", block) for block in [zero_row, *(shards.read(k, m) for k in range(n_chunks))])
        files[paths[m]] = ({"states": (dtype, (len(item_ids), layers, width))}, parts, metadata[m])
    write_together(files)
    for m, (layers, width) in shapes.items():
        log.info("wrote %s: %s items x %d layers x %d (%s, %s)", paths[m], f"{total:,}", layers, width,
                 metadata[m]["dtype"], shown_bytes(paths[m].stat().st_size))  # as the space check says sizes
    try:  # the cache is whole: a build folder left is said, not an error
        remove_build(shards.path)
    except OutputError as err:
        log.warning("%s (the cache is complete)", err)
    if timings is not None:
        timings.update(encode_seconds=encoded - start, assemble_seconds=time.perf_counter() - encoded)
    return paths
