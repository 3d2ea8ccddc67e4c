"""The documentation stays true to the repository: the README's sections come in the order a newcomer
needs them, its layout names the real files, relative links in README.md and docs/*.md resolve, no
file cites notes kept outside the repository, and the README's Python example runs."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from iisan.data.run_data import load_data
from iisan.model.families import SUPPORTED
from iisan.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# The README's top-level sections, in order (a heading matches when it starts with the name).
SECTIONS = ["Two commands", "The pipeline", "Running the paper's experiments", "Using a trained run",
            "Command line", "The protocol", "Where this differs from the authors' code", "Layout", "Development"]
AFTER_SECTIONS = ["Citation"]  # allowed after the last one
INTRO_MAX_LINES = 7  # "what it is": about five lines
# Notes the project keeps outside the repository; spelled in pieces so that this file does not cite them.
OUTSIDE = ("design" + ".md", "style" + ".md", "authors_code" + "_spec")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "demo_data", "build", "dist"}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
# Source files named in backticks must exist (outputs, e.g. under results/, may not exist yet).
PATH_IN_CODE = re.compile(r"`((?:iisan|scripts|docs|tests|Code_Cached|Code_Uncached|Dataset)/[\w./-]+\.(?:py|md|sh))`")


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            lines.append(line)
    return lines


def section(path: Path, title: str) -> str:
    """The text of the ``## title...`` section (up to the next ``## ``)."""
    text = path.read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found, f"{path.name} has no section '## {title}'"
    return found.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def repository_files() -> list[Path]:
    """Tracked files (git), or every file outside build and environment folders when not a checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [ROOT / name for name in out.decode().split("\0") if name]
        if files:
            return [f for f in files if f.is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    return [p for p in ROOT.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]


# --------------------------------------------------------------------------------------------------
# structure of the README


def test_readme_sections_come_in_the_newcomers_order():
    headings = [line[3:].strip() for line in prose_lines(README) if line.startswith("## ")]
    names = [next((s for s in SECTIONS + AFTER_SECTIONS if h.startswith(s)), h) for h in headings]
    assert names[: len(SECTIONS)] == SECTIONS, f"README sections {names}, expected {SECTIONS} first"
    assert all(n in AFTER_SECTIONS for n in names[len(SECTIONS):]), f"unexpected trailing sections {names}"


def test_readme_opens_with_a_short_statement_of_what_it_is():
    lines = prose_lines(README)
    assert lines[0] == "# IISAN"
    intro = [line for line in lines[1: next(i for i, line in enumerate(lines) if line.startswith("## "))]
             if line.strip()]
    assert 3 <= len(intro) <= INTRO_MAX_LINES, f"the opening paragraph has {len(intro)} lines"


def test_readme_layout_names_every_module_and_only_real_files():
    block = re.search(r"```\n(.*?)```", section(README, "Layout"), re.S).group(1)
    named = set(re.findall(r"[\w-]+\.(?:py|sh)", block))
    modules = {p.name for p in (ROOT / "iisan").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    scripts = {p.name for d in ("scripts", "Code_Cached", "Code_Uncached", "Dataset") for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".sh")}
    assert not modules - named, f"README layout misses modules {sorted(modules - named)}"
    assert not (scripts - named), f"README layout misses scripts {sorted(scripts - named)}"
    unknown = named - modules - scripts - {"__init__.py", "__main__.py"}
    assert not unknown, f"README layout names files that do not exist: {sorted(unknown)}"


# --------------------------------------------------------------------------------------------------
# links and references


def broken_links(doc: Path) -> list[str]:
    """The relative links of ``doc`` to files that do not exist or to headings they lack, and the paths
    quoted in its prose that do not exist in the repository."""
    broken = []
    for line in prose_lines(doc):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and file.suffix == ".md":
                anchors = {slug(h.lstrip("#")) for h in prose_lines(file) if h.startswith("#")}
                if anchor not in anchors:
                    broken.append(f"{target} (no heading '{anchor}')")
        for path in PATH_IN_CODE.findall(line):
            if not (ROOT / path).exists():
                broken.append(f"`{path}` (no such file)")
    return broken


def test_the_readme_names_every_method():
    from iisan.methods import METHODS

    found = re.search(r"--method ([a-z0-9_|]+)\]", README.read_text())
    assert found, "README.md's command-line block lost its `[--method a|b|...]` list"
    named = found.group(1).split("|")
    assert named == list(METHODS), f"README.md's --method list {named}; METHOD_TABLE's methods {list(METHODS)}"


def test_the_encoder_guide_lists_every_supported_family():
    """pretrained_models/README.md names the towers IISAN accepts: SigLIP and T5 were missing there, and CLIP's
    text model was listed among the CLS-pooled BERT family."""
    guide = (ROOT / "pretrained_models" / "README.md").read_text()
    listed = guide[guide.index("Text towers (`SUPPORTED`"):guide.index("Offline stand-ins")]
    named = set(re.findall(r"[a-z][a-z0-9_-]*[a-z0-9]", listed))
    assert not (missing := sorted((SUPPORTED["text"] | SUPPORTED["image"]) - named)), \
        f"pretrained_models/README.md does not list the supported model type(s) {missing} (families.SUPPORTED)"
    bert_family = listed[listed.index("BERT-family"):listed.index("causal towers")]
    assert "clip" not in bert_family and "t5" not in bert_family


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_no_file_cites_notes_outside_the_repository():
    cited = []
    for path in repository_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (figures)
            continue
        text = data.decode("utf-8", errors="replace").lower()
        for number, line in enumerate(text.splitlines(), 1):
            cited += [f"{path.relative_to(ROOT)}:{number}: {name}" for name in OUTSIDE if name in line]
    assert not cited, "files cite notes outside the repository:\n" + "\n".join(cited)


def test_link_checks_catch_a_broken_link_and_a_missing_anchor(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n## Some section\n\n[ok](#some-section) [bad](#nowhere) [gone](b.md)\n"
                   "```\n[inside a code block](c.md)\n```\n")
    links = [t for line in prose_lines(doc) for t in LINK.findall(line)]
    assert links == ["#some-section", "#nowhere", "b.md"]
    assert broken_links(doc) == ["#nowhere (no heading 'nowhere')", "b.md (no such file)"]
    assert slug("Some section") == "some-section" and slug("Where this differs from the authors' code") == \
        "where-this-differs-from-the-authors-code"


# --------------------------------------------------------------------------------------------------
# the README's example


def test_readme_example_rebuilds_a_run_and_reproduces_its_test_metrics(tiny_config, tiny_cache, tmp_path,
                                                                      monkeypatch):
    code = re.search(r"```python\n(.*?)```", section(README, "Using a trained run"), re.S).group(1)
    run_dir = re.search(r'"(demo_data/runs/[^"]+)"', code)
    assert run_dir, "the example names a run folder under demo_data/runs/"
    cfg = tiny_config(cache_dir=tiny_cache, epochs=1, out_dir=str(tmp_path / Path(run_dir.group(1)).parent),
                      run_name=Path(run_dir.group(1)).name)
    results = train(cfg)
    history = load_data(cfg).item_ids[1:4]  # three ids the tiny data set holds
    code, replaced = re.subn(r'\["I\d+"(?:, "I\d+")*\]', repr(history), code)
    assert replaced == 1, "the example's history is one list of item ids"
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    metrics, top = [ast.literal_eval(line) for line in out.getvalue().splitlines()]
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert metrics == pytest.approx(saved["test"], abs=1e-9)
    assert len(top) == 10 and not set(top) & set(history) and set(top) <= set(load_data(cfg).item_ids[1:])


def test_the_training_from_python_example_runs_with_the_methods_paper_settings(tiny, tmp_path, monkeypatch):
    text = (ROOT / "docs" / "runs.md").read_text(encoding="utf-8")
    code = re.search(r"^### Training from Python$.*?```python\n(.*?)```", text, re.S | re.M).group(1)
    paths = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    (tmp_path / "demo_data").mkdir()
    (tmp_path / "demo_data" / "demo.json").write_text(json.dumps({**paths, "device": "cpu", "num_workers": 0,
                                                                  "progress": False, "eval_batch_size": 64}))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/runs.md", "exec"), {"__name__": "runs_example"})
    batch, best = out.getvalue().splitlines()
    saved = json.loads(next((tmp_path / "demo_data" / "python").glob("*/results.json")).read_text())
    assert batch == "32" and saved["config"]["method"] == "bitfit" and saved["config"]["lr"] == 2e-4
    assert best == f"{saved['best_epoch']} {saved['test']['hit@10']}"


def test_the_docs_name_every_key_a_run_and_its_stores_write(tiny, tiny_cache, tiny_config, tmp_path):
    """A conformance audit found a dozen keys written but described nowhere. Every top-level key of results.json
    (and of its ``step`` and ``timing``), of a checkpoint's state.json and MANIFEST.json, and of the cache's and the
    image LMDB's metadata is named in docs/formats.md or robust_runs.md's checkpoint table."""
    from safetensors import safe_open

    from iisan.data.images import read_meta

    results = train(tiny_config(cache_dir=tiny_cache, epochs=1, out_dir=str(tmp_path / "runs"), run_name="r"))
    folder = next((Path(results["run_dir"]) / "checkpoints").glob("epoch-*"))
    written = {"results.json": {*results, *results["step"], *results["timing"]},
               "state.json": set(json.loads((folder / "state.json").read_text())),
               "MANIFEST.json": set(json.loads((folder / "MANIFEST.json").read_text())),
               "image LMDB": set(read_meta(Path(tiny["images"])))}
    for modality in ("text", "image"):
        with safe_open(str(Path(tiny_cache) / f"{modality}.safetensors"), "pt") as cache:
            written[f"{modality} cache"] = set(cache.metadata())
    docs = "".join((ROOT / "docs" / name).read_text(encoding="utf-8") for name in ("formats.md", "robust_runs.md"))
    named = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", docs))
    assert {what: sorted(keys - named) for what, keys in written.items() if keys - named} == {}
