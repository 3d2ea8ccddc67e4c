"""Standing rules over the project's own files: no pickle, no unsafe torch.load, no shell strings."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]


def test_no_pickle_and_no_unsafe_torch_load():
    assert FILES
    for path in FILES:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import cPickle)|pickle\.loads?\(", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        shell_calls = ("os." + "system(", "shell" + "=True")  # spelt apart so this file does not match itself
        assert not any(call in text for call in shell_calls), path
