"""`iisan params --random-backbones base`: trainable counts of every method against the authors'."""

from __future__ import annotations

import re

import pytest

from iisan.cli.main import main

# The authors' code (their parameter log, `trainable_num`): FFT 194.90 M, Adapter 4.97 M, BitFit 0.41 M, IISAN 4.11 M.
AUTHORS = {"fft": 194.90e6, "adapter": 4.97e6, "bitfit": 0.41e6, "iisan": 4.11e6}


def trainable(method: str, capsys) -> tuple[int, int]:
    main(["params", "--method", method, "--random-backbones", "base"])
    line = capsys.readouterr().out
    found = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ", line)
    assert found, line
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


@pytest.mark.parametrize("method", sorted(AUTHORS))
def test_counts_match_the_authors_within_one_percent(method, capsys):
    count, total = trainable(method, capsys)
    assert count == pytest.approx(AUTHORS[method], rel=0.01)
    assert total >= 195_000_000  # both base backbones are counted


def test_lora_differs_from_the_authors_by_the_qv_biases_they_left_trainable(capsys):
    count, _ = trainable("lora", capsys)
    # r (768 + 768) per wrapped Q or V, 2 per layer, 12 layers, 2 towers, + heads, com_dense and SASRec
    assert count == 8 * 1536 * 48 + 2 * (768 * 64 + 64) + (128 * 64 + 64) + 100_224 == 796_736
    assert count + 48 * 768 == 833_600  # the authors' 0.83 M: their loralib layers trained the Q/V biases
