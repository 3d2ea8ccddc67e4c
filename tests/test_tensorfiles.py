"""safetensors files of this project are the same bytes for the same inputs: safetensors' own writer orders
metadata keys at random, so a run's best weights or an export written twice differed, and `sha256sum`,
`make` or `rsync -c` could not tell a rerun from a change."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from iisan.tensorfiles import save_safetensors_atomic, write_safetensors


def test_the_same_tensors_and_metadata_are_written_as_the_same_bytes_and_read_back_whole(tmp_path):
    tensors = {"weights": torch.randn(3, 5), "half": torch.randn(4).bfloat16(), "ids": torch.arange(6),
               "double": torch.randn(2, dtype=torch.float64), "mask": torch.tensor([True, False]),
               "pixels": torch.arange(8, dtype=torch.uint8).reshape(2, 4)[:, ::2],  # a strided view
               "param": torch.nn.Parameter(torch.ones(2)), "empty": torch.zeros(0), "none": torch.zeros(0, 4),
               "u16": torch.tensor([1, 2], dtype=torch.int32).to(torch.uint16)}
    metadata = {f"key{i}": f"value {i}" for i in range(24)}
    save_safetensors_atomic(tensors, tmp_path / "a.safetensors", metadata)
    save_safetensors_atomic(tensors, tmp_path / "b.safetensors", dict(reversed(metadata.items())))  # other order
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0  # the data starts 8-byte aligned
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as fh:
        assert fh.metadata() == metadata and set(fh.keys()) == set(tensors)
    for name, tensor in load_file(str(tmp_path / "a.safetensors")).items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name].detach()), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary left


def test_a_path_that_is_not_utf8_is_kept_as_escapes_and_what_cannot_be_written_is_refused(tmp_path):
    """A command-line path's undecodable bytes (lone surrogates in Python) are written as \\xNN, which
    safetensors' reader takes; a block of another dtype than declared, or a tensor named like the header's
    metadata, is refused before a file exists."""
    save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "w.safetensors", {"run_dir": "/data/r\udcff"})
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"run_dir": "/data/r\\xff"}
    with pytest.raises(ValueError, match="got a torch.float64 block of 'w' while writing 'w'"):
        write_safetensors(tmp_path / "x.safetensors", {"w": (torch.float32, (2,))},
                          [("w", torch.ones(2, dtype=torch.float64))], {})
    with pytest.raises(ValueError, match="a tensor may not be named __metadata__"):
        save_safetensors_atomic({"__metadata__": torch.ones(1)}, tmp_path / "y.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_a_header_longer_than_a_safetensors_reader_takes_is_refused_before_anything_is_written(tmp_path):
    """A catalog's item ids, as a cache or an export records them, passed safetensors' 100 MB header limit at some
    millions of items: the file was written (after hours of encoding) and no reader could open it."""
    from iisan.errors import OutputError
    from iisan.tensorfiles import HEADER_LIMIT, header_bytes

    tensors = {"states": torch.zeros(2, 3)}
    bare = len(header_bytes(tmp_path / "x", {"states": (torch.float32, (2, 3))}, {"item_ids": ""})[0])
    fits = {"item_ids": "x" * (HEADER_LIMIT - bare)}  # the longest header a reader takes
    save_safetensors_atomic(tensors, tmp_path / "fits.safetensors", fits)
    with safe_open(str(tmp_path / "fits.safetensors"), framework="pt") as fh:
        assert fh.metadata() == fits
    over = {"item_ids": fits["item_ids"] + "x" * 8, "format": "f"}  # 8 more bytes, as the header is padded to 8
    with pytest.raises(OutputError) as refused:
        save_safetensors_atomic(tensors, tmp_path / "over.safetensors", over)
    assert str(refused.value) == (
        f"could not write {tmp_path / 'over.safetensors'}: its header would take 100.0 MB, 100.0 MB of them its "
        "'item_ids', and a safetensors reader takes at most 100.0 MB: give the items (or users) shorter ids, or "
        "fewer of them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.safetensors"]  # no temporary left either
