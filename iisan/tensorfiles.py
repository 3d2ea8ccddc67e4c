"""safetensors files written the same bytes for the same inputs (the format: a u64 header length, a JSON header,
then raw little-endian data). safetensors' own writer orders metadata keys at random, so two writes of the same
tensors and metadata (a cache built twice, a run's best weights, an export) would otherwise differ in their bytes,
and a rerun could not be told from a change by ``sha256sum``, ``make`` or ``rsync -c``."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import torch

from .errors import OutputError
from .files import atomic_path

CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
         torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16",
         torch.uint8: "U8", torch.bool: "BOOL"}  # safetensors' names


HEADER_LIMIT = 100_000_000  # the longest header safetensors reads ("header too large" past it; 0.4 to 0.8 alike)


def header_bytes(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header ``write_safetensors`` writes for ``specs`` and ``metadata``, padded, and each tensor's bytes.
    One over ``HEADER_LIMIT``, which no reader would take, is refused in one line naming its longest metadata
    (a catalog's item ids, millions of them): checked before the work that would fill the file, where it can be."""
    if "__metadata__" in specs:
        raise ValueError(f"{path}: a tensor may not be named __metadata__ (the header's metadata)")
    # A path from the command line may hold bytes that are not UTF-8 (Python keeps them as lone surrogates),
    # which safetensors' reader refuses in a header: they are written as \xNN escapes instead.
    header: dict = {"__metadata__": {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                                     for k, v in metadata.items()}}
    sizes, offset = {}, 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        sizes[name] = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors' writer pads it
    if len(raw) > HEADER_LIMIT:
        key = max(metadata, key=lambda k: len(metadata[k]), default="")
        raise OutputError(f"could not write {path}: its header would take {len(raw) / 1e6:,.1f} MB, "
                          f"{len(metadata.get(key, '')) / 1e6:,.1f} MB of them its {key!r}, and a safetensors "
                          f"reader takes at most {HEADER_LIMIT / 1e6:.1f} MB: give the items (or users) shorter ids, "
                          "or fewer of them")
    return raw, sizes


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      parts: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str], atomic: bool = True,
                      bulk: bool = False) -> None:
    """Write ``path`` atomically (``atomic=False``: ``path`` is a temporary the caller renames; ``bulk``: one of
    many files in a folder, as ``atomic_path`` takes it). ``specs``
    name -> (dtype, shape); ``parts`` yields (name, block) pieces of each tensor in order (row blocks of a
    row-major array), so a table is never held whole. Tensors are laid out in sorted name order and the
    header is sorted JSON: same inputs, same bytes (``header_bytes``)."""
    raw, sizes = header_bytes(path, specs, metadata)
    written = dict.fromkeys(specs, 0)
    order = iter(sorted(specs))
    current = next(order, None)
    with atomic_path(path, bulk=bulk) if atomic else nullcontext(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, block in parts:
            while current is not None and current != name and written[current] == sizes[current]:
                current = next(order, None)
            if name != current or block.dtype != specs[name][0]:
                raise ValueError(f"{path}: got a {block.dtype} block of {name!r} while writing {current!r}")
            written[name] += fh.write(raw_bytes(block))
        if written != sizes:
            raise ValueError(f"{path}: wrote {written} bytes, the header declares {sizes}")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """``tensors`` and ``metadata`` written to ``path`` atomically, as ``write_safetensors`` lays them out."""
    write_safetensors(Path(path), {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()},
                      ((name, tensors[name]) for name in sorted(tensors)), metadata)
