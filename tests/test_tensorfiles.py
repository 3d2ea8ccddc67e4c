"""safetensors files of this project are the same bytes for the same inputs: safetensors' own writer orders
metadata keys at random, so a run's best weights or an export written twice differed, and `sha256sum`,
`make` or `rsync -c` could not tell a rerun from a change."""

from __future__ import annotations

import torch
from safetensors import safe_open

from iisan.tensorfiles import save_safetensors_atomic


def test_the_same_tensors_and_metadata_are_written_as_the_same_bytes_and_read_back_whole(tmp_path):
    tensors = {"weights": torch.randn(3, 5), "half": torch.randn(4).bfloat16(), "ids": torch.arange(6),
               "mask": torch.tensor([True, False]), "pixels": torch.arange(8, dtype=torch.uint8).reshape(2, 4)[:, ::2]}
    metadata = {f"key{i}": f"value {i}" for i in range(24)}
    for name in ("a.safetensors", "b.safetensors"):
        save_safetensors_atomic(tensors, tmp_path / name, metadata)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as fh:
        assert fh.metadata() == metadata and set(fh.keys()) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(fh.get_tensor(name), tensor), name  # (a strided view written as its values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no temporary left
