"""Small pure checks of run records, results tables and training set-up: how a run's end is named, the
console's epoch line, timing averages, non-finite marking, seed-table configs, optimizer groups and refused
step combinations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from iisan.config import Config
from iisan.data.run_data import load_data
from iisan.errors import RunInterrupted
from iisan.experiments.report import seconds
from iisan.experiments.report_rows import read_row
from iisan.experiments.results_file import unfinished
from iisan.experiments.seed_table import DATASETS, point_config
from iisan.model.build import build_model
from iisan.train.optim import make_optimizer, trained_by_rate
from iisan.train.progress import EarlyStopping, Progress
from iisan.train.records import RunRecord, epoch_line, error_status
from iisan.train.step import make_train_step


def test_ctrl_c_and_a_stop_request_are_interruptions_other_errors_failures():
    assert error_status(KeyboardInterrupt()) == ("interrupted", "KeyboardInterrupt")
    assert error_status(RunInterrupted("stop asked"))[0] == "interrupted"
    assert error_status(ValueError("bad")) == ("failed", "ValueError: bad")


def test_seconds_keep_two_significant_digits_below_0_95():
    assert seconds(0.73) == "0.73"
    assert seconds(0.94) == "0.94"
    assert seconds(0.96) == "1.0"
    assert seconds(0.045) == "0.045"
    assert seconds(12.34) == "12.3"


def test_epoch_line_shows_each_splits_own_numbers():
    record = {"epoch": 3, "loss": 1.5, "train_seconds": 2.0, "eval_seconds": 1.0,
              "valid": {"hit@10": 0.1111, "ndcg@10": 0.2222}, "test": {"hit@10": 0.3333, "ndcg@10": 0.4444}}
    line = epoch_line(record, 0)
    valid_part, test_part = line.split(" | test ")
    assert "hit@10 0.1111" in valid_part and "ndcg@10 0.2222" in valid_part
    assert test_part == "hit@10 0.3333 ndcg@10 0.4444 (best)"
    assert epoch_line({**record, "test": None}, 2).endswith("| 2 epoch(s) without improvement")
    assert " | loss 1.5000 | " in line  # a diverging run's loss in few digits, not 917430180047736537088.0000:
    assert " | loss 9.1743e+20 | " in epoch_line({**record, "loss": 917430180047736537088.0}, 0)


def _progress(train_seconds: list[float]) -> Progress:
    progress = Progress(stopper=EarlyStopping(patience=5))
    progress.epochs = [{"epoch": i, "train_seconds": s, "eval_seconds": 1.0} for i, s in enumerate(train_seconds)]
    return progress


def test_train_seconds_per_epoch_is_the_mean_without_the_first_epoch():
    timing = _progress([9.0, 1.0, 2.0, 6.0]).timing()
    assert timing["train_seconds_per_epoch"] == pytest.approx(3.0)  # (1 + 2 + 6) / 3; the median would be 2
    assert timing["first_epoch_train_seconds"] == 9.0
    assert _progress([4.0]).timing()["train_seconds_per_epoch"] == 4.0
    assert _progress([]).timing()["train_seconds_per_epoch"] is None


def test_a_resumed_runs_first_epoch_pays_warm_up_again_and_is_left_out_too():
    """Epochs 0 and 2 began an attempt (the run resumed at 2): the mean is of epochs 1 and 3 alone."""
    progress = _progress([9.0, 1.0, 8.0, 3.0])
    for record, warm in zip(progress.epochs, (True, False, True, False), strict=True):
        record["warm_up"] = warm
    assert progress.timing()["train_seconds_per_epoch"] == pytest.approx(2.0) and \
        progress.timing()["first_epoch_train_seconds"] == 9.0
    for record in progress.epochs:
        record["warm_up"] = True  # every epoch an attempt of its own: nothing else to take
    assert progress.timing()["train_seconds_per_epoch"] == pytest.approx(5.25)


def _results(tmp_path, status: str, error: str = "", test: dict | None = None) -> dict:
    record = RunRecord(Config(method="id", device="cpu", out_dir=str(tmp_path)), tmp_path, torch.device("cpu"))
    progress = _progress([2.0, 1.0])
    progress.best_valid = {"hit@10": 0.5, "ndcg@10": 0.25}
    progress.best_test = test or {"hit@10": 0.4, "ndcg@10": 0.2, "hit@20": 0.6, "ndcg@20": 0.3}
    return record.results(progress, status, error)


def test_only_a_finished_run_says_how_it_ended(tmp_path):
    assert _results(tmp_path, "finished")["ended"] == "last epoch"
    for status in ("failed", "interrupted"):
        results = _results(tmp_path, status, "boom")
        assert "ended" not in results and results["error"] == "boom"


def test_an_infinite_metric_is_marked_non_finite_like_nan(tmp_path):
    results = _results(tmp_path, "finished", test={"hit@10": math.inf, "ndcg@10": math.nan, "hit@20": -math.inf,
                                                   "ndcg@20": 0.3})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    row = read_row(path, json.loads(path.read_text()))
    assert row["non_finite"] == "test_hit@10,test_ndcg@10,test_hit@20"


def test_the_data_column_names_the_users_files_folder_however_its_path_is_spelt(tmp_path):
    """``Dataset/Scientific/x/../users.tsv`` is Scientific's file: the table's data column said '..'."""
    results = _results(tmp_path, "finished")
    path = tmp_path / "results.json"
    for spelt in ("Dataset/Scientific/x/../users.tsv", "Dataset/Scientific/./users.tsv", "Dataset/Scientific/u.tsv"):
        results["config"]["users"] = spelt
        path.write_text(json.dumps(results))
        assert read_row(path, json.loads(path.read_text()))["data"] == "Scientific", spelt


def test_unfinished_says_nothing_of_a_run_without_epochs(tmp_path):
    path = tmp_path / "run" / "results.json"
    for status in ("failed", "interrupted"):
        assert unfinished(path, {"status": status, "epochs": []}, 10) == ""
        assert unfinished(path, {"status": status}, 10) == ""
    said = unfinished(path, {"status": "failed", "epochs": [{"epoch": 0}, {"epoch": 1}]}, 10)
    assert "failed after 2 of its 10 epochs" in said


def test_a_seed_table_point_is_configured_with_its_seed(tmp_path):
    spec = DATASETS["Scientific"]
    folder = tmp_path / spec.folder
    folder.mkdir(parents=True)
    (folder / spec.users_file).write_text("")
    (folder / spec.items_file).write_text("")
    for seed in (7, 12345):
        assert point_config("id", "Scientific", seed, tmp_path, tmp_path / "work").seed == seed


def test_the_optimizer_holds_exactly_the_trainable_parameters(tiny_config):
    cfg = tiny_config(method="iisan", feed="live")
    model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0  # the backbones: else this would check nothing
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert sum(trained_by_rate(optimizer).values()) == trainable
    # param_groups may list frozen parameters too (ItemEncoder.param_groups): the optimizer keeps only trainable ones
    for module in (model.user_encoder, model.item_encoder):
        next(module.parameters()).requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert sum(trained_by_rate(optimizer).values()) == trainable
    assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])


def test_an_fp16_cudagraph_step_is_refused():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="cudagraph steps need amp=bf16"):
        make_train_step(model, optimizer, torch.float16, torch.device("cpu"), compiled="cudagraph")


def test_train_log_that_cannot_be_opened_for_its_handler_is_one_line(tmp_path, monkeypatch):
    """The header was written inside the write's handler, the log handler's own open outside it: a full disk
    between the two was a traceback in a sweep's log (``iisan train`` alone said one line by luck)."""
    import errno

    import iisan.logfiles as logfiles
    from iisan.errors import OutputError

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logfiles, "LogFile", full_disk)
    record = RunRecord(Config(method="id", device="cpu", out_dir=str(tmp_path)), tmp_path, torch.device("cpu"))
    with pytest.raises(OutputError) as caught:
        record.start_log()
    assert str(caught.value) == f"could not write {tmp_path / 'train.log'}: No space left on device"
    assert record.log_file.handler is None


@pytest.mark.parametrize("results, lock, said", [
    ({}, False, "has no best.safetensors yet (written when an epoch's validation improves)"),  # config.json alone
    ({"status": "running"}, True, "has no best.safetensors yet (written when an epoch's validation improves)"),
    ({"status": "running"}, None, "has no best.safetensors yet (written when an epoch's validation improves)"),
    ({"status": "running"}, False, "holds a run that was killed (its command, run again, starts it again) before an "
                                   "epoch's validation wrote best.safetensors: nothing to use"),
    ({"status": "finished"}, False, "is a finished run without its best.safetensors: its command, run again, writes "
                                    "it again from the checkpoint of its best epoch, where one is kept"),
    ({"status": "failed", "error": "disk full"}, False, "holds a run that failed (disk full) before an epoch's "
                                                        "validation wrote best.safetensors: nothing to use"),
], ids=["no-results", "training-here", "lock-unreadable", "killed", "finished", "failed"])
def test_a_run_without_best_weights_is_said_to_be_so_by_how_it_ended(results, lock, said, tmp_path, monkeypatch):
    """A run still training (its lock held, or not readable here) has no weights yet; one whose lock no process
    holds was killed; a folder with no results file has none yet, not a finished run's deleted ones."""
    from iisan.experiments import results_file

    monkeypatch.setattr(results_file, "held", lambda lock_path: lock)
    assert results_file.without_weights(tmp_path / "results.json", results) == f"{tmp_path} {said}"
