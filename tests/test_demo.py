"""The embedded demo: synthetic data, tiny models, LMDB, cache, cached IISAN beats most-popular."""

from __future__ import annotations

import pytest

from iisan.cli.main import main


@pytest.mark.slow
def test_demo_beats_the_popularity_baseline(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"])  # exits 1 if it does not beat it
    out = capsys.readouterr().out
    assert "IISAN beats the most-popular baseline on test" in out
    assert out.startswith("IISAN demo: ")  # no blank line first in a redirected stdout (it goes to stderr)
    assert (tmp_path / "demo" / "images.lmdb").is_dir()
    assert (tmp_path / "demo" / "cache" / "text.safetensors").is_file()
