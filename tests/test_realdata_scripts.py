"""The real-data scripts (real_data_seeds, benchmark_cached_cpu, versa_minilm_scientific) check their
arguments and outputs before any work, and their Ctrl-C and stale-cache hints name what they take.
No real data is read: the checks come first, and the work is replaced by stand-ins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iisan.errors import CacheError, RunInterrupted
from iisan.experiments import realdata

from ._scripts import script_error

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("name", ["real_data_seeds", "benchmark_cached_cpu", "versa_minilm_scientific"])
@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive(name, threads, capsys):
    assert f"--threads: '{threads}' is not a positive integer" in script_error(name, ["--threads", threads], capsys)


def test_table_only_without_the_work_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "table.json"
    error = script_error("real_data_seeds", ["--table-only", "--work", str(tmp_path / "nowhere"), "--out", str(out)],
                         capsys)
    assert error.count("\n") == 1 and "holds no run folders" in error and not out.exists()


@pytest.mark.parametrize("name", ["real_data_seeds", "benchmark_cached_cpu"])
def test_out_never_replaces_a_file_it_did_not_write(name, tmp_path, capsys):
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("mine")
    error = script_error(name, ["--out", str(foreign), "--work", str(tmp_path / "work"),
                                *(["--data-dir", str(tmp_path)] if name == "benchmark_cached_cpu" else [])], capsys)
    assert error.count("\n") == 1 and f"--out {foreign} exists and is not" in error
    assert foreign.read_text() == "mine"


def test_benchmark_out_that_is_a_folder_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(realdata, "train", lambda cfg: pytest.fail("trained before checking --out"))
    (tmp_path / "cpu-out").mkdir()
    error = script_error("benchmark_cached_cpu", ["--out", str(tmp_path / "cpu-out"), "--data-dir", str(tmp_path)],
                         capsys)
    assert "--out" in error and "cpu-out exists and is not a benchmark summary" in error


def test_benchmark_may_replace_its_own_summary(tmp_path):
    out = tmp_path / "summary.json"
    out.write_text(json.dumps({"train_seconds_per_epoch": 1.0, "full_evaluation_seconds": 2.0}))
    assert realdata._is_benchmark(out) and not realdata._is_benchmark(tmp_path)


@pytest.fixture()
def no_work(tiny, monkeypatch):
    """The real-data functions on the tiny data with no encoding: the trainer is replaced by the test's."""
    monkeypatch.setattr(realdata, "_data_files", lambda data_dir: (Path(tiny["users"]), Path(tiny["items"])))
    monkeypatch.setattr(realdata, "minilm_path", lambda: tiny["text_model"])
    monkeypatch.setattr(realdata, "random_vit", lambda work, **sizes: Path(tiny["image_model"]))
    monkeypatch.setattr(realdata, "build_cache_from_config", lambda cfg, **kw: None)
    monkeypatch.setattr(realdata, "cache_file", lambda *a: Path(tiny["users"]))  # "the cache is there"
    names = []

    def use(error):
        def train(cfg):
            names.append(cfg.run_name)
            raise error
        monkeypatch.setattr(realdata, "train", train)
        return names

    return use


def test_benchmark_hints_say_it_never_resumes_and_name_its_rebuild_flag(no_work, tmp_path):
    no_work(RunInterrupted("SIGTERM at step 3; checkpoint saved in x", "To resume, run the same command with "
                                                                       "--run-name cached-minilm-blank-1", "SIGTERM"))
    with pytest.raises(RunInterrupted) as stopped:
        realdata.cached_cpu_benchmark(tmp_path, 1, tmp_path / "work", tmp_path / "out.json")
    assert "--run-name" not in str(stopped.value) and "A benchmark never resumes" in str(stopped.value)
    assert stopped.value.signal == "SIGTERM"  # the script exits 143, as the job SIGTERM stopped
    no_work(CacheError("cache c was built for layers 7 — rebuild it with `iisan cache --overwrite`"))
    with pytest.raises(CacheError, match="rebuild it with the --rebuild-cache flag of this script"):
        realdata.cached_cpu_benchmark(tmp_path, 1, tmp_path / "work", tmp_path / "out.json")


def test_versa_run_is_named_by_its_settings_so_the_same_command_resumes(no_work, tmp_path):
    names = no_work(RunInterrupted("SIGINT at step 3; checkpoint saved in x", "To resume, run the same command "
                                                                               "with --run-name versa-1"))
    for _ in range(2):
        with pytest.raises(RunInterrupted, match="To resume, run the same command again$"):
            realdata.versa_minilm(tmp_path, tmp_path / "work", epochs=1)
    with pytest.raises(RunInterrupted):
        realdata.versa_minilm(tmp_path, tmp_path / "work", epochs=1, seed=7)
    assert names[0] == names[1] != names[2] and "versa-minilm-blank" in names[0]
    no_work(CacheError("cache c was built for layers 7 — rebuild it with `iisan cache --overwrite`"))
    with pytest.raises(CacheError, match="rebuild it with a new --work-dir"):
        realdata.versa_minilm(tmp_path, tmp_path / "work", epochs=1)
