"""Outputs of fixed names that a command finds already there: a file IISAN did not write (a note, a picture,
someone's JSON) is refused with one line naming the path and the flag that chose it, before any work, and
left byte-identical; the command's own earlier output is replaced, so rerunning works."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from iisan.cli.main import main as iisan_main
from iisan.data.cache_import import REPORT
from iisan.efficiency import benchmark
from iisan.efficiency.figures import CREATOR
from iisan.errors import OutputError, TrainingError
from iisan.experiments import reproduce

from ._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "results" / "efficiency" / "tiny-demo-cpu-equal.json"
LEGACY_FIGURE = ROOT / "figs" / "efficiency-tiny-demo-cpu-equal.png"  # drawn before figures carried a Creator
NOT_OURS = "exists and is not {what}; IISAN replaces only what it wrote itself, so choose another path or move " \
           "that one away"


def refusal(flag: str, path: Path, what: str) -> str:
    return f"{flag} {path} {NOT_OURS.format(what=what)}"


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the outputs were checked")


def ending(module, argv: list[str], capsys, status: int = 2) -> str:
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == status
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def script(name: str, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    return load_script(f"{name}.py")


# --------------------------------------------------------------------------------------------------
# scripts/plot_figures.py: <name>.md beside the JSON, figs/efficiency-<name>.png


def test_plot_figures_refuses_a_table_or_figure_it_did_not_write(tmp_path, monkeypatch, capsys):
    plot = script("plot_figures", monkeypatch)
    (tmp_path / "pf" / "figs").mkdir(parents=True)
    json_path = tmp_path / "pf" / "notes.json"
    shutil.copy(BENCHMARK, json_path)
    md, png = tmp_path / "pf" / "notes.md", tmp_path / "pf" / "figs" / "efficiency-pf-notes.png"
    argv = ["--results", str(json_path), "--figs", str(tmp_path / "pf" / "figs")]

    md.write_text("# hand-written\n")
    assert ending(plot, argv, capsys) == (
        "plot_figures.py: error: " + refusal("--results", md, "a benchmark table IISAN wrote"))
    assert md.read_text() == "# hand-written\n" and not png.exists()  # refused before anything was written
    md.unlink()

    png.write_bytes(b"pic\n")
    assert ending(plot, argv, capsys) == (
        "plot_figures.py: error: " + refusal("--figs", png, "a benchmark figure IISAN drew"))
    assert png.read_bytes() == b"pic\n" and not md.exists()
    png.unlink()

    made = plot.main(argv)
    assert made == [md, png] and md.read_text().startswith("# Efficiency: notes\n")
    assert CREATOR.encode() in png.read_bytes()
    md.write_text("# Efficiency: notes\nEARLIER-RUN\n")  # an earlier table of this command: replaced
    plot.main(argv)
    assert "EARLIER-RUN" not in md.read_text()


def test_plot_figures_replaces_a_figure_drawn_before_figures_carried_a_creator(tmp_path, monkeypatch):
    plot = script("plot_figures", monkeypatch)
    results = tmp_path / "efficiency"
    results.mkdir()
    shutil.copy(BENCHMARK, results / BENCHMARK.name)
    shutil.copy(BENCHMARK.with_suffix(".md"), results / BENCHMARK.with_suffix(".md").name)
    shutil.copy(LEGACY_FIGURE, tmp_path / LEGACY_FIGURE.name)
    plot.main(["--results", str(results / BENCHMARK.name), "--figs", str(tmp_path)])
    assert CREATOR.encode() in (tmp_path / LEGACY_FIGURE.name).read_bytes()


# --------------------------------------------------------------------------------------------------
# scripts/benchmark_efficiency.py --out: <tag>-<setting>.json and .md


def test_benchmark_refuses_a_json_or_table_it_did_not_write_before_any_work(tmp_path, monkeypatch, capsys):
    bench = script("benchmark_efficiency", monkeypatch)
    monkeypatch.setattr(benchmark, "prepare", no_work)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--settings", "equal", "--methods", "IISAN (cached)", "--authors-way", "none", "--device", "cpu",
            "--work", str(tmp_path / "work"), "--out", str(out), "--no-plots"]
    json_path, md = out / "tiny-demo-cpu-equal.json", out / "tiny-demo-cpu-equal.md"
    json_path.write_text('{"my": "own"}\n')
    assert ending(bench, argv, capsys) == (
        "benchmark_efficiency.py: error: " + refusal("--out", json_path, "a benchmark JSON IISAN wrote"))
    assert json_path.read_text() == '{"my": "own"}\n'
    shutil.copy(BENCHMARK, json_path)  # a benchmark JSON: may be replaced, but its table may not
    md.write_text("# notes\n")
    assert ending(bench, argv, capsys) == (
        "benchmark_efficiency.py: error: " + refusal("--out", md, "a benchmark table IISAN wrote"))
    assert md.read_text() == "# notes\n" and json_path.read_bytes() == BENCHMARK.read_bytes()


def test_benchmark_refuses_a_figure_it_did_not_draw_and_replaces_its_own_results(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    monkeypatch.setattr(benchmark, "in_fresh_process", lambda fn, cfg, **kw: {"error": "ConfigError: no"})
    figs, out = tmp_path / "figs", tmp_path / "out"
    figs.mkdir()
    png = figs / "efficiency-out-t-paper.png"
    png.write_bytes(b"pic")

    def run():
        benchmark.run_benchmark({}, setting_names=("paper",), labels=("FFT",), authors_way=(),
                                 work=tmp_path, out=out, tag="t", figs=figs)

    monkeypatch.setattr(benchmark, "base_config", no_work)
    with pytest.raises(OutputError) as refused:
        run()
    assert str(refused.value) == refusal("--figs", png, "a benchmark figure IISAN drew")
    assert png.read_bytes() == b"pic" and not out.exists()
    png.unlink()
    monkeypatch.undo()
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    monkeypatch.setattr(benchmark, "in_fresh_process", lambda fn, cfg, **kw: {"error": "ConfigError: no"})
    for _ in range(2):  # the second run replaces the first one's JSON and table
        with pytest.raises(TrainingError):
            run()
    assert json.loads((out / "t-paper.json").read_text())["rows"][0]["error"] == "ConfigError: no"
    assert (out / "t-paper.md").read_text().startswith("# Efficiency: t-paper\n")


# --------------------------------------------------------------------------------------------------
# scripts/reproduce.py --out: <out>/reproduce-<dataset>.md


def test_reproduce_refuses_a_table_it_did_not_write_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "base_config", no_work)
    path = tmp_path / "reproduce-demo.md"
    path.write_text("# my draft\n")
    with pytest.raises(OutputError) as refused:
        reproduce.reproduce(reproduce.Reproduction("demo", tmp_path, seeds=(1,)))
    assert str(refused.value) == refusal("--out", path, "a reproduction table IISAN wrote")
    assert "\n" not in str(refused.value) and path.read_text() == "# my draft\n"


def test_reproduce_replaces_its_own_table(tmp_path, monkeypatch):
    cfg = SimpleNamespace(out_dir=str(tmp_path / "runs"), replace=lambda **kw: cfg)
    monkeypatch.setattr(reproduce, "base_config", lambda run, root: cfg)
    monkeypatch.setattr(reproduce, "ensure_cache", lambda cfg, run: None)
    monkeypatch.setattr(reproduce, "train", lambda cfg: {"run_dir": str(tmp_path)})
    monkeypatch.setattr(reproduce, "read_row", lambda path, results: {"device": "cpu"})
    monkeypatch.setattr(reproduce, "table", lambda dataset, rows: "| new table |\n")
    path = tmp_path / "reproduce-demo.md"
    path.write_text("# Reproduction: demo\n\n| old table |\n")
    assert reproduce.reproduce(reproduce.Reproduction("demo", tmp_path, seeds=(1,))) == path
    assert path.read_text().startswith("# Reproduction: demo\n") and "| new table |" in path.read_text()
    assert "old table" not in path.read_text()


# --------------------------------------------------------------------------------------------------
# iisan import-cache --cache-dir: <cache-dir>/import-report.tsv


def import_argv(tiny, src: Path, cache: Path) -> list[str]:
    return ["import-cache", "--from", str(src), "--dataset", "Scientific", "--users", tiny["users"],
            "--items", tiny["items"], "--text-model", tiny["text_model"], "--image-model", tiny["image_model"],
            "--cache-dir", str(cache)]


def test_import_cache_refuses_a_report_it_did_not_write_and_replaces_its_own(tiny, tmp_path, capsys):
    src, cache = tmp_path / "src", tmp_path / "cache"
    (src / "bert_outputs").mkdir(parents=True)
    (src / "vit_outputs").mkdir()
    cache.mkdir()
    report = cache / REPORT
    report.write_text("notes\n")
    with pytest.raises(SystemExit) as stopped:
        iisan_main(import_argv(tiny, src, cache))
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(refusal("--cache-dir", report, "an import report IISAN wrote"))
    assert report.read_text() == "notes\n" and sorted(p.name for p in cache.iterdir()) == [REPORT]

    report.write_text("modality\titem_id\tfile\tproblem\ntext\told\tx\tmissing\n")  # an earlier import's
    with pytest.raises(SystemExit) as stopped:  # every file is missing: the report lists them all
        iisan_main(import_argv(tiny, src, cache))
    assert stopped.value.code == 2
    lines = report.read_text().splitlines()
    assert lines[0] == "modality\titem_id\tfile\tproblem" and "old" not in report.read_text() and len(lines) > 2
