"""The scripts check their flags as the ``iisan`` command checks its own: an empty path (the working folder,
never what was meant), a count out of range and a demo too small to rank are refused at parse time, in one
line with exit status 2, before any work (they wrote into the working folder, published a table of a
5-user demo, trained for hours where a negative --verify-epochs was meant to verify, or buried the error in
a report and exited 0)."""

from __future__ import annotations

import pytest

from iisan.cli.main import main

from ._scripts import ROOT, SCRIPTS, load_script, script_error

CASES = [
    ("reproduce", ["--dataset", "demo", "--out", ""], "argument --out: '' is empty; expected a path"),
    ("reproduce", ["--root", " "], "argument --root: ' ' is empty; expected a path"),
    ("reproduce", ["--import-from", ""], "argument --import-from: '' is empty; expected a path"),
    ("reproduce", ["--dataset", "demo", "--demo-users", "5"], "argument --demo-users: 5 is not from 100 to 1,000,000"),
    ("reproduce", ["--dataset", "demo", "--demo-items", "1"], "argument --demo-items: 1 is not from 40 to 100,000"),
    ("reproduce", ["--epochs", "0"], "argument --epochs: 0 is not from 1 to 10,000"),
    ("real_data_seeds", ["--verify-epochs", "-1"], "argument --verify-epochs: -1 is not from 0 to 10,000"),
    ("real_data_seeds", ["--work", ""], "argument --work/--work-dir: '' is empty; expected a path"),
    ("real_data_seeds", ["--verify-out", ""], "argument --verify-out: '' is empty; expected a path"),
    ("gpu_diagnose", ["--workers", "-1"], "--warmup and --num-workers >= 0"),
    ("gpu_diagnose", ["--out", ""], "argument --out: '' is empty; expected a path"),
    ("benchmark_cached_cpu", ["--epochs", "0"], "argument --epochs: 0 is not from 1 to 10,000"),
    ("benchmark_cached_cpu", ["--data-dir", ""], "argument --data-dir: '' is empty; expected a path"),
    ("versa_minilm_scientific", ["--patience", "-1"], "argument --patience: -1 is not from 0 to 10,000"),
    ("versa_minilm_scientific", ["--work-dir", ""], "argument --work-dir/--work: '' is empty; expected a path"),
    (ROOT / "Dataset" / "build_lmdb", ["--images", "", "--out", "x"], "argument --images: '' is empty"),
]


@pytest.mark.parametrize(("script", "argv", "expected"), CASES, ids=lambda v: str(v)[-30:])
def test_a_script_refuses_a_bad_flag_at_parse_time(script, argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an empty path is this folder: nothing may appear in it
    error = script_error(str(script), argv, capsys)
    lines = error.strip().splitlines()  # argparse's usage, then one line of error
    assert lines[0].startswith("usage: ") and ": error: " in lines[-1] and expected in lines[-1]
    assert "Traceback" not in error and sum(": error: " in line for line in lines) == 1
    assert list(tmp_path.iterdir()) == []


def test_import_cache_refuses_an_empty_source(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["import-cache", "--from", "", "--dataset", "Scientific"])
    assert stopped.value.code == 2 and "argument --from: '' is empty; expected a path" in capsys.readouterr().err


def test_every_script_takes_verbose_and_both_spellings_of_its_folder_and_thread_flags(tmp_path):
    """As ``iisan``: ``-v`` for debug logging; a working folder is ``--work`` or ``--work-dir``, and image
    reader threads ``--num-workers`` (as ``iisan train``; ``--workers`` still works where it was the name):
    one script spelt what another refused."""
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert len(scripts) >= 9
    work, threads = [], []
    for path in scripts:
        parser = load_script(path).parser()
        flags = {s: a for a in parser._actions for s in a.option_strings}
        assert flags["-v"] is flags["--verbose"] and parser.parse_args(["-v"]).verbose, path.name
        assert not parser.parse_args([]).verbose, path.name
        if "--work" in flags or "--work-dir" in flags:
            assert flags["--work"] is flags["--work-dir"], path.name
            work.append(path.stem)
            folder = str(tmp_path / "w")
            dest = flags["--work"].dest
            assert str(getattr(parser.parse_args(["--work", folder]), dest)) == folder == \
                str(getattr(parser.parse_args(["--work-dir", folder]), dest))
        if "--workers" in flags or "--num-workers" in flags:
            assert flags.get("--workers", flags["--num-workers"]) is flags["--num-workers"], path.name
            threads.append(path.stem)
            dest = flags["--num-workers"].dest
            assert str(getattr(parser.parse_args(["--num-workers", "3"]), dest)) == "3"  # config flags: text
            assert "--workers" not in flags or getattr(parser.parse_args(["--workers", "3"]), dest) == 3
    assert {"benchmark_cached_cpu", "versa_minilm_scientific", "real_data_seeds", "gpu_diagnose"} <= set(work)
    assert {"gpu_diagnose", "profile_step", "benchmark_efficiency"} <= set(threads)


def test_the_measuring_scripts_defaults_moved_out_of_torch_are_what_they_measured():
    """Their flags moved to torch-free modules (options.py, presets.SEED_SETTINGS) for --help: the seeds train both
    settings, the diagnosis its reference counts, and the benchmark lets the authors'-way switches be set."""
    from iisan.efficiency.options import BENCH_KEYS
    from iisan.efficiency.rows import AUTHORS_WAY

    seeds = load_script(ROOT / "scripts" / "real_data_seeds.py").parser().parse_args([])
    assert seeds.settings == ["id", "iisan-text"] and seeds.datasets == ["Scientific", "Instrument"]
    diagnosis = load_script(ROOT / "scripts" / "gpu_diagnose.py").parser().parse_args([])
    assert (diagnosis.fft_items, diagnosis.frozen_items, diagnosis.reps, diagnosis.warmup) == ([352], [704], 10, 3)
    assert set(AUTHORS_WAY) <= set(BENCH_KEYS)  # each can be set for the default rows too
    benchmark = load_script(ROOT / "scripts" / "benchmark_efficiency.py").parser()
    assert set(BENCH_KEYS) <= {action.dest for action in benchmark._actions}
    assert benchmark.parse_args([]).settings == "equal,paper"


def test_loading_scripts_in_this_process_leaves_sys_path_as_it_was():
    """Each script puts the checkout first on ``sys.path`` (to run uninstalled): loaded by the tests, once more
    at every load, hundreds of entries by the end of the suite."""
    import sys

    before = list(sys.path)
    for script in sorted(SCRIPTS.glob("*.py"))[:4]:
        load_script(script)
    assert sys.path == before
