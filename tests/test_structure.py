"""The package's shape: imports point only downwards (data -> model -> evaluate -> train -> experiments
and efficiency -> cli, over a base of small modules), with no cycle anywhere, every module stays short,
every import inside a function says why it is there, no script imports another script, and the ranking
metrics are named in one module."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "iisan"
MAX_LINES = 350

# Layers, lowest first: a module may import from its own layer (no cycles) or from lower ones only.
LAYERS = {
    "errors": 0, "bounds": 1, "methods": 1, "metric_names": 1, "config": 1, "files": 1, "digests": 1, "locks": 1,
    "devices": 1, "memory": 1, "tensorfiles": 1, "once": 0, "spelling": 0,
    "claims": 2, "precedence": 2, "streams": 2, "flags": 2, "provenance": 2, "console": 2, "system_errors": 2,
    "distributed": 2, "logfiles": 2, "isolate": 3,
    "data": 3, "model": 4, "evaluate": 5, "train": 6, "experiments": 7, "efficiency": 7, "cli": 8, "__main__": 9,
    "__init__": 0,
}
SCRIPT_DIRS = ("scripts", "Code_Cached", "Code_Uncached", "Dataset")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """``(imported iisan module, node, inside a function)`` for every import of an iisan module."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    known = modules()
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                for alias in child.names:  # ``from . import distributed`` imports a module
                    candidate = f"{target}.{alias.name}"
                    found.append((candidate if candidate in known else target, child, in_function))
            elif isinstance(child, ast.Import):
                found.extend((alias.name, child, in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return [(name, node, inner) for name, node, inner in found if name.split(".")[0] == "iisan"]


def room(module: str) -> str:
    """The subpackage or base module of ``iisan.<room>...`` ('' for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def layer(module: str) -> int:
    return LAYERS[room(module) or "__init__"]


def test_the_package_is_read_as_expected():
    found = modules()
    assert {"iisan.train.trainer", "iisan.model.build", "iisan.data.batches", "iisan.cli.main"} <= set(found)
    edges = {(m, t) for m, p in found.items() for t, _, _ in imports(p)}
    assert ("iisan.train.trainer", "iisan.model.build") in edges
    assert ("iisan.train.trainer", "iisan.distributed") in edges  # ``from .. import distributed``


def test_imports_point_only_downwards():
    upward = []
    for name, path in modules().items():
        for target, node, _ in imports(path):
            if target in modules() and layer(target) > layer(name):
                upward.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not upward, upward


def test_no_import_cycles_between_modules():
    found = modules()
    graph = {name: sorted({t for t, _, _ in imports(path) if t in found and t != name})
             for name, path in found.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            walk(name, [name])
    assert not cycles, cycles


SIBLINGS = ("experiments", "efficiency")  # one layer, side by side: neither imports the other


def test_experiments_and_efficiency_do_not_import_each_other():
    crossing = [f"{path.relative_to(ROOT)}:{node.lineno} imports {target}"
                for name, path in modules().items() for target, node, _ in imports(path)
                if {room(name), room(target)} == set(SIBLINGS)]
    assert not crossing, crossing


def test_the_checks_find_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above would pass vacuously if they read nothing: planted faults must be seen."""
    fake = tmp_path / "iisan"
    for package in ("data", "train"):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("def f():\n    from .b import g  # planted\n")
    (fake / "data" / "b.py").write_text("from .a import f\n")
    (fake / "data" / "c.py").write_text("from ..train.loop import run\n")
    (fake / "train" / "loop.py").write_text("def run():\n    pass\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"iisan\.data\.a"):
        test_no_import_cycles_between_modules()
    with pytest.raises(AssertionError, match=r"iisan/data/c\.py:1 imports iisan\.train\.loop"):
        test_imports_point_only_downwards()
    (fake / "efficiency").mkdir()
    (fake / "experiments").mkdir()
    (fake / "efficiency" / "bench.py").write_text("from ..experiments.table import rows\n")
    (fake / "experiments" / "table.py").write_text("rows = []\n")
    with pytest.raises(AssertionError, match=r"iisan/efficiency/bench\.py:1 imports iisan\.experiments\.table"):
        test_experiments_and_efficiency_do_not_import_each_other()


def test_each_package_docstring_names_its_modules():
    """A subpackage's docstring is its map: every module in it is named there (as ``name``), and the
    package's own docstring names every base module."""
    unnamed = []
    for package in sorted(p.parent for p in PACKAGE.rglob("__init__.py")):  # nested ones too
        text = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        inside = [p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")]
        unnamed += [f"{package.name}/{stem}.py" for stem in sorted(inside) if f"``{stem}``" not in text]
    assert not unnamed, f"name each in its package's __init__.py docstring as ``module`` (what it holds): {unnamed}"


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_import_inside_a_function_says_why():
    """On its line or in a comment just above; a run of imports shares the comment above its first."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        first = inner.lineno - 1
                        while lines[first - 1].strip().startswith(("from ", "import ")) and "#" not in lines[first]:
                            first -= 1
                        line, before = lines[first], lines[first - 1].strip()
                        if "#" not in line and not before.startswith("#"):
                            silent.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}")
    assert not silent, silent


def test_no_script_imports_another_script():
    scripts = [p for d in SCRIPT_DIRS for p in (ROOT / d).rglob("*.py")]
    stems = {p.stem for p in scripts}
    assert {"benchmark_efficiency", "run_IISAN", "build_lmdb", "preprocess_vectors"} <= stems
    offenders = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in stems]
        text = path.read_text()
        assert "sys.path.insert(0, str(ROOT / " not in text, f"{path} puts another script folder on sys.path"
    assert not offenders, offenders


METRIC_NAME = re.compile(r"(valid_|test_)?[a-z]+@\d+")  # hit@10, ndcg@20, and any kind to come


def metric_names_spelled_out(paths: list[Path]) -> list[tuple[Path, int, str]]:
    """``(file, line, name)`` for every string that is a metric's name (``hit@10``, ``valid_ndcg@20``)."""
    return [(path, node.lineno, node.value) for path in paths for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and METRIC_NAME.fullmatch(node.value)]


def test_the_metrics_are_named_in_metric_names_alone(tmp_path):
    """Which metric chooses the best epoch, and which the lines and tables show, is changed in one place:
    everywhere else reads ``iisan.metric_names``."""
    code = sorted(PACKAGE.rglob("*.py")) + [p for d in SCRIPT_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    found = metric_names_spelled_out(code)
    assert found  # (metric_names.py's own; the check reads names at all)
    elsewhere = [f"{path.relative_to(ROOT)}:{line} {name}" for path, line, name in found
                 if path != PACKAGE / "metric_names.py"]
    assert not elsewhere, elsewhere
    planted = tmp_path / "planted.py"  # the check sees a name in code, not in a comment or a longer text
    planted.write_text('best = record["valid"]["hit@10"]  # hit@10\nline = "valid hit@10 rose"\n')
    assert metric_names_spelled_out([planted]) == [(planted, 1, "hit@10")]


def test_every_parser_takes_flags_only_spelled_out():
    """A plain ``argparse.ArgumentParser`` takes ``--fig`` for ``--figs``: an abbreviation that works today
    could mean another flag once one is added. Scripts and commands use ``flags.FlagParser`` (whole flags,
    a hint for a misspelt one); a parser that only peeks at a few flags before the real one
    (``add_help=False``, ``parse_known_args``) is the one exception."""
    sources = [p for d in SCRIPT_DIRS for p in (ROOT / d).rglob("*.py")] + sorted(PACKAGE.rglob("*.py"))
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "ArgumentParser":
                keywords = {k.arg: k.value for k in node.keywords}
                peek = isinstance(keywords.get("add_help"), ast.Constant) and keywords["add_help"].value is False
                if not peek:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], offenders
