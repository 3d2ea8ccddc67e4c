"""Grids from the entry scripts: a failing point never stops the others, a summary closes every grid,
running the same command again resumes or skips its points, and one point can run alone."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from iisan.console import fixed
from iisan.experiments.sweep import GridPoint, Outcome, Status, parse_script_args, run_script, summary
from iisan.metric_names import HEADLINE, SELECTED_BY

SCRIPT = Path(__file__).resolve().parents[1] / "Code_Cached" / "scripts" / "run_IISAN.py"
DEFAULTS = {"method": "iisan", "feed": "cached"}  # what run_IISAN.py passes


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("run_IISAN_cached", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SWEEP


@pytest.fixture()
def argv(tiny, tiny_cache, tmp_path):
    def make(*flags: str) -> list[str]:
        out = ["--cache-dir", tiny_cache, "--out-dir", str(tmp_path / "runs"), "--device", "cpu", "--num-workers",
               "0", "--no-progress", "--batch-size", "16", "--max-steps-per-epoch", "3", "--eval-batch-size", "64"]
        for key in ("users", "items", "images", "text_model", "image_model"):
            out += ["--" + key.replace("_", "-"), tiny[key]]
        return out + list(flags)

    return make


def summary_rows(text: str) -> list[list[str]]:
    lines = [line for line in text[text.index("grid summary"):].splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_a_failing_point_does_not_stop_the_grid(sweep, argv, tmp_path, capsys, caplog):
    """Point 1 is a bad value (no config), point 2 fails while running (lr 1e30: a non-finite loss at its
    second step); points 0 and 3 run; the summary lists all four and the exit status is 2."""
    caplog.set_level("INFO", logger="iisan")
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "fast", "1e30", "2e-3"))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    rows = summary_rows(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert [r[2].split(":")[0] for r in rows] == ["finished", "failed", "failed", "finished"]
    assert rows[1][2] == "failed: lr='fast': expected a number"
    assert rows[2][2].startswith("failed: non-finite loss at step 1 (epoch 0, steps 0..2)")
    assert "grid summary: 4 point(s): 2 finished, 2 failed" in out
    assert err.strip().endswith(f"error: 2 of 4 grid point(s) failed: 1 (lr='fast': expected a number); "
                                f"2 ({rows[2][1]})")
    assert "grid point 1 (lr=fast seed=12345) failed: lr='fast': expected a number" in caplog.text
    assert "grid point 1 (2 of 4): invalid values (lr=fast seed=12345)" in caplog.text  # it said ': -'
    for row in (rows[0], rows[3]):  # names and config.json come from the resolved values
        config = json.loads((tmp_path / "runs" / row[1] / "config.json").read_text())
        assert row[1].split("-")[-2] == f"lr{config['lr']}"
        results = json.loads((tmp_path / "runs" / row[1] / "results.json").read_text())
        assert results["status"] == "finished" and row[3:6] == [  # validation first: what a point is chosen by
            fixed(results["valid"]["hit@10"]), fixed(results["test"]["hit@10"]), fixed(results["test"]["ndcg@10"])]
    failed = json.loads((tmp_path / "runs" / rows[2][1] / "results.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == rows[2][2].removeprefix("failed: ")


def test_rerunning_a_sweep_resumes_its_folders_then_skips_them(sweep, argv, tmp_path, capsys):
    first = run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "2e-3"))
    names = folders(tmp_path / "runs")
    assert len(names) == 2 and [len(r["epochs"]) for r in first] == [1, 1]
    longer = run_script(DEFAULTS, sweep, argv("--epochs", "2", "--lr", "1e-3", "2e-3"))  # the same command, longer
    assert folders(tmp_path / "runs") == names
    assert [r["resumed_from"] for r in longer] == [["epoch-0000"], ["epoch-0000"]]
    assert [[e["epoch"] for e in r["epochs"]] for r in longer] == [[0, 1], [0, 1]]
    capsys.readouterr()
    again = run_script(DEFAULTS, sweep, argv("--epochs", "2", "--lr", "1e-3", "2e-3"))
    assert again == longer  # nothing trained: the finished runs' results
    assert [r[2] for r in summary_rows(capsys.readouterr().out)] == ["finished before", "finished before"]


def test_a_point_whose_best_weights_are_gone_is_repaired_once_said(sweep, argv, tmp_path, capsys, caplog):
    first = run_script(DEFAULTS, sweep, argv("--epochs", "1"))
    best = Path(first[0]["run_dir"]) / "best.safetensors"
    weights = load_file(best)
    best.unlink()
    with caplog.at_level(logging.WARNING):
        again = run_script(DEFAULTS, sweep, argv("--epochs", "1"))
    assert caplog.text.count(f"{best} is missing, so the run is not finished") == 1  # said once, not per check
    assert all((load_file(best)[k] == v).all() for k, v in weights.items()) and again[0]["test"] == first[0]["test"]


def test_a_sweep_extended_along_one_axis_finds_the_points_it_has(sweep, argv, tmp_path, capsys):
    """Folder names carry only the values a sweep varies, so the same point gets another name in a sweep
    that varies other keys; it is found by its config's hash and not trained again: a wider grid, one point
    alone (``iisan train``'s default name too), and a 4-process run of the point is another run."""
    from iisan.train.runnames import default_run_name, known_run_name, run_dir

    run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "2e-3"))
    names = folders(tmp_path / "runs")
    capsys.readouterr()
    run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "--seed", "12345", "7"))
    rows = summary_rows(capsys.readouterr().out)
    assert [r[2] for r in rows] == ["finished before", "finished"]  # seed 12345 is the lr sweep's seed
    assert [n for n in folders(tmp_path / "runs") if n not in names] == [rows[1][1]]
    run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "2e-3"))
    assert [r[2] for r in summary_rows(capsys.readouterr().out)] == ["finished before"]
    assert len(folders(tmp_path / "runs")) == 3
    (point,), _ = parse_script_args(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "2e-3"))
    lr = next(n for n in names if "lr0.002" in n)
    assert point.config.run_name == lr and run_dir(point.config.replace(run_name="")).name == lr  # iisan train
    other = point.config.replace(run_name="", lr=3e-3)
    assert known_run_name(other, "lr0.003") == default_run_name(other, "lr0.003")  # no such run: its own name


def test_a_grid_lists_its_out_dir_once_however_many_points(sweep, argv, tmp_path, monkeypatch):
    """A look per point, and per naming scheme, walked the whole out-dir: 400 points beside 4,000 run folders took
    17 s more, in every task of a job array (each builds the grid). The earlier sweep's point is found as before."""
    import os

    runs = tmp_path / "runs"
    earlier, _ = parse_script_args(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "2e-3"))
    for name in [p.config.run_name for p in earlier] + [f"iisan-cached-other-{n:08x}" for n in range(50)]:
        (runs / name).mkdir(parents=True)
    walks, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: walks.append(Path(path)) or scandir(path))
    points, _ = parse_script_args(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "--seed", "12345", "7", "8"))
    assert [w for w in walks if w == runs] == [runs]
    assert points[0].config.run_name == earlier[0].config.run_name  # seed 12345 is the lr sweep's
    assert len({p.config.run_name for p in points}) == 3 and not any("other" in p.config.run_name for p in points)


def test_an_earlier_sweeps_folder_is_found_only_as_one_folder_of_the_same_process_count(tmp_path, monkeypatch):
    """Found by its config's hash: a file named like a run is no run folder, a 4-process run is another run
    (and the one a 4-process launch finds), and two folders of the hash leave neither this config's for sure."""
    from iisan.config import Config
    from iisan.train import runnames

    cfg = Config(out_dir=str(tmp_path), lr=3e-3)
    head, tail = runnames.name_ends(cfg)
    (tmp_path / f"{head}-lr0.003-{tail}").write_text("a file")
    (tmp_path / f"{head}-seed7-4proc-{tail}").mkdir()
    assert runnames.known_run_name(cfg) == runnames.default_run_name(cfg)
    (tmp_path / f"{head}-seed7-{tail}").mkdir()
    assert runnames.known_run_name(cfg) == f"{head}-seed7-{tail}"
    (tmp_path / f"{head}-seed8-{tail}").mkdir()
    assert runnames.known_run_name(cfg) == runnames.default_run_name(cfg)
    monkeypatch.setattr(runnames, "launched_processes", lambda: 4)  # under torchrun, 4 processes
    assert runnames.known_run_name(cfg) == f"{head}-seed7-4proc-{tail}"


def test_grid_index_runs_exactly_one_point(sweep, argv, tmp_path, capsys, caplog):
    flags = ("--epochs", "1", "--lr", "1e-3", "2e-3", "3e-3", "--seed", "1", "2")
    assert run_script(DEFAULTS, sweep, argv(*flags, "--list-grid")) == []
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "6 grid point(s); run one alone with --grid-index I:"
    names = [line.split()[1] for line in listing[1:]]
    assert run_script(DEFAULTS, sweep, argv(*flags, "--list-grid", "--grid-index", "4")) == []  # that point alone
    assert capsys.readouterr().out.splitlines()[1:] == [listing[5]]
    for index in ("6", "-1"):  # one the grid lacks: refused, not ignored (nor counted from the end)
        with pytest.raises(SystemExit):
            run_script(DEFAULTS, sweep, argv(*flags, "--list-grid", "--grid-index", index))
        assert f"--grid-index {index}: the grid has 6 point(s), 0..5" in capsys.readouterr().err
    assert [line.split()[0] for line in listing[1:]] == ["0", "1", "2", "3", "4", "5"]
    assert listing[3].split()[2:] == ["lr=0.002", "seed=1"] and not (tmp_path / "runs").exists()
    with caplog.at_level("INFO", logger="iisan"):
        (result,) = run_script(DEFAULTS, sweep, argv(*flags, "--grid-index", "2"))
    assert folders(tmp_path / "runs") == [names[2]]
    assert f"grid point 2 (3 of 6): {names[2]}" in caplog.text  # its --grid-index, its place in the whole grid
    assert (result["config"]["lr"], result["config"]["seed"]) == (2e-3, 1)
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, argv(*flags, "--grid-index", "6"))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.endswith("error: --grid-index 6: the grid has 6 point(s), 0..5 "
                                                 "(see --list-grid)")


def test_a_swept_path_under_an_explicit_run_name_gives_one_safe_folder_per_point(argv, tiny, tmp_path):
    """A SWEEP over encoder folders: their '/' cannot go into a run name, and two paths that differ only in
    characters a folder name cannot hold still get folders of their own."""
    other = str(Path(tiny["text_model"]).parent / "bert_")
    sweep = {"text_model": [tiny["text_model"], other, other.replace("bert_", "bert/")]}
    flags = argv("--run-name", "mine")
    at = flags.index("--text-model")  # the flag would win over the SWEEP list
    points, _ = parse_script_args(DEFAULTS, sweep, flags[:at] + flags[at + 2:])
    names = [p.config.run_name for p in points]
    assert not any(p.error for p in points) and len(set(names)) == 3
    assert all(n.startswith("mine-text_model") and "/" not in n for n in names)


@pytest.mark.parametrize(("sig", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_an_interrupted_grid_says_which_point_and_to_rerun_the_same_command(sweep, argv, tmp_path, capsys,
                                                                              monkeypatch, sig, status):
    import signal

    import iisan.model.recommender as recommender_module

    loss, calls = recommender_module.in_batch_softmax_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 5:  # point 1, its second step
            signal.raise_signal(signal.Signals[sig])
        return loss(*args)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", interrupting)
    flags = argv("--epochs", "1", "--lr", "1e-3", "2e-3", "3e-3")
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, flags)
    out, err = capsys.readouterr()
    assert info.value.code == status
    assert [r[2] for r in summary_rows(out)] == ["finished", "interrupted", "not run"]
    assert err.strip().splitlines()[-1].endswith("To resume, run the same command again: finished points are "
                                                 "skipped, this one goes on from its checkpoint")
    assert f"grid point 1: {sig} during epoch 0 after step 2 of 3; checkpoint saved in" in err
    monkeypatch.undo()
    again = run_script(DEFAULTS, sweep, flags)  # as told: the same command
    assert [r["resumed_from"] for r in again] == [[], ["epoch-0000-step-00002"], []]
    assert [r[2] for r in summary_rows(capsys.readouterr().out)] == ["finished before", "finished", "finished"]


def test_an_interrupted_grid_names_the_points_that_failed_before_it(sweep, argv, capsys, monkeypatch):
    """Its last line told only to resume the interrupted point: a failure earlier in the grid was in the table
    alone, above a screen of log lines."""
    import signal

    import iisan.model.recommender as recommender_module

    loss, calls = recommender_module.in_batch_softmax_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 5:  # point 2, its second step (point 1 fails before any step)
            signal.raise_signal(signal.SIGINT)
        return loss(*args)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", interrupting)
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "fast", "2e-3"))
    out, err = capsys.readouterr()
    assert info.value.code == 130
    assert [r[2].split(":")[0] for r in summary_rows(out)] == ["finished", "failed", "interrupted"]
    assert err.strip().splitlines()[-1].endswith("this one goes on from its checkpoint; point(s) 1 failed before "
                                                 "it (the grid summary), tried again then")


def test_a_value_given_twice_is_one_point_and_an_invalid_one_is_named(sweep, argv, capsys):
    points, _ = parse_script_args(DEFAULTS, sweep, argv("--lr", "1e-3", "1e-3", "2e-3"))
    assert [p.values["lr"] for p in points] == [1e-3, 2e-3]
    points, _ = parse_script_args(DEFAULTS, sweep, argv("--lr", "1e-3", "0.001", "2e-3", "--seed", "1", "2"))
    assert [(p.index, p.values["lr"], p.values["seed"]) for p in points] == [  # one value written two ways
        (0, 1e-3, 1), (1, 1e-3, 2), (2, 2e-3, 1), (3, 2e-3, 2)]
    with pytest.raises(SystemExit):
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "abc"))
    assert capsys.readouterr().err.strip().endswith("error: 1 of 1 grid point(s) failed: 0 (lr='abc': expected a "
                                                    "number)")
    with pytest.raises(SystemExit) as listed:  # the listing names it too, and exits as a failed grid
        run_script(DEFAULTS, sweep, argv("--lr", "abc", "1e-3", "--list-grid"))
    out, err = capsys.readouterr()
    assert listed.value.code == 2 and "(invalid: lr='abc': expected a number)" in out.splitlines()[1]
    assert err.strip().endswith("error: 1 of 2 grid point(s) invalid: 0 (lr='abc': expected a number)")
    with pytest.raises(SystemExit):  # one point failing as it runs: its reason is on the last line too
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e30"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r".*error: 1 of 1 grid point\(s\) failed: 0 \(iisan-cached-\S+: non-finite loss at step 1 .*"
                        r"the run diverged.*\)", last), last


def test_values_of_a_key_the_method_never_reads_are_one_point(sweep, argv, caplog):
    # cached IISAN reads no static-shape setting and no LoRA rank: each value computes the same run
    with caplog.at_level(logging.WARNING):
        points, _ = parse_script_args(DEFAULTS, {**sweep, "lora_rank": [4, 8]}, argv("--lr", "1e-3", "2e-3"))
    assert [(p.values["lora_rank"], p.values["lr"]) for p in points] == [(4, 1e-3), (4, 2e-3)]
    said = "lora_rank: not read by method=iisan (feed=cached, towers=both); its values are one run"
    assert caplog.text.count(said) == 1
    points, _ = parse_script_args({"method": "lora"}, {**sweep, "lora_rank": [4, 8]}, argv())
    assert [p.values["lora_rank"] for p in points] == [4, 8]  # LoRA reads it


def test_a_method_given_to_another_methods_script_is_said_once(sweep, argv, caplog):
    """Flags win over a script's defaults, the method too: run_lora.py --method iisan trains IISAN, and
    says so rather than quietly."""
    with caplog.at_level(logging.WARNING):
        points, _ = parse_script_args({"method": "lora"}, sweep, argv("--method", "iisan", "--lr", "1e-3", "2e-3"))
    assert [p.config.method for p in points] == ["iisan", "iisan"]
    assert caplog.text.count("this entry script runs method=lora; the method=iisan given replaces it") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_script_args({"method": "lora"}, sweep, argv("--method", "lora"))
        parse_script_args({"method": "lora"}, sweep, argv())
    assert "replaces it" not in caplog.text  # its own method, given or not: nothing to say


def test_other_items_without_cache_dir_get_a_cache_folder_of_their_own(sweep, tiny, tmp_path):
    from iisan.data.datasets import dataset_paths
    from iisan.experiments.presets import ROOT, versa_defaults

    files = ["--users", tiny["users"], "--items", tiny["items"], "--out-dir", str(tmp_path / "runs")]
    points, _ = parse_script_args(DEFAULTS, sweep, files)
    own = Path(points[0].config.cache_dir)
    folder = Path(tiny["items"]).parent.name
    assert own.parent == ROOT / "Code_Cached" and own.name.startswith(f"stored_vectors_{folder}_")
    assert own != Path(dataset_paths("Scientific")["cache_dir"]) and not own.exists()
    again, _ = parse_script_args(DEFAULTS, sweep, [*files, "--dataset", "Instrument"])
    assert again[0].config.cache_dir == str(own)  # named by the items file, whichever data set is named
    given, _ = parse_script_args(DEFAULTS, sweep, [*files, "--cache-dir", str(tmp_path / "c")])
    assert given[0].config.cache_dir == str(tmp_path / "c")
    paper = dataset_paths("Scientific")
    theirs, _ = parse_script_args(DEFAULTS, sweep, ["--users", tiny["users"], "--items", paper["items"]])
    assert theirs[0].config.cache_dir == paper["cache_dir"]  # the data set's own items: its cache
    versa = versa_defaults("llama3-8b+vit-base", "Scientific")
    points, _ = parse_script_args(versa, sweep, files)
    assert points[0].config.cache_dir == f"{own}_llama3-8b+vit-base"  # the preset's suffix kept


def test_an_abbreviated_flag_is_refused_not_taken_for_a_config_key(sweep, capsys):
    with pytest.raises(SystemExit) as info:
        parse_script_args(DEFAULTS, sweep, ["--patien", "3"])  # --patience, spelled short
    assert info.value.code == 2 and "unrecognized arguments: --patien 3" in capsys.readouterr().err


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_grid_summary(rank, printed, monkeypatch, capsys):
    """Every rank runs the grid; the table is printed once (a point that fails still fails on each)."""
    import argparse

    from iisan.errors import GridError
    from iisan.experiments.sweep import GridPoint, run_grid

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = GridPoint(0, {"lr": "fast"}, None, "lr='fast': expected a number")
    with pytest.raises(GridError, match="1 of 1 grid point"):
        run_grid([bad], argparse.Namespace(grid_index=None))
    assert ("grid summary: 1 point(s): 1 failed" in capsys.readouterr().out) is printed


def test_a_point_another_process_is_training_is_skipped_not_failed(sweep, argv, tmp_path, capsys, caplog):
    """Two copies of one sweep share its points: a point whose folder another process holds is "in use"
    in the summary (with who holds it), the others run, and the grid does not fail for it."""
    import os

    from iisan.train.runfolder import lock_run_folder

    flags = argv("--epochs", "1", "--lr", "1e-3", "2e-3")
    points, _ = parse_script_args(DEFAULTS, sweep, flags)
    held = lock_run_folder(Path(points[1].config.out_dir) / points[1].name)
    try:
        with caplog.at_level("INFO"):
            results = run_script(DEFAULTS, sweep, flags)
    finally:
        held.close()
    rows = summary_rows(capsys.readouterr().out)
    assert rows[0][2] == "finished" and results[1] is None
    assert rows[1][2].startswith(f"in use: run folder {tmp_path / 'runs' / points[1].name} is in use by pid "
                                 f"{os.getpid()} on ") and "--run-name" not in rows[1][2]  # no name to give
    assert "1 point(s) were being trained by another process: run this command again" in caplog.text


def test_a_second_ctrl_c_leaves_the_point_interrupted_in_the_summary(sweep, argv, monkeypatch, capsys):
    import iisan.experiments.sweep as module

    def second_ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run_point", second_ctrl_c)
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "2e-3"))
    assert info.value.code == 130
    assert [r[2] for r in summary_rows(capsys.readouterr().out)] == ["interrupted", "not run"]


def test_a_signal_in_a_points_last_epoch_leaves_it_finished_in_the_summary(sweep, argv, monkeypatch, capsys):
    """The signal reached the point's last epoch: its run finished, and the table called it interrupted, without
    its metrics, and the last line said it would go on from its checkpoint."""
    import iisan.experiments.sweep as module
    from iisan.errors import RunInterrupted

    results = {"valid": {SELECTED_BY: 0.25}, "test": {m: 0.125 for m in HEADLINE}}

    def ended_in_its_last_epoch(point, total, action, args, left=""):
        if point.error:  # an invalid point fails as run_point fails it
            return module.Outcome(point, module.Status.FAILED, reason=point.error)
        raise RunInterrupted(f"SIGTERM during the last epoch, which ended the run: it is finished ({point.name})", "",
                             "SIGTERM", results)

    monkeypatch.setattr(module, "run_point", ended_in_its_last_epoch)
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3", "2e-3"))
    out, err = capsys.readouterr()
    assert info.value.code == 143
    assert [r[2:] for r in summary_rows(out)] == [["finished", "0.2500", *["0.1250"] * len(HEADLINE)],
                                                   ["not run", "", *[""] * len(HEADLINE)]]
    assert err.strip().splitlines()[-1].endswith("it is finished (" + summary_rows(out)[0][1] + "). To go on, run the "
                                                 "same command again: finished points are skipped")
    with pytest.raises(SystemExit):  # the grid's last point: nothing waits for the command to run again
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "1e-3"))
    assert capsys.readouterr().err.strip().endswith("). It was the grid's last point: none is left to run")
    with pytest.raises(SystemExit):  # unless a point failed before it (an invalid one here): a rerun tries it again
        run_script(DEFAULTS, sweep, argv("--epochs", "1", "--lr", "fast", "1e-3"))
    assert capsys.readouterr().err.strip().endswith("). It was the grid's last point; point(s) 0 failed before it "
                                                    "(the grid summary): run the same command again to try them again")


def test_the_summary_prints_each_status_as_its_value():
    outcomes = [Outcome(GridPoint(n, {}, None), status, reason="why" if status is Status.FAILED else "")
                for n, status in enumerate(Status)]
    text = summary(outcomes)
    assert "grid summary: 6 point(s): 1 finished, 1 finished before, 1 in use, 1 failed, 1 interrupted, 1 not run" \
        in text
    assert [r[2] for r in summary_rows(text)] == ["finished", "finished before", "in use", "failed: why",
                                                  "interrupted", "not run"]


def test_an_entry_script_takes_v_for_debug_logging(sweep, argv, capsys):
    """Logging is set up before an entry script reads its flags (so that a bad one is logged); ``-v`` still
    turns on debug logging, and with it the traceback of an unexpected operating-system error."""
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        assert run_script(DEFAULTS, sweep, argv("--list-grid")) == [] and root.level == logging.INFO
        assert run_script(DEFAULTS, sweep, argv("-v", "--list-grid")) == [] and root.level == logging.DEBUG
    finally:
        root.setLevel(before)
    assert capsys.readouterr().out.startswith("1 grid point(s)")


def test_a_paper_data_set_not_yet_here_names_the_command_that_fetches_it(sweep, tmp_path, monkeypatch, capsys):
    """An entry script run on --dataset's files before they are downloaded: one line with the fetch
    command, not a failed grid point; --list-grid needs no data; data given by flag is not checked here."""
    import iisan.experiments.sweep as sweep_module
    from iisan.data.datasets import dataset_paths

    monkeypatch.setattr(sweep_module, "dataset_paths", lambda name: dataset_paths(name, tmp_path))
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, sweep, ["--dataset", "Office", "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()
    assert f"error: users file {tmp_path / 'Dataset' / 'Office'}" in err  # (a long name is shown shortened)
    assert err.endswith(" does not exist: `iisan fetch data --dataset Office` downloads the data set "
                        "(Dataset/README.md: by hand)")
    run_script(DEFAULTS, sweep, ["--dataset", "Office", "--list-grid"])
    assert "grid point(s)" in capsys.readouterr().out


@pytest.mark.parametrize("key,values", [("epochs", ["1", "3"]), ("patience", ["2", "5"])])
def test_sweeping_what_only_says_how_a_run_goes_on_is_refused(sweep, argv, key, values, tmp_path, capsys):
    """Runs that differ only in epochs or patience (``methods.MAY_CHANGE``) share one folder: a longer run
    would resume the shorter one and take its place. Such a sweep is refused before any point runs."""
    grid = {**sweep, key: [1]}
    with pytest.raises(SystemExit) as info:
        run_script(DEFAULTS, grid, argv(f"--{key}", *values))
    assert info.value.code == 2 and not (tmp_path / "runs").exists()
    assert capsys.readouterr().err.strip().endswith(
        f"error: --{key} {' '.join(values)}: runs that differ only in {key} are one run (it says how a run goes on, "
        "not what it computes: a longer run resumes a shorter one in its folder); sweep one value at a time, each "
        "with its own --run-name")
    points, _ = parse_script_args(DEFAULTS, grid, argv(f"--{key}", values[0]))  # one value: a grid as any
    assert len(points) == len(parse_script_args(DEFAULTS, sweep, argv())[0])


def test_a_scripts_own_settings_kept_over_another_methods_paper_ones_are_named(argv, caplog):
    """run_fft.py --method lora trained LoRA at FFT's SWEEP rate (1e-4, not LoRA's paper 2e-4) with nothing but
    "replaces it" said: the kept settings are named with the paper's values, unless the user gave them."""
    fft_sweep = {"lr": [1e-4], "seed": [12345]}
    with caplog.at_level(logging.WARNING):
        points, _ = parse_script_args({"method": "fft"}, fft_sweep, argv("--method", "lora"))
    assert [(p.config.method, p.config.lr) for p in points] == [("lora", 1e-4)]  # precedence as documented
    assert ("this entry script runs method=fft; the method=lora given replaces it; the script's own lr=[0.0001] "
            "stays over LoRA's paper settings (lr=0.0002): give it as a flag, or run LoRA's own script") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        parse_script_args({"method": "fft"}, fft_sweep, argv("--method", "lora", "--lr", "3e-4"))
        parse_script_args({"method": "fft"}, {"lr": [2e-4]}, argv("--method", "lora"))  # LoRA's own: no word
    assert "stays over" not in caplog.text and caplog.text.count("replaces it") == 2


def test_each_point_says_the_time_the_grid_has_left_by_the_points_trained_so_far(monkeypatch, caplog):
    """A sweep of hours said which point it was at, never how long the rest would take: from the second point
    on, the mean time of the points this command trained, times the points left (a point found finished
    takes none and counts in no mean)."""
    import argparse
    import itertools

    import iisan.experiments.sweep as module
    from iisan.config import Config
    from iisan.experiments.sweep import GridPoint, run_grid

    clock = itertools.count(0.0, 30.0)  # read as a point starts and as it ends: each takes 30 s
    monkeypatch.setattr(module.time, "monotonic", lambda: next(clock))
    points = [GridPoint(i, {"seed": i}, Config(seed=i, run_name=f"p{i}")) for i in range(4)]
    with caplog.at_level("INFO", logger="iisan.experiments.sweep"):
        run_grid(points, argparse.Namespace(grid_index=None), action=lambda cfg, args: {"seed": cfg.seed})
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("grid point ")]
    each = "left for {} point(s), at the 30 s each of the {} trained so far"
    assert said == ["grid point 0 (1 of 4): p0", f"grid point 1 (2 of 4): p1; about 2 min {each.format(3, 1)}",
                    f"grid point 2 (3 of 4): p2; about 60 s {each.format(2, 2)}",
                    f"grid point 3 (4 of 4): p3; about 30 s {each.format(1, 3)}"]
    caplog.clear()
    ran = module.run_point  # point 0 found finished: it takes no time and counts in no mean
    monkeypatch.setattr(module, "run_point", lambda point, *rest: Outcome(point, Status.FINISHED_BEFORE) if
                        point.index == 0 else ran(point, *rest))
    with caplog.at_level("INFO", logger="iisan.experiments.sweep"):
        run_grid(points[:3], argparse.Namespace(grid_index=None), action=lambda cfg, args: {"seed": cfg.seed})
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("grid point ")]
    assert said == ["grid point 1 (2 of 3): p1", f"grid point 2 (3 of 3): p2; about 30 s {each.format(1, 1)}"]
    caplog.clear()  # points 1 and 3 finished before the grid: the time left is that of the points it will train
    monkeypatch.setattr(module, "found_finished", lambda point: point.index in (1, 3))
    monkeypatch.setattr(module, "run_point", lambda point, total, action, args, left: (
        logging.getLogger("iisan.experiments.sweep").info("grid point %d%s", point.index, left),
        Outcome(point, Status.FINISHED_BEFORE if point.index in (1, 3) else Status.FINISHED))[1])
    with caplog.at_level("INFO", logger="iisan.experiments.sweep"):
        run_grid(points, argparse.Namespace(grid_index=None))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("grid point ")]
    assert said == ["grid point 0", f"grid point 1; about 30 s {each.format(1, 1)}",
                    f"grid point 2; about 30 s {each.format(1, 1)}", "grid point 3"]
    assert module.time_left([], 3) == "" and module.time_left([3600.0, 7200.0], 4) == (
        "; about 6.0 h left for 4 point(s), at the 1.5 h each of the 2 trained so far")


def test_the_time_left_look_at_a_damaged_run_folder_stops_no_grid(tmp_path):
    """The quiet look before the grid (is this point's run finished?) met a results.json edited into a config no
    Config takes (an encoding with a NUL) and raised out of run_grid before any point ran, with no summary;
    the point itself, run, fails alone as before."""
    from iisan.config import Config
    from iisan.experiments.sweep import found_finished
    from iisan.train.runnames import run_dir

    cfg = Config(out_dir=str(tmp_path), run_name="damaged")
    run_dir(cfg).mkdir(parents=True)
    (run_dir(cfg) / "results.json").write_text(json.dumps(
        {"status": "finished", "config": {**cfg.to_dict(), "encoding": "utf\u0000"}}))
    assert found_finished(GridPoint(0, {}, cfg)) is False


def test_a_grid_of_another_action_takes_no_look_at_run_folders(monkeypatch):
    """Only training finds points finished before (a cache build, a Versa check: their own outputs)."""
    import argparse

    from iisan.config import Config
    from iisan.experiments import sweep

    monkeypatch.setattr(sweep, "found_finished", lambda point: pytest.fail("looked at a run folder"))
    points = [GridPoint(i, {"seed": i}, Config(seed=i, run_name=f"p{i}")) for i in range(2)]
    assert sweep.run_grid(points, argparse.Namespace(grid_index=None), action=lambda cfg, args: cfg.seed) == [0, 1]


@pytest.mark.parametrize("keep", [2, 0])
def test_a_grid_says_once_when_the_points_left_would_fill_its_disk(keep, monkeypatch, tmp_path, caplog):
    """Each run checked only its own checkpoints against the disk's free space, so a sweep of 20 FFT points (about
    109 GB kept) filled its disk hours in, at some point's epoch end. After each point it trains, the grid now
    weighs the points left to train (not those found finished) at the largest run folder so far, and says once
    when they would keep more than the disk holding the runs has free."""
    import argparse
    import types

    import iisan.experiments.grid as grid
    import iisan.experiments.sweep as module
    from iisan.config import Config

    kept = {0: 3000, 1: 5000, 2: 1000, 3: 1000, 4: 1000}  # bytes each point's run folder keeps

    def trained(point, total, action, args, left):
        folder = tmp_path / "runs" / f"p{point.index}"
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "epoch.safetensors").write_bytes(b"x" * (kept[point.index] - 1000))
        (folder / "best.safetensors").write_bytes(b"x" * 1000)
        return Outcome(point, Status.FINISHED, {"run_dir": str(folder)})

    monkeypatch.setattr(module, "run_point", trained)
    monkeypatch.setattr(module, "found_finished", lambda point: point.index == 4)
    asked = []
    monkeypatch.setattr(grid.shutil, "disk_usage", lambda path: asked.append(path) or types.SimpleNamespace(free=9500))
    points = [GridPoint(i, {"seed": i}, Config(seed=i, run_name=f"p{i}", keep_checkpoints=keep)) for i in range(5)]
    with caplog.at_level("WARNING", logger="iisan.experiments.sweep"):
        module.run_grid(points, argparse.Namespace(grid_index=None))
    # after point 0: 3 points left x 3,000 bytes fit in 9,500; after point 1: 2 x 5,000 do not; then nothing more
    fewer = ", or run it with --keep-checkpoints 0 (a finished point keeps its best.safetensors alone)" if keep else ""
    assert [r.getMessage() for r in caplog.records] == [
        f"the 2 point(s) left to train would keep about 9.8 KiB in {tmp_path / 'runs'}, at the 4.9 KiB of the largest "
        f"run folder so far, and its disk has 9.3 KiB free: free some space{fewer}, or a full disk stops a point at an "
        "epoch's end"]
    assert asked == [tmp_path / "runs"] * 2
    assert grid.disk_short([], 3, tmp_path, 2) is None and grid.disk_short([10**9], 0, tmp_path, 2) is None
    assert grid.disk_short([4750, 1000], 2, tmp_path, 2) is None  # as much as is free: it fits
    assert "about 9.3 KiB in" in grid.disk_short([4751, 1000], 2, tmp_path, 2)  # the largest, not the last
    (tmp_path / "outside").write_bytes(b"x" * 10**6)  # a link counts as itself, not as what it points at
    (tmp_path / "runs" / "p0" / "link").symlink_to(tmp_path / "outside")
    link = len(str(tmp_path / "outside"))
    assert grid.folder_bytes(tmp_path / "runs") == sum(kept.values()) + link


def test_a_failed_look_at_the_disk_gives_no_warning_and_stops_no_grid(tmp_path):
    """The disk weighing runs between points: a folder gone meanwhile (or a network file system's error) must not
    end the grid with a traceback."""
    from iisan.experiments.grid import disk_short

    assert disk_short([10**9], 2, tmp_path / "gone", 2) is None
