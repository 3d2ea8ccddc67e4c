"""What a run leaves while it runs: train.log, metrics.jsonl and results.json current after every epoch,
TensorBoard scalars when asked for (one line when the package is absent). Killed, failed and
interrupted runs: tests/test_resume.py."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

import iisan.train.trainer as trainer
from iisan.files import shown_bytes
from iisan.train.trainer import train


@pytest.fixture()
def cached_cfg(tiny_config, tiny_cache):
    return tiny_config(cache_dir=tiny_cache, epochs=3, max_steps_per_epoch=3)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_epoch_leaves_its_record_on_disk(cached_cfg, monkeypatch):
    run_dir = Path(cached_cfg.out_dir) / cached_cfg.run_name
    seen = []
    epoch_of = trainer.Run.train_epoch

    def checked(self, epoch):
        """At the start of epoch e, the files hold epochs 0..e-1 and say the run is running."""
        metrics = read_lines(run_dir / "metrics.jsonl")
        results = json.loads((run_dir / "results.json").read_text())
        log_text = (run_dir / "train.log").read_text()
        assert [m["epoch"] for m in metrics] == list(range(epoch))
        assert results["status"] == "running" and results["epochs"] == metrics
        assert (f" epoch {epoch - 1:3d} | loss " in log_text) == (epoch > 0)
        assert f" epoch {epoch:3d} | loss " not in log_text
        seen.append(epoch)
        return epoch_of(self, epoch)

    monkeypatch.setattr(trainer.Run, "train_epoch", checked)
    results = train(cached_cfg)
    assert seen == [0, 1, 2]
    assert results["status"] == "finished" and json.loads((run_dir / "results.json").read_text()) == results
    assert list(results["parameters"]) == ["trainable", "total", "by_rate"]  # ParameterCount's fields, in order
    metrics = read_lines(run_dir / "metrics.jsonl")
    assert metrics == results["epochs"]
    assert set(metrics[0]) >= {"epoch", "loss", "train_seconds", "eval_seconds", "steps", "valid", "test"}
    ended = [datetime.strptime(e["ended_at"], "%Y-%m-%d %H:%M:%S %z").timestamp() for e in metrics]  # to the second
    assert ended == sorted(ended) and abs(ended[-1] - time.time()) < 600
    assert set(metrics[0]["valid"]) == {f"{m}@{k}" for m in ("hit", "ndcg") for k in (5, 10, 20)}
    log_text = (run_dir / "train.log").read_text()
    assert log_text.startswith(f"=== {cached_cfg.run_name}: started ") and '"lr": 0.0002' in log_text
    assert "versions: python " in log_text and " | best epoch " not in log_text
    assert log_text.rstrip().splitlines()[-1].split(": ", 1)[1].startswith("best epoch ")
    assert not (run_dir / "tensorboard").exists()
    stamp = (run_dir / "results.json").stat().st_mtime_ns
    monkeypatch.setattr(trainer, "Run", None)  # the same command again trains nothing
    assert train(cached_cfg) == results and (run_dir / "results.json").stat().st_mtime_ns == stamp


BARE = """
import json, logging, sys
from iisan.config import Config
from iisan.train.trainer import train
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.WARNING, format="mine %(levelname)s: %(message)s")
train(Config.from_dict(json.loads(sys.argv[1])))
assert not logging.getLogger("iisan").handlers, logging.getLogger("iisan").handlers  # none left behind
"""


@pytest.mark.parametrize("logging_set_up", ["bare", "configured"])
def test_a_library_call_no_one_set_logging_up_for_shows_what_a_command_shows(cached_cfg, tmp_path, logging_set_up):
    """A notebook's or a script's train() showed nothing for a whole run, not even its warnings: train.log's handler
    kept logging's last resort away. Where the caller set logging up, their handler shows the lines in their format
    (the run's INFO ones too, as docs/runs.md says), and nothing shows twice."""
    import subprocess

    from ._scripts import ROOT

    cfg = cached_cfg.replace(epochs=1, method="adapter", lr_image=3e-3, out_dir=str(tmp_path), progress=False)
    done = subprocess.run([sys.executable, "-c", BARE, json.dumps(cfg.to_dict()), logging_set_up], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    idle = [line for line in lines if "lr_image=0.003: no parameter of this run trains at it" in line]
    if logging_set_up == "bare":
        assert len(idle) == 1 and " WARNING iisan.train.optim: " in idle[0]
        assert sum(" INFO iisan.train.trainer: epoch   0 | loss " in line for line in lines) == 1
    else:  # the caller's handler and format alone
        assert len(idle) == 1 and idle[0].startswith("mine WARNING: ")
        assert sum(line.startswith("mine INFO: epoch   0 | loss ") for line in lines) == 1
        assert not any(" iisan." in line for line in lines)
    assert (tmp_path / cfg.run_name / "train.log").read_text().count("epoch   0 | loss ") == 1


def test_tensorboard_absent_is_one_line_and_the_run_goes_on(cached_cfg, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now fails
    results = train(cached_cfg.replace(epochs=1, report_to="tensorboard"))
    lines = [r.getMessage() for r in caplog.records if "package" in r.getMessage()]
    assert lines == ["--report-to tensorboard: the tensorboard package is not installed (pip install "
                     "tensorboard); train.log and metrics.jsonl are written, TensorBoard scalars are not"]
    assert results["status"] == "finished" and not (Path(results["run_dir"]) / "tensorboard").exists()


def test_tensorboard_scalars_are_the_epoch_records(cached_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = train(cached_cfg.replace(report_to="tensorboard"))
    events = EventAccumulator(str(Path(results["run_dir"]) / "tensorboard"))
    events.Reload()
    hits = [(e.step, e.value) for e in events.Scalars("valid/hit@10")]
    assert hits == [(r["epoch"], pytest.approx(r["valid"]["hit@10"])) for r in results["epochs"]]
    assert [e.step for e in events.Scalars("test/ndcg@10")] == [r["epoch"] for r in results["epochs"] if "test" in r]
    assert {"loss", "seconds/train", "seconds/eval"} <= set(events.Tags()["scalars"])


def test_an_epoch_trained_again_after_its_checkpoint_was_lost_shows_once_in_tensorboard(cached_cfg, monkeypatch):
    """An epoch is logged before its checkpoint is written; killed in between, the run trains it again: each
    attempt's writer added its scalars, so TensorBoard drew the epoch twice. metrics.jsonl never did."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from iisan.train import resuming

    cfg, save = cached_cfg.replace(report_to="tensorboard", epochs=2), resuming.RunCheckpoints.save

    def lost(self, epoch, *args, **kwargs):
        if epoch == 1:
            raise OSError(28, "No space left on device")  # as a kill there leaves it: epoch 1 logged, not saved
        return save(self, epoch, *args, **kwargs)

    monkeypatch.setattr(resuming.RunCheckpoints, "save", lost)
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg)
    monkeypatch.setattr(resuming.RunCheckpoints, "save", save)
    results = train(cfg)
    assert [r["epoch"] for r in results["epochs"]] == [0, 1]
    events = EventAccumulator(str(Path(results["run_dir"]) / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["epoch"], pytest.approx(r["loss"])) for r in results["epochs"]]


def test_a_disk_short_of_the_runs_checkpoints_is_said_at_the_start(cached_cfg, monkeypatch, caplog):
    """A full disk stopped an FFT run at its second epoch's end (hours on a GPU): said before the first step."""
    from collections import namedtuple

    from iisan.train import resuming

    caplog.set_level(logging.INFO, logger="iisan")
    train(cached_cfg.replace(epochs=1, run_name="roomy"))
    assert "checkpoints need about" not in caplog.text
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(resuming.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 5000, 5000))
    results = train(cached_cfg.replace(epochs=1, run_name="cramped"))
    trainable = results["parameters"]["trainable"]
    line = next(r.getMessage() for r in caplog.records if "checkpoints need about" in r.getMessage())
    assert line.startswith(f"the disk holding {results['run_dir']} has 4.9 KiB free; this run's checkpoints need "
                           f"about {shown_bytes(3 * 12 * trainable + 4 * trainable)} more ("
                           f"{shown_bytes(12 * trainable)} each, --keep-checkpoints 2, and best.safetensors)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM (the process's own peak) is Linux's")
def test_a_runs_peak_memory_is_its_own_not_that_of_what_ran_before_in_its_process(cached_cfg):
    """A sweep's second point, or the demo's run after its cache build: the peak counts from the run's start."""
    import numpy as np

    blob = np.ones(2**29 // 8)  # 512 MiB, then freed: what an earlier run in this process left as the peak
    del blob
    results = train(cached_cfg.replace(run_name="own-peak"))
    memory = results["peak_memory"]
    assert memory["rss_peak_since"] == "the run's start"
    assert memory["peak_rss_gib"] - memory["current_rss_gib"] < 0.3, memory  # a tiny run: not the 512 MiB


def test_the_run_folder_line_names_the_precision_as_results_json_does(cached_cfg, caplog):
    caplog.set_level("INFO", logger="iisan")
    results = train(cached_cfg.replace(run_name="amp-line", epochs=1))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run folder ")]
    assert results["step"]["amp"] == "fp32" and f"amp fp32, compiled {results['step']['compiled']}, cache " \
        "float32)" in line  # what cache_dtype auto came to, as results.json's step.cache_dtypes


def test_an_error_after_results_json_said_finished_leaves_the_run_finished(cached_cfg):
    """A search loop's log handler that raises at the run's summary line (to prune, or a bug of its own): the run
    had finished, results.json said so, and the error then rewrote it as failed, to be trained again."""
    class Pruner(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("best epoch"):
                raise RuntimeError("pruned")

    cfg, pruner = cached_cfg.replace(run_name="pruned-at-the-end", epochs=1), Pruner()
    logging.getLogger("iisan").addHandler(pruner)
    try:
        with pytest.raises(RuntimeError, match="pruned"):
            train(cfg)
    finally:
        logging.getLogger("iisan").removeHandler(pruner)
    folder = Path(cfg.out_dir) / "pruned-at-the-end"
    assert json.loads((folder / "results.json").read_text())["status"] == "finished"
    assert "this attempt ended after the run finished (failed: RuntimeError: pruned); the run in this folder is as " \
           "it was" in (folder / "train.log").read_text()
    assert train(cfg)["status"] == "finished"  # finished before: returned, not trained again


def test_an_unexpected_error_leaves_its_traceback_in_train_log(cached_cfg, monkeypatch):
    """A bug (not a user's error) ends the run: the console prints its traceback only with -v, so the run's
    own log keeps it, below the one line that says the run failed."""
    def broken(*args, **kwargs):
        raise ValueError("simulated crash inside evaluation")

    monkeypatch.setattr(trainer, "evaluate_model", broken)
    cfg = cached_cfg.replace(run_name="crash", epochs=1)
    with pytest.raises(ValueError):
        train(cfg)
    log = (Path(cfg.out_dir) / "crash" / "train.log").read_text()
    failed = log.index("run failed: ValueError: simulated crash inside evaluation")
    assert log.index("Traceback (most recent call last):", failed) > failed
    assert "in broken" in log[failed:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM (the process's own peak) is Linux's")
def test_the_training_peak_leaves_evaluation_out_as_the_time_per_epoch_does(cached_cfg, monkeypatch):
    """The paper's memory is training's: a full-ranking evaluation's score chunks (here 0.4 GB of small blocks
    held while the valid split is scored, one in 50 kept after it, so that the C heap cannot shrink by itself)
    show in the run's peak and the evaluation's, not in the training steps', which start from what is in use;
    the table's peak_gib is training's."""
    from iisan.experiments.report_rows import collect

    evaluate, kept = trainer.evaluate_model, []

    def hungry(*args, **kwargs):
        blocks = [bytearray(4000) for _ in range(100_000)]
        try:
            return evaluate(*args, **kwargs)
        finally:
            kept.extend(blocks[::50])
            del blocks

    monkeypatch.setattr(trainer, "evaluate_model", hungry)
    results = train(cached_cfg.replace(run_name="phase-peaks", epochs=2))
    run, phases = results["peak_memory"], results["peak_memory_by_phase"]
    assert set(phases) == {"training", "evaluation"}
    training, evaluation = phases["training"], phases["evaluation"]
    assert (training["rss_peak_since"], evaluation["rss_peak_since"], run["rss_peak_since"]) == (
        "each training phase's start", "each evaluation phase's start", "the run's start")
    assert evaluation["peak_rss_gib"] - training["peak_rss_gib"] > 0.3, phases
    assert run["peak_rss_gib"] >= evaluation["peak_rss_gib"]
    frame = collect([str(Path(results["run_dir"]).parent)])[0]
    assert frame.set_index("run").loc["phase-peaks", "peak_gib"] == training["peak_rss_gib"]
    assert len(kept) == 4 * 2000  # valid and test scored at each of two epochs
