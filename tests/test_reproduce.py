"""`make reproduce`: on the demo data (fetch skipped) it trains three seeds and writes the table of
mean ± std beside the paper's numbers; without data or encoders it names the missing step."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from iisan.config import Config
from iisan.console import fixed
from iisan.errors import ConfigError, RunInterrupted
from iisan.experiments.report_rows import read_row_columns
from iisan.experiments.reproduce import PAPER_EFFICIENCY, Reproduction, StepMissing, reproduce, table
from iisan.metric_names import TABLED

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_on_the_demo_data_writes_the_table_of_three_seeds(tmp_path, caplog):
    run = Reproduction("demo", tmp_path, seeds=(1, 2, 3), fetch=False,
                       overrides={"epochs": 1, "device": "cpu", "progress": False, "num_workers": 0},
                       demo_sizes={"num_users": 120, "num_items": 40})
    with caplog.at_level("INFO", logger="iisan.experiments.reproduce"):
        path = reproduce(run)
    assert path == tmp_path / "reproduce-demo.md"
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m[:9] for m in steps] == ["step 1 of", "step 2 of", *["step 3 of"] * 3, "step 4 of"]
    assert steps[-1] == f"step 4 of 4: the table, written to {path}"  # (it said where only by its return)
    results = [json.loads((tmp_path / "runs" / f"reproduce-demo-seed{s}" / "results.json").read_text())
               for s in (1, 2, 3)]
    assert [r["config"]["seed"] for r in results] == [1, 2, 3]
    hits = np.array([r["test"]["hit@10"] for r in results])
    ndcgs = np.array([r["test"]["ndcg@10"] for r in results])
    lines = path.read_text().splitlines()
    ours = next(line for line in lines if line.startswith("| this reproduction | 3 |"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    assert cells[2] == f"{fixed(hits.mean())} ± {fixed(hits.std(ddof=1))}"
    assert cells[3] == f"{fixed(ndcgs.mean())} ± {fixed(ndcgs.std(ddof=1))}"
    paper = next(line for line in lines if line.startswith("| paper (IISAN) |"))
    assert f"| {PAPER_EFFICIENCY['train_s_per_epoch']:.0f} |" in paper and "3 GB" in paper
    peaks = [r["peak_memory_by_phase"]["training"]["peak_rss_gib"] for r in results]  # the training steps' peak
    assert cells[-1] == f"{max(peaks):.2f} GiB" and "peak memory (of the seed that used most)" in lines[4]
    assert "the process's peak resident memory on a CPU" in path.read_text()
    assert cells[-2] != "0.0"  # (a tenth of a second was written 0.0: small times keep two digits)
    assert "not comparable with the paper" in path.read_text() and "commit:" in path.read_text()
    files = [tmp_path / "runs" / f"reproduce-demo-seed{s}" / "results.json" for s in (1, 2, 3)]
    stamps = [f.stat().st_mtime_ns for f in files]
    reproduce(run)  # a rerun reuses the finished runs: nothing trains, no results file is written again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    said = (tmp_path / "reproduce-demo.log").read_text()  # each command's lines after its header, the runs' too
    assert said.count("=== reproduction: started ") == 2 and said.count("step 4 of 4: the table, written to") == 2
    assert "INFO iisan.train.trainer: " in said and "INFO iisan.model.caching: caching " in said
    assert json.loads(files[0].read_text())["test"] == results[0]["test"]


def seed_row(seed: int, status: str, hit: float) -> dict:
    """A ``report_rows.read_row`` row of one seed's run, by hand."""
    row = dict.fromkeys(read_row_columns())
    row.update({k: str(v) for k, v in Config().to_dict().items() if k in row})
    row.update(run=f"s{seed}", method="IISAN", feed="cached", data="demo", data_files="abc", image_files="def",
               status=status, seed=str(seed), best_epoch=1, epochs_run=2, train_s_per_epoch=1.5, trainable_params=10,
               peak_gib=0.5, device="cpu", folder=f"/r/s{seed}", written="x", non_finite="", processes="1",
               **{"valid_hit@10": hit, **{f"test_{m}": hit for m in TABLED}})
    return row


def test_a_seed_that_cannot_be_averaged_with_the_others_gets_a_row_of_its_own():
    """A seed ended at a NaN (--nonfinite authors): its own row, named by its status; the table once showed
    the first group alone, 'seeds 2' under a heading that named three."""
    lines = table("demo", [seed_row(0, "finished", 0.1), seed_row(1, "finished", 0.2),
                           seed_row(2, "finished (NaN)", 0.3)]).splitlines()
    assert lines[2].startswith(f"| this reproduction (status finished) | 2 | {fixed(0.15)} ± {fixed(0.0707107)} |")
    assert lines[3].startswith(f"| this reproduction (status finished (NaN)) | 1 | {fixed(0.3)} | ")
    assert lines[4].startswith("| paper (IISAN) |") and len(lines) == 5
    alike = table("demo", [seed_row(0, "finished", 0.1), seed_row(1, "finished", 0.2)]).splitlines()
    assert alike[2].startswith("| this reproduction | 2 | ") and len(alike) == 4


def test_each_row_shows_the_memory_of_its_own_seeds():
    """It showed the largest peak of all seeds on each row (8.00 GiB, the NaN seed's, beside two of 1 and
    2 GiB); seeds run on two devices have no one peak or time: '-'."""
    rows = [seed_row(0, "finished", 0.1), seed_row(1, "finished", 0.2), seed_row(2, "finished (NaN)", 0.3)]
    for row, peak in zip(rows, (1.0, 2.0, 8.0), strict=True):
        row["peak_gib"] = peak
    lines = table("demo", rows).splitlines()
    assert lines[2].endswith("| 1.5 | 2.00 GiB |") and lines[3].endswith("| 1.5 | 8.00 GiB |")
    rows[1]["device"] = "NVIDIA H100"
    assert table("demo", rows[:2]).splitlines()[2].endswith("| - | - |")


def test_without_the_data_it_names_the_missing_step_and_how_to_do_it(tmp_path):
    with pytest.raises(StepMissing) as err:
        reproduce(Reproduction("Scientific", tmp_path / "out", fetch=False), root=tmp_path)
    message = str(err.value)
    assert message.startswith("step 1 of 4 (data): ") and "am_Industrial_and_Scientific_users.tsv is missing" in message
    assert "`iisan fetch data --dataset Scientific`" in message


def instrument_by_hand(tmp_path: Path, tiny) -> Path:
    """The tiny data set's files where the Instrument data set's go, as a user puts them there by hand."""
    folder = tmp_path / "Dataset" / "Instrument"
    (folder / "images.lmdb").mkdir(parents=True)
    (folder / "am_Musical_Instruments_users_10K.tsv").write_text(Path(tiny["users"]).read_text())
    (folder / "Musical_Instruments_items.tsv").write_text(Path(tiny["items"]).read_text())
    return folder


def test_data_put_in_place_by_hand_must_be_the_paper_s_data_set(tmp_path, tiny):
    """Files put there by hand (here the tiny data set) were trained on and labelled the paper's data set; they
    are checked against its size after the protocol, as the fetch checks them (data of that size goes on to
    the next step: the test below)."""
    from iisan.errors import DataError

    folder = instrument_by_hand(tmp_path, tiny)
    with pytest.raises(DataError) as err:
        reproduce(Reproduction("Instrument", tmp_path / "out", fetch=False), root=tmp_path)
    assert str(err.value) == (
        "step 1 of 4 (data): Instrument: 160 users / 56 items / 1,218 interactions after the paper's protocol; the "
        "paper's data set has 10,000 / 19,246 / 75,022; put the authors' files in "
        f"{folder} (`iisan fetch data --dataset Instrument` fetches and checks them)")
    assert not (tmp_path / "out" / "runs").exists()


def test_without_a_cache_or_encoders_it_names_the_cache_step(tmp_path, tiny, monkeypatch):
    from dataclasses import replace

    from iisan.data.sources import SOURCES, Stats

    monkeypatch.setitem(SOURCES, "Instrument", replace(SOURCES["Instrument"], stats=Stats(160, 56, 1218)))  # tiny's
    instrument_by_hand(tmp_path, tiny)
    with pytest.raises(StepMissing) as err:
        reproduce(Reproduction("Instrument", tmp_path / "out", fetch=False), root=tmp_path)
    message = str(err.value)
    assert message.startswith("step 2 of 4 (cache): ") and "stored_vectors_ins/text.safetensors is missing" in message
    assert str(tmp_path / "pretrained_models" / "bert-base-uncased") in message
    assert "`iisan fetch encoders`" in message and "IMPORT=DIR" in message


@pytest.mark.slow
def test_the_script_and_the_make_target(tmp_path):
    done = subprocess.run([sys.executable, "scripts/reproduce.py", "--dataset", "Office", "--no-fetch", "--root",
                           str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "reproduce.py: error: step 1 of 4 (data): ") and "--dataset Office" in done.stderr
    plan = subprocess.run(["make", "-n", "reproduce", "DATASET=demo", "IMPORT=states", "REPRODUCE_FLAGS=--epochs 1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "scripts/reproduce.py --dataset demo --import-from states --epochs 1" in plan.stdout


@pytest.mark.parametrize("argv, flag", [(["--epochs", "0"], "--epochs"), (["--device", "gpu"], "--device"),
                                        (["--demo-users", "0"], "--demo-users"),
                                        (["--demo-items", "-1"], "--demo-items"), (["--seeds", "-1"], "--seeds"),
                                        (["--seeds", "1", str(2**32)], "--seeds"), (["--seeds", "1_2"], "--seeds"),
                                        (["--seeds", "\u0665"], "--seeds")])  # int() reads both: 12 and 5
def test_bad_arguments_fail_at_parse_time_before_the_demo_data(argv, flag, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("reproduce_script", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--dataset", "demo", "--out", str(tmp_path / "repro"), *argv])
    assert stopped.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "repro").exists()


def test_bad_overrides_fail_before_the_demo_data(tmp_path):
    with pytest.raises(ConfigError, match="epochs=0 must be positive"):
        reproduce(Reproduction("demo", tmp_path / "repro", overrides={"epochs": 0}))
    assert not (tmp_path / "repro").exists()


def test_an_interrupted_seed_says_to_rerun_the_same_command(tiny_config, tmp_path, monkeypatch):
    from iisan.experiments import reproduce as module

    def interrupted(cfg):
        raise RunInterrupted("SIGTERM at step 3; checkpoint saved in x", f"To resume, run the same command with "
                                                                         f"--run-name {cfg.run_name}", "SIGTERM")

    monkeypatch.setattr(module, "base_config", lambda run, root: tiny_config())
    monkeypatch.setattr(module, "ensure_cache", lambda cfg, run: None)
    monkeypatch.setattr(module, "train", interrupted)
    with pytest.raises(RunInterrupted) as stopped:
        reproduce(Reproduction("demo", tmp_path))
    assert "--run-name" not in str(stopped.value) and "run the same command again" in str(stopped.value)
    assert stopped.value.signal == "SIGTERM"  # and so the command exits as a job SIGTERM stopped: 143
    said = (tmp_path / "reproduce-demo.log").read_text().splitlines()  # its log says where it stood, and why not
    assert said[0].startswith("=== reproduction: started ") and said[1].startswith("command: ")
    assert said[3].endswith("INFO iisan.experiments.reproduce: step 1 of 4: the demo data")
    assert said[-1].endswith("the reproduction ended: SIGTERM at step 3; checkpoint saved in x. To go on, run the "
                             "same command again: finished seeds are reused, this one goes on from its checkpoint")
