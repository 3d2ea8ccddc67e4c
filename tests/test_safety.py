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


def test_every_from_pretrained_call_refuses_remote_code():
    """Direct calls spell ``trust_remote_code=False``; Auto classes passed to ``backbones._load`` are
    loaded by its one call, which spells it too (next test)."""
    import ast

    calls, passed_on = [], []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "from_pretrained":
                safe = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords)
                calls.append((str(path.relative_to(ROOT)), node.lineno, safe))
            elif isinstance(node, ast.Attribute) and node.attr == "from_pretrained":
                passed_on.append(str(path.relative_to(ROOT)))
    assert calls and all(safe for *_, safe in calls), [c for c in calls if not c[2]]
    assert set(passed_on) - {c[0] for c in calls} <= {"iisan/model/backbones.py"}


def test_the_loader_wrapper_never_trusts_remote_code_nor_fetches_unasked(tiny):
    from iisan.model.backbones import _load

    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append((path, kwargs))

    _load(Recorder, tiny["text_model"], "text encoder")
    _load(Recorder, "org/model", "text encoder", allow_download=True)
    assert seen == [(tiny["text_model"], {"trust_remote_code": False, "local_files_only": True}),
                    ("org/model", {"trust_remote_code": False, "local_files_only": False})]
