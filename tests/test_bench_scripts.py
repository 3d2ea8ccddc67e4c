"""The benchmark tools' bad inputs, each refused with one line and exit status 2 before any work: the
scripts' ``main(argv)`` run in this process, with the work itself replaced by a failure it never reaches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from iisan.efficiency import benchmark
from iisan.errors import TrainingError

from ._scripts import load_script

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
EXPECTED = "expected a benchmark JSON written by scripts/benchmark_efficiency.py"
NO_GPU = "device=cuda but no CUDA device is available"


def script(name: str, monkeypatch):
    """The script's module, loaded afresh, named as it is on a command line."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    return load_script(f"{name}.py")


def ending(module, argv: list[str], capsys, status: int = 2) -> str:
    """``module.main(argv)`` -> the last line of its stderr, after checking its exit status."""
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == status
    return capsys.readouterr().err.strip().splitlines()[-1]


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the input was checked")


@pytest.fixture
def no_gpu(monkeypatch):
    """A CUDA build of torch on a machine without a GPU (this machine's torch may be either build)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --------------------------------------------------------------------------------------------------
# plot_figures.py


def test_plot_figures_draws_a_json_without_loading_torch(tmp_path):
    """Drawing a JSON's table and figure loaded torch, transformers and peft (5 s) through the benchmark's code."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "results" / "efficiency" / "tiny-demo-cpu-paper.json", tmp_path / "run.json")
    code = ("import runpy, sys; sys.argv = ['plot_figures.py', '--results', sys.argv[1], '--figs', sys.argv[2]]\n"
            "try:\n    runpy.run_path(sys.argv[0].replace('plot_figures.py', {!r}), run_name='__main__')\n"
            "except SystemExit as stop:\n    assert not stop.code, stop.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
            ).format(str(root / "scripts" / "plot_figures.py"))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run.json"), str(tmp_path / "figs")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "run.md").is_file() and [p.name for p in (tmp_path / "figs").iterdir()] == [
        f"efficiency-{tmp_path.name}-run.png"]


def test_drawing_a_benchmark_figure_leaves_a_notebooks_matplotlib_backend_alone(tmp_path):
    """The figures module chose matplotlib's Agg backend when imported, switching a notebook's inline one."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = ("import json, sys, matplotlib; matplotlib.use('svg'); from iisan.efficiency.figures import figure; "
            "png = figure(json.load(open(sys.argv[1]))); "
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, png[:4] == b'\\x89PNG')")
    payload = root / "results" / "efficiency" / "tiny-demo-cpu-paper.json"
    done = subprocess.run([sys.executable, "-c", code, str(payload)], capture_output=True, text=True, timeout=120,
                          cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False", "True"]


def test_plot_figures_refuses_what_is_not_a_benchmark_json(tmp_path, monkeypatch, capsys):
    plot = script("plot_figures", monkeypatch)
    (tmp_path / "results.json").write_text('{"test": {"hit@10": 0.1}}')  # a run's results, not a benchmark's
    (tmp_path / "cut.json").write_text('{"rows": [')
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("mine")
    figs = ["--figs", str(tmp_path / "figs")]
    assert ending(plot, ["--results", str(tmp_path / "nope"), *figs], capsys) == (
        f"plot_figures.py: error: {tmp_path / 'nope'} does not exist; {EXPECTED}, or a folder of them")
    assert ending(plot, ["--results", str(tmp_path / "results.json"), *figs], capsys) == (
        f"plot_figures.py: error: {tmp_path / 'results.json'} is not a benchmark JSON (it lacks rows, device, "
        f"description, timed_steps, warmup_steps, command, git_commit, backbones, data); {EXPECTED}")
    assert ending(plot, ["--results", str(tmp_path / "cut.json"), *figs], capsys) == (
        f"plot_figures.py: error: {tmp_path / 'cut.json'} is not JSON (Expecting value: line 1 column 11 "
        f"(char 10)); {EXPECTED}")
    assert ending(plot, ["--results", str(tmp_path / "empty"), *figs], capsys) == (
        f"plot_figures.py: error: no benchmark JSON found under {tmp_path / 'empty'}; {EXPECTED}")
    assert ending(plot, ["--results", str(tmp_path / "empty"), "--figs", str(tmp_path / "afile")], capsys) == (
        f"plot_figures.py: error: --figs {tmp_path / 'afile'} is a file; expected a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cut.json", "empty", "results.json"]


def test_plot_figures_refuses_a_benchmark_json_without_rows(tmp_path, monkeypatch, capsys):
    """A benchmark JSON whose rows were emptied (by hand: the benchmark writes a file once a row is
    measured) is said to hold none, not drawn as an empty table."""
    plot = script("plot_figures", monkeypatch)
    committed = SCRIPTS.parent / "results" / "efficiency" / "tiny-demo-cpu-equal.json"
    payload = json.loads(committed.read_text())
    payload["rows"] = []
    (tmp_path / "none.json").write_text(json.dumps(payload))
    assert ending(plot, ["--results", str(tmp_path / "none.json"), "--figs", str(tmp_path / "figs")], capsys) == (
        f"plot_figures.py: error: {tmp_path / 'none.json'} holds no rows (a benchmark JSON has one per method "
        f"measured); {EXPECTED}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.json"]


def test_plot_figures_interrupted_exits_130(tmp_path, monkeypatch, capsys):
    plot = script("plot_figures", monkeypatch)

    def interrupted(*args):
        raise KeyboardInterrupt

    import iisan.efficiency.figures as figures  # (the script imports it when it runs: not for --help)

    monkeypatch.setattr(figures, "write_reports", interrupted)
    assert "interrupted" in ending(plot, ["--results", str(tmp_path)], capsys, status=130)


# --------------------------------------------------------------------------------------------------
# benchmark_efficiency.py


@pytest.mark.parametrize("argv, error", [
    (["--settings", ""], "--settings must list equal and/or paper, not ''"),
    (["--methods", "none"], "--methods: unknown method label(s) ['none']; choose from ['FFT', 'Adapter', 'LoRA', "
                            "'BitFit', 'IISAN (uncached)', 'IISAN (cached)']"),
    (["--methods", ","], "--methods ',' names no method; choose from ['FFT', 'Adapter', 'LoRA', 'BitFit', "
                         "'IISAN (uncached)', 'IISAN (cached)'] or 'all'"),
    (["--equal-batch", "0"], "argument --equal-batch: '0' is not a positive integer"),
    (["--equal-batch", "-3"], "argument --equal-batch: '-3' is not a positive integer"),
])
def test_benchmark_refuses_bad_flags_at_parse_time(argv, error, monkeypatch, capsys):
    bench = script("benchmark_efficiency", monkeypatch)
    monkeypatch.setattr(benchmark, "prepare", no_work)
    assert ending(bench, argv, capsys) == f"benchmark_efficiency.py: error: {error}"


def test_benchmark_checks_device_and_outputs_before_any_work(tmp_path, monkeypatch, capsys, no_gpu):
    bench = script("benchmark_efficiency", monkeypatch)
    monkeypatch.setattr(benchmark, "prepare", no_work)
    (tmp_path / "notacache.txt").write_text("mine")
    folders = ["--work", str(tmp_path / "work"), "--figs", str(tmp_path / "figs")]
    assert ending(bench, ["--device", "cuda", *folders, "--out", str(tmp_path / "out")], capsys) == (
        f"benchmark_efficiency.py: error: {NO_GPU}")
    assert ending(bench, [*folders, "--out", str(tmp_path / "notacache.txt")], capsys) == (
        f"benchmark_efficiency.py: error: --out {tmp_path / 'notacache.txt'} is a file; expected a folder")
    assert ending(bench, [*folders, "--out", str(tmp_path / "notacache.txt" / "x")], capsys) == (
        f"benchmark_efficiency.py: error: --out {tmp_path / 'notacache.txt' / 'x'} is inside the file "
        f"{tmp_path / 'notacache.txt'}; expected a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notacache.txt"]


def test_benchmark_fails_when_every_row_failed_after_writing_its_json(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "prepare", lambda work, data, backbones: {})
    monkeypatch.setattr(benchmark, "in_fresh_process", lambda fn, cfg, **kw: {"error": "ConfigError: no"})
    with pytest.raises(TrainingError) as failed:
        benchmark.run_benchmark({}, setting_names=("paper",), labels=("FFT", "LoRA"), authors_way=(),
                                 work=tmp_path, out=tmp_path / "out", tag="t", figs=tmp_path / "figs")
    path = tmp_path / "out" / "t-paper.json"
    assert str(failed.value) == f"every measured row failed (the first: ConfigError: no); their errors are in {path}"
    assert [r["error"] for r in json.loads(path.read_text())["rows"]] == ["ConfigError: no"] * 2
    assert path.with_suffix(".md").is_file() and not (tmp_path / "figs").exists()


def test_a_benchmark_of_no_method_is_refused_before_any_work(tmp_path, monkeypatch):
    """From Python too (the script refuses an empty --methods): a benchmark JSON without rows is never written."""
    from iisan.errors import ConfigError

    monkeypatch.setattr(benchmark, "prepare", no_work)
    with pytest.raises(ConfigError, match="no method to measure: name at least one of FFT, "):
        benchmark.run_benchmark({}, labels=(), work=tmp_path, out=tmp_path / "out", tag="t")
    assert not any(tmp_path.iterdir())


def test_method_config_refuses_batch_zero():
    with pytest.raises(ValueError, match="batch_size=0 must be positive"):
        benchmark.method_config({}, "FFT", 0)
    assert benchmark.method_config({}, "FFT").batch_size == 32


# --------------------------------------------------------------------------------------------------
# profile_step.py


def test_profile_step_refuses_no_steps_and_a_trace_it_did_not_write(tmp_path, monkeypatch, capsys):
    profile = script("profile_step", monkeypatch)
    monkeypatch.setattr(benchmark, "prepare", no_work)
    for steps in ("0", "-1"):
        assert ending(profile, ["--steps", steps], capsys) == (
            f"profile_step.py: error: argument --steps: '{steps}' is not a positive integer")
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    assert ending(profile, ["--trace", str(precious)], capsys) == (
        f"profile_step.py: error: --trace {precious} exists and is not a Chrome trace of torch.profiler; IISAN "
        "replaces only what it wrote itself, so choose another path or move that one away")
    assert precious.read_text() == "mine"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(2).sum()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    assert profile.is_profiler_trace(tmp_path / "trace.json")  # its own earlier trace may be replaced
    (tmp_path / "other.json").write_text('{"traceEvents": []}')
    assert not profile.is_profiler_trace(tmp_path / "other.json") and not profile.is_profiler_trace(tmp_path)


# --------------------------------------------------------------------------------------------------
# gpu_diagnose.py, versa_gpu_check.py


def test_gpu_tools_refuse_a_missing_gpu_and_a_file_for_a_folder(tmp_path, monkeypatch, capsys, no_gpu):
    diagnose = script("gpu_diagnose", monkeypatch)
    assert ending(diagnose, ["--device", "cuda", "--out", str(tmp_path / "d.json")], capsys) == (
        f"gpu_diagnose.py: error: {NO_GPU}")
    versa = script("versa_gpu_check", monkeypatch)
    folders = ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert ending(versa, folders, capsys) == f"versa_gpu_check.py: error: {NO_GPU}"
    (tmp_path / "afile").write_text("mine")
    assert ending(versa, ["--device", "cpu", "--work", str(tmp_path / "afile")], capsys) == (
        f"versa_gpu_check.py: error: --work {tmp_path / 'afile'} is a file; expected a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_the_versa_gpu_check_exits_1_naming_the_checks_that_failed(tmp_path, monkeypatch, capsys):
    versa = script("versa_gpu_check", monkeypatch)
    report = {"checks": {"caches_close": True, "cuda_graph_step": False, "resumed_bytes_equal": False},
              "passed": False}
    import iisan.experiments.versa_check as versa_check  # (the script imports it when it runs: not for --help)

    monkeypatch.setattr(versa_check, "versa_gpu_check", lambda *args: report)
    assert ending(versa, ["--out", str(tmp_path / "out")], capsys, status=1) == (
        "versa_gpu_check.py: failed: cuda_graph_step, resumed_bytes_equal")
    monkeypatch.setattr(versa_check, "versa_gpu_check", lambda *args: {**report, "checks": {}})
    assert ending(versa, ["--out", str(tmp_path / "out")], capsys, status=1) == (
        "versa_gpu_check.py: failed: no check ran")


@pytest.mark.parametrize("name, start", [("gpu_diagnose", "Where a live-backbone training step spends"),
                                         ("versa_gpu_check", "IISAN-Versa on a GPU, one short prepared run")])
def test_gpu_tools_describe_themselves_briefly(name, start, monkeypatch, capsys):
    module = script(name, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.startswith(start) and len(description) < 300
    assert max(map(len, description.splitlines())) <= 80  # wrapped by argparse
