"""Standing rules over the project's own files: no pickle, no unsafe torch.load, no shell strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]


def unsafe_torch_loads(source: str) -> list[int]:
    """Lines of calls to ``torch.load`` (also through ``import torch as t`` or ``from torch import load``)
    that do not spell ``weights_only=True``."""
    tree = ast.parse(source)
    modules, functions = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            functions |= {a.asname or a.name for a in node.names if a.name == "load"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        loads = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                 and f.value.id in modules) or (isinstance(f, ast.Name) and f.id in functions)
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords)
        if loads and not safe:
            lines.append(node.lineno)
    return lines


def test_the_torch_load_check_finds_unsafe_calls_however_spelt():
    planted = ("import torch\nimport torch as t\nfrom torch import load as fetch\n"
               "torch.load(p, weights_only=True)\ntorch.load(p)\nt.load(p, weights_only=False)\n"
               "fetch(p, **kw)\nf(torch.load(open(p), map_location='cpu'), weights_only=True)\n")
    assert unsafe_torch_loads(planted) == [5, 6, 7, 8]


def test_no_pickle_and_no_unsafe_torch_load():
    assert FILES
    for path in FILES:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import cPickle)|pickle\.loads?\(", text, re.M), path
        assert not unsafe_torch_loads(text), (path, unsafe_torch_loads(text))
        shell_calls = ("os." + "system(", "shell" + "=True")  # spelt apart so this file does not match itself
        assert not any(call in text for call in shell_calls), path


def test_every_from_pretrained_call_refuses_remote_code():
    """Direct calls spell ``trust_remote_code=False``; Auto classes passed to ``encoder_loading.load_from_folder`` are
    loaded by its one call, which spells it too (next test)."""
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
    assert set(passed_on) - {c[0] for c in calls} <= {"iisan/model/backbones.py", "iisan/model/encoder_loading.py"}


def test_the_loader_wrapper_never_trusts_remote_code_nor_fetches_unasked(tiny):
    from iisan.model.encoder_loading import load_from_folder

    seen = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append((path, kwargs))

    load_from_folder(Recorder, tiny["text_model"], "text encoder")
    load_from_folder(Recorder, "org/model", "text encoder", allow_download=True)
    assert seen == [(tiny["text_model"], {"trust_remote_code": False, "local_files_only": True}),
                    ("org/model", {"trust_remote_code": False, "local_files_only": False})]
