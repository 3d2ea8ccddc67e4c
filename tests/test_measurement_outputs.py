"""Where the measuring scripts write when no flag says where: under ``bench_data/`` in the checkout
(git-ignored), never over the committed ``results/`` and ``figs/`` that docs/results.md cites (a quick
check once replaced them); and every flag of every script says what it does. The parsers are built as
tests/test_cli_help.py builds reproduce.py's: the script's own ``parser()``, nothing run."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from ._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = ROOT / "bench_data"

MEASURING = ("benchmark_efficiency", "benchmark_cached_cpu", "gpu_diagnose", "plot_figures", "profile_step",
             "real_data_seeds", "versa_gpu_check", "versa_minilm_scientific")
SCRIPTS = (*MEASURING, "reproduce")


def parser_of(name: str) -> argparse.ArgumentParser:
    return load_script(f"{name}.py").parser()


def default_of(name: str, dest: str):
    action = next(a for a in parser_of(name)._actions if a.dest == dest)
    return action.default


@pytest.mark.parametrize("name, dest, where", [
    ("benchmark_efficiency", "out", "bench_data/results/efficiency"),
    ("benchmark_efficiency", "figs", "bench_data/figs"),
    ("benchmark_efficiency", "work", "bench_data"),
    ("benchmark_cached_cpu", "out", "bench_data/results/cpu-cached-scientific.json"),
    ("benchmark_cached_cpu", "work", "bench_data/cpu-scientific"),
    ("real_data_seeds", "out", "bench_data/results/real-data-seeds.json"),
    ("real_data_seeds", "verify_out", "bench_data/results/real-data-verify.json"),
    ("real_data_seeds", "work", "bench_data/real-seeds"),
    ("plot_figures", "figs", "bench_data/figs"),
    ("gpu_diagnose", "out", "bench_data/results/diagnose.json"),
    ("profile_step", "work", "bench_data"),
    ("versa_gpu_check", "out", "bench_data/versa-gpu"),
    ("versa_gpu_check", "work", "bench_data/versa-gpu-work"),
    ("versa_minilm_scientific", "work_dir", "bench_data/versa-minilm"),
])
def test_a_measuring_script_writes_under_bench_data_by_default(name, dest, where):
    assert Path(default_of(name, dest)) == ROOT / where


def test_plot_figures_redraws_what_the_benchmark_wrote_by_default():
    """plot_figures.py reads where benchmark_efficiency.py writes, and draws where it draws: the committed
    tables and figures are redrawn only with --results results/efficiency --figs figs."""
    assert [Path(p) for p in default_of("plot_figures", "results")] == [Path(default_of("benchmark_efficiency", "out"))]
    assert Path(default_of("plot_figures", "figs")) == Path(default_of("benchmark_efficiency", "figs"))


def paths_in(default) -> list[Path]:
    """The absolute paths a default names (a path, or a list of them); none for a flag's other values."""
    values = default if isinstance(default, (list, tuple)) else [default]
    return [Path(v) for v in values if isinstance(v, (str, Path)) and str(v) and Path(v).is_absolute()]


@pytest.mark.parametrize("name", MEASURING)
def test_no_default_of_a_measuring_script_points_into_the_checkout_outside_bench_data(name):
    """Any flag, outputs and inputs alike: a default inside the checkout lies in the git-ignored bench_data/."""
    assert "bench_data/" in (ROOT / ".gitignore").read_text().splitlines()
    for action in parser_of(name)._actions:
        for path in paths_in(action.default):
            if path.is_relative_to(ROOT):
                assert path.is_relative_to(BENCH_DATA), f"{name}.py {action.option_strings[0]} defaults to {path}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_of_a_script_says_what_it_does_and_its_default(name):
    for action in parser_of(name)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = f"{name}.py {action.option_strings[0] if action.option_strings else action.dest}"
        assert action.help and action.help != argparse.SUPPRESS and action.help.strip(), f"{flag} has no help"
        assert action.help.count("default:") <= 1 and "(default: None)" not in action.help, f"{flag}: {action.help}"
        shown = action.default not in (None, False, "", argparse.SUPPRESS)
        if shown:  # a value the help would otherwise hide
            assert "default" in action.help, f"{flag} hides its default {action.default!r}: {action.help}"
