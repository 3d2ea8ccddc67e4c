"""Runs that survive: checkpoints, exact resume (after SIGKILL and after Ctrl-C), refused checkpoints,
a full disk and a non-finite loss; and what they leave to read (train.log, metrics.jsonl, results.json's
status) when killed, interrupted or failed."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import iisan.model.recommender as recommender_module
import iisan.train.checkpoint as checkpoint
import iisan.train.checkpoint_writing as checkpoint_writing
import iisan.train.runfolder as runfolder
from iisan.cli.main import main
from iisan.config import Config
from iisan.errors import CacheError, ConfigError, RunInterrupted, TrainingError
from iisan.model.caching import build_cache_from_config
from iisan.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# A learning rate at which validation moves from epoch to epoch, so "the same metrics" means something.
FAST = {k: 3e-3 for k in ("lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")}


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> Config:
    root = tmp_path_factory.mktemp("resume")
    values = {k: tiny[k] for k in ("users", "items", "images", "text_model", "image_model")}
    cfg = Config(**values, cache_dir=str(root / "cache"), out_dir=str(root / "runs"), device="cpu",
                 num_workers=0, progress=False, batch_size=16, epochs=4, patience=20, encode_batch_size=32,
                 eval_batch_size=64, **FAST)
    build_cache_from_config(cfg, dtype="float32")
    return cfg


@pytest.fixture(scope="module")
def reference(base) -> dict:
    """An uninterrupted 4-epoch run (10 steps per epoch)."""
    return train(base.replace(run_name="reference"))


def same_run(a: dict, b: dict) -> None:
    assert a["best_epoch"] == b["best_epoch"]
    assert a["valid"] == b["valid"] and a["test"] == b["test"]
    for x, y in zip(a["epochs"], b["epochs"], strict=True):
        keys = ("epoch", "loss", "valid", "test")
        assert [x.get(k) for k in keys] == [y.get(k) for k in keys]


def flags(cfg: Config) -> list[str]:
    """Command-line flags that rebuild ``cfg``."""
    out = []
    for key, value in cfg.to_dict().items():
        if value is None or value == getattr(Config, key, None):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def test_checkpoints_are_complete_and_only_the_last_two_are_kept(base, reference):
    root = Path(reference["run_dir"]) / "checkpoints"
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0003", "epoch-0002"]
    for path in checkpoint.checkpoints(root):
        assert checkpoint.verify(path) is None
        state = json.loads((path / "state.json").read_text())
        assert state["config"] == base.replace(run_name="reference").to_dict()
        assert state["rng"]["python"] and state["rng"]["numpy"]
    tensors = checkpoint.read(root / "epoch-0003").train_state
    assert "rng.torch.0" in tensors and any(k.startswith("optim.recsys.0.exp_avg") for k in tensors)
    assert not list(root.glob(".*"))  # no temporary folders left


def test_sigkill_after_the_second_epoch_then_resume_gives_identical_metrics(base, tmp_path):
    """Three processes: uninterrupted, killed (SIGKILL) once epoch 1 is checkpointed, and resumed."""
    cfg = base.replace(out_dir=str(tmp_path), epochs=5)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

    def command(name):
        return [sys.executable, "-m", "iisan", "train", *flags(cfg.replace(run_name=name))]

    quiet = {"env": env, "stdout": subprocess.DEVNULL}
    full = subprocess.Popen(command("full"), stderr=subprocess.PIPE, text=True, **quiet)
    victim = subprocess.Popen(command("killed"), stderr=subprocess.DEVNULL, **quiet)
    killed = tmp_path / "killed"
    marker = tmp_path / "killed" / "checkpoints" / "epoch-0001" / checkpoint.MANIFEST
    deadline = time.monotonic() + 240
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = [p.name for p in checkpoint.checkpoints(tmp_path / "killed" / "checkpoints")]
    assert killed_at and killed_at[0] < "epoch-0004"
    # What the killed run left to read: every epoch it reported is in metrics.jsonl (flushed before the
    # epoch's log line), results.json still says running.
    history = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    reported = [int(line.split(" epoch ")[1].split("|")[0]) for line in (killed / "train.log").read_text().splitlines()
                if " iisan.train.trainer: epoch " in line]
    assert [e["epoch"] for e in history] == list(range(len(history))) and len(history) >= 2
    assert set(reported) <= {e["epoch"] for e in history} and len(reported) >= 2
    assert json.loads((killed / "results.json").read_text())["status"] == "running"

    resumed = subprocess.run(command("killed"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {tmp_path / 'killed' / 'checkpoints' / killed_at[0]}" in resumed.stderr
    # the kill said nothing in train.log: the next attempt says it, before it resumes
    unended = " WARNING iisan.train.records: the attempt before this one stopped without a word (killed, or its " \
              "machine went down): whatever it trained after its last checkpoint is trained again"
    lines = (killed / "train.log").read_text().splitlines()
    said = [i for i, line in enumerate(lines) if line.endswith(unended)]
    second = [i for i, line in enumerate(lines) if line.startswith("=== killed: started ")][1]
    resuming = next(i for i, line in enumerate(lines) if " resuming from " in line)
    assert len(said) == 1 and lines[said[0] - 1] == "}" and second < said[0] < resuming  # first after the header
    _, err = full.communicate()
    assert full.returncode == 0, err[-2000:]
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert b["resumed_from"] == [killed_at[0]] and a["resumed_from"] == []
    same_run(a, b)
    assert a["status"] == b["status"] == "finished"
    for run in (a, b):  # metrics.jsonl: the whole history, the resumed run's rewritten from its checkpoint
        lines = (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == run["epochs"]
    # train.log: the config and environment, then exactly the console's log lines
    log_text = (tmp_path / "full" / "train.log").read_text()
    header, body = log_text.split("\n}\n", 1)
    assert header.startswith("=== full: started ") and "command: python -m iisan train --users" in header
    assert json.loads(header[header.index("config: ") + 8:] + "}") == a["config"]
    console = [line for line in err.splitlines() if " iisan." in line]
    assert body.splitlines() == console and any(" epoch   4 | " in line for line in console)
    assert (tmp_path / "killed" / "train.log").read_text().count("=== killed: started ") == 2


def interrupt_at(monkeypatch, call: int, sig: signal.Signals = signal.SIGINT) -> None:
    """Send ourselves ``sig`` (SIGINT: as Ctrl-C does) during the ``call``-th training loss."""
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def counting(*args):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(sig)
        return loss(*args)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", counting)


def poison_at(monkeypatch, call: int) -> list:
    """The ``call``-th training loss made NaN (it flows back into the weights); returns the calls made, counted."""
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def poisoned(*args):
        calls.append(1)
        return loss(*args) * (float("nan") if len(calls) == call else 1.0)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", poisoned)
    return calls


def test_ctrl_c_saves_mid_epoch_exits_130_and_resumes_exactly(base, reference, monkeypatch, capsys):
    cfg = base.replace(run_name="ctrl-c")
    handler = signal.getsignal(signal.SIGINT)
    interrupt_at(monkeypatch, 14)  # epoch 1, step 4 of 10
    with pytest.raises(SystemExit) as info:
        main(["train", *flags(cfg)])
    assert info.value.code == 130
    saved = Path(cfg.out_dir) / "ctrl-c" / "checkpoints" / "epoch-0001-step-00004"
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message == (f"iisan: SIGINT during epoch 1 after step 4 of 10; checkpoint saved in {saved}. "
                       "To resume, run the same command again; it goes on in ctrl-c")  # named by this command
    assert checkpoint.verify(saved) is None and signal.getsignal(signal.SIGINT) is handler
    results = json.loads((saved.parents[1] / "results.json").read_text())
    assert results["status"] == "interrupted" and results["error"] == message.removeprefix("iisan: ")
    monkeypatch.undo()
    resumed = train(cfg)
    same_run(reference, resumed)
    # epoch 0 began the first attempt, epoch 1 the second (resumed inside it): both left out of the mean
    assert [e["warm_up"] for e in resumed["epochs"]] == [True, True, False, False]
    assert resumed["timing"]["train_seconds_per_epoch"] == pytest.approx(
        np.mean([e["train_seconds"] for e in resumed["epochs"][2:]]))


@pytest.mark.parametrize("where", ["valid ranking", "test ranking", "live item table"])
def test_a_signal_during_an_evaluation_stops_it_saves_the_steps_and_a_resume_evaluates_them(base, reference, where,
                                                                                          monkeypatch, capfd, caplog):
    """A signal waited for the whole evaluation (valid, test, checkpoint): 25 s at 87k items, 71 s of a live
    feed's item encoding, past a scheduler's grace before SIGKILL. It now stops the evaluation where it is (the
    live feed: amid its item table, pictures read ahead in a thread), saves the epoch's steps, and the resumed
    run goes on from that checkpoint and evaluates them: the same numbers as a run never stopped."""
    import iisan.evaluate as evaluate
    import iisan.train.trainer as trainer_module

    live = where == "live item table"
    cfg = base.replace(run_name=f"eval-stop-{where.split()[0]}", feed="live" if live else "cached",
                       epochs=3 if live else 4)
    improved = [e["epoch"] for e in reference["epochs"] if "test" in e]  # the epochs whose test split is ranked
    stopped = improved[1] if where == "test ranking" else 1
    calls, ranked_tests, resumed = [], [], None
    rank, chunks, evaluate_model = evaluate.rank_targets, evaluate.item_chunks, trainer_module.evaluate_model

    def ranking(*args, **kwargs):  # the 8th ranked chunk: epoch 1's valid (epoch 0 ranked 3 valid, 3 test)
        calls.append(1)
        if len(calls) == 8:
            signal.raise_signal(signal.SIGINT)
        return rank(*args, **kwargs)

    def encoding(*args, **kwargs):  # epoch 1's item table, after its first chunk
        calls.append(1)
        for n, chunk in enumerate(chunks(*args, **kwargs)):
            if len(calls) == 2 and n == 1:
                signal.raise_signal(signal.SIGINT)
            yield chunk

    def evaluating(model, data, split, *args, **kwargs):  # the second test ranking, or count them
        ranked_tests.extend([split] if split == "test" else [])
        if where == "test ranking" and split == "test" and len(ranked_tests) == 2 and resumed is None:
            signal.raise_signal(signal.SIGINT)
        return evaluate_model(model, data, split, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_model", evaluating)
    if where != "test ranking":
        monkeypatch.setattr(evaluate, *(("item_chunks", encoding) if live else ("rank_targets", ranking)))
    with pytest.raises(SystemExit) as info:
        main(["train", *flags(cfg)])
    saved = Path(cfg.out_dir) / cfg.run_name / "checkpoints" / f"epoch-{stopped:04d}-step-00010"
    err = capfd.readouterr().err
    assert "SIGINT received: stopping the evaluation, then saving a checkpoint (Ctrl-C again stops at once" in err
    assert info.value.code == 130 and err.strip().splitlines()[-1] == (
        f"iisan: SIGINT during the evaluation of epoch {stopped}, after its 10 steps; checkpoint saved in {saved}. To "
        f"resume, run the same command again; it goes on in {cfg.run_name}")
    assert checkpoint.verify(saved) is None and not any(t.name == "iisan-prefetch" for t in threading.enumerate())
    state = json.loads((saved / "state.json").read_text())  # the epoch's steps, not yet counted as an epoch
    assert (state["global_step"], state["next_epoch"], len(state["epochs"])) == (10 * stopped, stopped, stopped)
    monkeypatch.undo()
    monkeypatch.setattr(trainer_module, "evaluate_model", evaluating)
    ranked_tests.clear()
    resumed = {}  # (from here on no signal)
    with caplog.at_level("INFO", logger="iisan.train"):
        resumed = train(cfg)
    assert f"resuming from {saved}: epoch {stopped}, step 10" in caplog.text and "refusing" not in caplog.text
    assert resumed["resumed_from"] == [saved.name]
    assert len(ranked_tests) == sum("test" in e for e in resumed["epochs"][stopped:])  # an improved epoch's alone
    same_run(reference if not live else train(cfg.replace(run_name="live-reference")), resumed)
    # the resumed attempt ran no step in its first epoch: the next one paid its warm-up (left out of the mean)
    assert [e["warm_up"] for e in resumed["epochs"]] == [e["epoch"] in (0, stopped + 1) for e in resumed["epochs"]]
    assert state["train_seconds_in_epoch"] > 0 and resumed["epochs"][stopped]["train_seconds"] == pytest.approx(
        state["train_seconds_in_epoch"], abs=0.5)


def test_ctrl_c_of_a_run_named_by_its_config_says_which_flag_names_its_folder(base, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        main(["train", *flags(base.replace(out_dir=str(Path(base.out_dir) / "unnamed")))])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    name = next((Path(base.out_dir) / "unnamed").iterdir()).name
    assert message.endswith(f"it goes on in {name} (--run-name {name} names that folder from another command)")


def test_a_mid_epoch_checkpoint_of_another_process_count_restarts_its_epoch(base, monkeypatch, caplog):
    """Saved after 4 of 10 steps by (as its state says) 2 processes, resumed by 1: the steps done were of
    another sharding, so epoch 1 is trained again from its first step, not from step 4."""
    cfg = base.replace(run_name="other-world", epochs=3)
    interrupt_at(monkeypatch, 14)  # epoch 1, step 4 of 10
    with pytest.raises(RunInterrupted):
        train(cfg)
    monkeypatch.undo()
    saved = Path(cfg.out_dir) / "other-world" / "checkpoints" / "epoch-0001-step-00004"
    restate(saved, lambda s: s.update(world_size=2, world_sizes=[2]))
    losses = []
    loss = recommender_module.in_batch_softmax_loss
    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", lambda *a: losses.append(1) or loss(*a))
    with caplog.at_level("WARNING", logger="iisan.train.progress"):
        results = train(cfg)
    assert len(losses) == 20  # epochs 1 and 2, ten steps each (resuming at step 4 would make 16)
    assert f"{saved} stopped after step 4 of epoch 1 with 2 process(es): epoch 1 starts again" in caplog.text
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2]
    assert results["world_sizes"] == [2, 1] and results["world_size"] == 1  # every count, not only the last
    from iisan.experiments.report_rows import collect

    assert collect([str(saved.parents[1])], include_running=True)[0]["processes"].tolist() == ["2+1"]


def test_a_run_resumed_on_another_device_or_thread_count_says_so_and_lists_each(base, caplog):
    """OMP_NUM_THREADS=1 for the first epochs, 2 for the rest: the numbers differ in the last bits from either
    uninterrupted run, and only train.log's two headers told; results.json named the last device alone."""
    from iisan.devices import device_name

    cfg = base.replace(run_name="threads", epochs=1)
    train(cfg)
    saved = Path(cfg.out_dir) / "threads" / "checkpoints" / "epoch-0000"
    other = "CPU (x86_64, 2 cores, 7 torch threads)"
    restate(saved, lambda s: (s.pop("devices"), s.update(device=other)))  # (as saved before devices were listed)
    with caplog.at_level("WARNING", logger="iisan.train.records"):
        longer = train(cfg.replace(epochs=2))
    here = device_name("cpu")
    assert longer["devices"] == [other, here]
    assert f"was trained so far on {other} and goes on on {here}: its numbers will not match" in caplog.text
    state = json.loads((saved.parent / "epoch-0001" / checkpoint.STATE).read_text())
    assert state["devices"] == [other, here]  # for the next attempt
    caplog.clear()  # this machine as a version before aec5b7f named it (no CPU model): not another device
    old = device_name("cpu", model=False)  # (its device and its list: the list ends with the device)
    from iisan.devices import cpu_model

    assert (old != here) == bool(cpu_model())  # (a CPU whose model Linux names)
    restate(saved.parent / "epoch-0001", lambda s: s.update(devices=[old], device=old))
    with caplog.at_level("WARNING", logger="iisan.train.records"):
        train(cfg.replace(epochs=3))
    assert "was trained so far on" not in caplog.text


def test_a_resumed_run_reports_the_memory_peak_of_every_attempt(base):
    """A checkpoint carries the peak memory so far: a run that peaked before it was interrupted reports that
    peak, not only its last attempt's; what is not a peak (the current resident set) is the last one's."""
    cfg = base.replace(run_name="peaks", epochs=1)
    first = train(cfg)
    saved = Path(cfg.out_dir) / "peaks" / "checkpoints" / "epoch-0000"
    state = json.loads((saved / checkpoint.STATE).read_text())
    assert state["peak_memory"]["peak_rss_gib"] == pytest.approx(first["peak_memory"]["peak_rss_gib"], rel=0.1)
    # as if an earlier attempt had peaked
    assert state["peak_memory_by_phase"] == first["peak_memory_by_phase"]  # (written at the epoch's end)
    restate(saved, lambda s: (s["peak_memory"].update(peak_rss_gib=99.0, current_rss_gib=98.0),
                              s["peak_memory_by_phase"]["training"].update(peak_rss_gib=97.0)))
    longer = train(cfg.replace(epochs=2))
    assert longer["resumed_from"] == ["epoch-0000"] and longer["peak_memory"]["peak_rss_gib"] == 99.0
    assert longer["peak_memory"]["current_rss_gib"] < 98.0
    phases = longer["peak_memory_by_phase"]
    assert phases["training"]["peak_rss_gib"] == 97.0 and phases["evaluation"]["peak_rss_gib"] < 97.0


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_a_stop_signal_whose_stderr_is_gone_keeps_its_step_and_its_exit_status(name, monkeypatch):
    """A closed terminal's SIGHUP, or a `| tee` the same SIGTERM ended first: the handler's line failed with an
    OSError raised inside the step it interrupted (the run failed instead of saving), and the command's last
    line with one that made its status 1, which a scheduler reads as a failure, not a stop."""
    import subprocess
    import sys

    from iisan.train import interrupt
    from iisan.train.interrupt import StopRequests

    def gone(fd, data):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(interrupt.os, "write", gone)
    with StopRequests() as stop:
        signal.raise_signal(getattr(signal, name))  # (raised from the handler, an error would surface here)
    assert stop.signal == name
    code = ("import os\nr, w = os.pipe()\nos.close(r)\nos.dup2(w, 2)\nfrom iisan.console import exit_interrupted\n"
            f"exit_interrupted('iisan', '{name} during epoch 0', '{name}')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 128 + getattr(signal, name)


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGUSR1", 128 + signal.SIGUSR1), ("SIGHUP", 129)])
@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_a_stop_signal_saves_mid_epoch_like_ctrl_c_and_exits_with_its_status(name, status, base, monkeypatch, capfd):
    """A preempted job gets SIGTERM, a SLURM job SIGUSR1 before its time runs out (--signal=USR1@120), a run in a
    closed terminal SIGHUP: the same clean stop, named after its signal, and the status a shell gives a job that
    signal killed (128 + its number; 143 for SIGTERM, which a scheduler reads as terminated), not Ctrl-C's 130.
    SIGUSR1 and SIGHUP killed the run at once, its epoch in progress lost and its results.json left 'running'."""
    sig = getattr(signal, name)
    cfg = base.replace(run_name=name.lower(), epochs=2)
    handler = signal.getsignal(sig)
    interrupt_at(monkeypatch, 3, sig)  # epoch 0, step 3 of 10
    saved = Path(cfg.out_dir) / name.lower() / "checkpoints" / "epoch-0000-step-00003"
    with pytest.raises(RunInterrupted, match=f"{name} during epoch 0 after step 3 of 10; checkpoint saved in {saved}"):
        train(cfg)
    assert checkpoint.verify(saved) is None and signal.getsignal(sig) is handler
    saved_at = json.loads((saved / checkpoint.STATE).read_text())["saved_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}", saved_at)  # its zone too, as ended_at
    interrupt_at(monkeypatch, 1, sig)  # the resumed run's first step
    with pytest.raises(SystemExit) as info:
        main(["train", *flags(cfg)])
    assert info.value.code == status
    err = capfd.readouterr().err.strip().splitlines()  # (the handler writes to the descriptor: capfd sees it)
    assert err[-1].startswith(f"iisan: {name} during epoch 0 after step 4 of")
    assert f"{name} received: finishing the current step, then saving a checkpoint" in err  # no Ctrl-C hint


def test_a_rank_other_than_the_first_puts_the_log_level_back_when_its_run_ends(base, monkeypatch):
    """Ranks other than rank 0 log only warnings while they train; a library caller's ``iisan`` logger is its
    own again afterwards (it stayed at WARNING for every later call in that process)."""
    import logging

    import iisan.train.trainer as trainer
    from iisan.distributed import Dist
    from iisan.train.interrupt import StopRequests

    logger = logging.getLogger("iisan")
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    seen = []

    def missing_inputs(cfg, trained):
        seen.append(logger.level)
        raise ConfigError("stop here")

    monkeypatch.setattr(trainer, "check_run_inputs", missing_inputs)
    with pytest.raises(ConfigError, match="stop here"):
        trainer.Run(base.replace(run_name="rank1"), Dist(rank=1, world_size=2), torch.device("cpu"), StopRequests())
    assert seen == [logging.WARNING] and logger.level == logging.DEBUG


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_signal_while_an_interrupted_command_exits_changes_neither_its_line_nor_its_status(second):
    """A second Ctrl-C while Python and torch cleaned up after the first printed a KeyboardInterrupt traceback from
    torch's exit hook, or killed the process with SIGINT's status (-2) instead of exiting 130."""
    code = ("import atexit, os, signal, time; from iisan.console import exit_interrupted; "
            f"atexit.register(lambda: (os.kill(os.getpid(), signal.{second}), time.sleep(0.2), print('cleaned up'))); "
            "exit_interrupted('iisan', 'SIGINT after epoch 0; checkpoint saved in x. To resume, run it again')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (
        130, "cleaned up\n", "iisan: SIGINT after epoch 0; checkpoint saved in x. To resume, run it again\n")


def test_a_second_ctrl_c_stops_at_once_only_in_a_single_process():
    from iisan.train.interrupt import StopRequests

    single = StopRequests(escalate=True)
    single._handle(signal.SIGINT, None)
    assert single.signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt, match=r"^a second SIGINT after SIGINT: stopped at once, without saving "
                       r"a checkpoint \(the same command resumes from the newest one\)$"):  # train.log's reason
        single._handle(signal.SIGINT, None)
    torchrun = StopRequests(escalate=False)  # the launcher forwards one Ctrl-C to every worker: seen twice
    torchrun._handle(signal.SIGTERM, None)
    torchrun._handle(signal.SIGINT, None)
    assert torchrun.signal == "SIGTERM"


def test_the_stop_line_starts_a_line_of_its_own_on_a_terminal_only(monkeypatch):
    """Below a bar and the ^C a terminal echoes, a newline first; in a batch log it was a blank line."""
    import os

    from iisan.train.interrupt import StopRequests

    written = []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(data.decode()))
    for tty in (False, True):
        monkeypatch.setattr(os, "isatty", lambda fd, tty=tty: tty)
        StopRequests(escalate=False)._handle(signal.SIGTERM, None)
    line = "SIGTERM received: finishing the current step, then saving a checkpoint\n"
    assert written == [line, "\n" + line]


@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_a_handler_python_cannot_put_back_gives_way_to_the_default(monkeypatch):
    """signal.signal returns None for a handler installed outside Python; leaving the stop handler in its
    place would make later signals set a flag nothing reads."""
    from iisan.train import interrupt

    saved = {sig: signal.getsignal(sig) for sig in interrupt.StopRequests.SIGNALS}
    real = signal.signal
    monkeypatch.setattr(interrupt.signal, "signal", lambda sig, handler: real(sig, handler) and None)
    try:
        with interrupt.StopRequests():
            assert signal.getsignal(signal.SIGTERM) != saved[signal.SIGTERM]
        assert all(signal.getsignal(sig) == signal.SIG_DFL for sig in saved)
    finally:
        for sig, handler in saved.items():
            real(sig, handler)


def test_a_signal_ignored_when_the_command_starts_stays_ignored():
    """A script's background job (``iisan train ... &``) starts with SIGINT ignored, so that Ctrl-C in the
    script's terminal leaves it running; ``trap '' TERM`` does so for SIGTERM. Neither the run's handler
    nor the commands' SIGTERM-as-Ctrl-C may take that back."""
    from iisan.console import sigterm_as_ctrl_c
    from iisan.train.interrupt import StopRequests

    saved = {sig: signal.getsignal(sig) for sig in StopRequests.SIGNALS}
    try:
        for sig in saved:
            signal.signal(sig, signal.SIG_IGN)
        with sigterm_as_ctrl_c(), StopRequests() as stop:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            assert not stop.requested
        with sigterm_as_ctrl_c():  # a command's own, outside training
            signal.raise_signal(signal.SIGTERM)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in saved)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_ctrl_c_in_the_last_step_of_an_epoch_saves_the_epoch(base, monkeypatch):
    cfg = base.replace(run_name="ctrl-c-end", epochs=3)
    interrupt_at(monkeypatch, 10)
    with pytest.raises(RunInterrupted, match="after epoch 0; checkpoint saved in .*epoch-0000"):
        train(cfg)
    assert [p.name for p in checkpoint.checkpoints(Path(cfg.out_dir) / "ctrl-c-end" / "checkpoints")] == \
        ["epoch-0000"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_a_signal_in_the_last_epoch_finishes_the_run_and_still_stops_the_caller(base, monkeypatch, sig):
    """The last epoch's last step: the run finishes (results, best weights, its checkpoint), and then stops
    with RunInterrupted, as a preempted sweep must (it went on to its next point and exited 0)."""
    cfg = base.replace(run_name=f"last-{sig.name}", epochs=1)
    interrupt_at(monkeypatch, 10, sig)  # epoch 0, step 10 of 10: the last
    with pytest.raises(RunInterrupted) as info:
        train(cfg)
    folder = Path(cfg.out_dir) / cfg.run_name
    assert str(info.value) == (f"{sig.name} during the last epoch, which ended the run: it is finished "
                               f"({folder / 'results.json'})")
    assert json.loads((folder / "results.json").read_text())["status"] == "finished"
    assert info.value.results["status"] == "finished"  # a sweep lists the point finished, with its metrics
    log = (folder / "train.log").read_text().splitlines()
    assert log[-1].endswith(f" WARNING iisan.train.trainer: {sig.name} during the last epoch: the run finished all "
                            "the same") and " best epoch 0 | " in log[-2]  # after the summary, in the run's log
    monkeypatch.undo()
    assert train(cfg)["status"] == "finished"  # found finished: nothing trains, nothing stops


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
@pytest.mark.usefixtures("stop_signals_as_in_a_terminal")
def test_a_signal_while_the_run_sets_up_stops_at_once_without_a_step(base, monkeypatch, capsys, sig, status):
    """Loading the data (or large encoders) is no step to finish: a Ctrl-C then stops at once, in the one line
    every other command says, with nothing trained and no checkpoint (it loaded on, trained a step and saved)."""
    import iisan.train.trainer as trainer

    real = trainer.load_data

    def loading(cfg):
        signal.raise_signal(sig)
        return real(cfg)

    monkeypatch.setattr(trainer, "load_data", loading)
    cfg = base.replace(run_name=f"setup-{sig.name}")
    with pytest.raises(SystemExit) as info:
        main(["train", *flags(cfg)])
    assert info.value.code == status
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("iisan: interrupted; nothing is left half-")
    folder = Path(cfg.out_dir) / cfg.run_name
    assert not (folder / "checkpoints").exists() or not checkpoint.checkpoints(folder / "checkpoints")
    results = json.loads((folder / "results.json").read_text())  # which signal, and when
    assert results["status"] == "interrupted"
    assert results["error"] == f"{sig.name} while the run set up, before its first step"


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(base, reference, caplog):
    """The reference run's folder, its newest checkpoint damaged: epoch 3 is redone from epoch 2's."""
    cfg = base.replace(run_name="corrupt")
    shutil.copytree(reference["run_dir"], Path(cfg.out_dir) / "corrupt")
    results = Path(cfg.out_dir) / "corrupt" / "results.json"  # as a run killed in epoch 3 leaves it
    results.write_text(json.dumps({**json.loads(results.read_text()), "status": "running"}))
    newest = Path(cfg.out_dir) / "corrupt" / "checkpoints" / "epoch-0003" / checkpoint.MODEL
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    caplog.set_level("WARNING")
    resumed = train(cfg)
    refusals = [r.getMessage() for r in caplog.records if "refusing checkpoint" in r.getMessage()]
    assert refusals == [f"refusing checkpoint: {newest} does not match its sha256 in the manifest (damaged)"]
    assert resumed["resumed_from"] == ["epoch-0002"]
    same_run(reference, resumed)
    assert checkpoint.verify(newest.parent) is None  # epoch 3 written again, intact


@pytest.mark.parametrize("damage,reason", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "is truncated or damaged"),
    (lambda p: (p.parent / checkpoint.MANIFEST).unlink(), "MANIFEST.json is missing"),
    (lambda p: (p.unlink(), p.mkdir()), f"{checkpoint.TRAIN_STATE} is not a file"),  # it said "is missing"
], ids=["truncated", "never-completed", "a-folder-in-its-place"])
def test_truncated_or_unfinished_checkpoints_are_refused(reference, damage, reason, tmp_path):
    root = Path(reference["run_dir"]) / "checkpoints"
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    damage(copy / "epoch-0003" / checkpoint.TRAIN_STATE)
    config = json.loads((root / "epoch-0003" / "state.json").read_text())["config"]
    found, refused = checkpoint.latest(copy, config)
    assert found.path == copy / "epoch-0002" and len(refused) == 1 and reason in refused[0]
    assert str(copy / "epoch-0003") in refused[0] and "\n" not in refused[0]


def test_checkpoints_refused_for_different_reasons_are_each_named():
    from iisan.train.checkpoint import cannot_resume

    assert cannot_resume(["/r/e3 is damaged", "/r/e2 belongs to another config", "/r/e1 belongs to another config",
                          "/r/e0 is damaged"]) == ("cannot resume: /r/e3 is damaged; 1 older checkpoint(s) refused "
                                                   "for the same reason; /r/e2 belongs to another config; 1 older "
                                                   "checkpoint(s) refused for the same reason")
    assert cannot_resume(["/r/e0 is damaged"]) == "cannot resume: /r/e0 is damaged"


def test_checkpoint_of_another_config_is_refused(base, caplog, monkeypatch):
    """... before the data and the encoders are loaded (minutes for large ones, to be refused after)."""
    import iisan.train.trainer as trainer

    cfg = base.replace(run_name="mismatch", epochs=2)
    train(cfg)
    state = Path(cfg.out_dir) / "mismatch" / "checkpoints" / "epoch-0001" / "state.json"
    loaded = []
    monkeypatch.setattr(trainer, "load_data", lambda cfg: loaded.append(cfg))
    with pytest.raises(TrainingError) as info, caplog.at_level("WARNING", logger="iisan"):
        train(cfg.replace(epochs=3, lr=1e-2))
    assert loaded == []
    assert str(info.value) == (f"cannot resume: {state} belongs to a different config "
                               "(lr=0.003 there, 0.01 now); give it the values it ran with to go on with it, or "
                               "use another --run-name to start a new run; 1 older checkpoint(s) refused for the "
                               "same reason")
    assert "refusing checkpoint" not in caplog.text  # said once, as the error, newest first
    with pytest.raises(ConfigError, match="--resume: no checkpoint in"):
        train(cfg.replace(run_name="fresh", resume=True))


def test_a_run_whose_checkpoints_were_removed_is_not_overwritten(base):
    """Checkpoints removed to save space leave nothing to check a new config against: the folder's
    results.json stands in. Another config, or more epochs of a finished run, is refused and leaves the
    run's files as they were; a same-config run that stopped before its first checkpoint starts again."""
    cfg = base.replace(run_name="pruned", epochs=1)
    train(cfg)
    run = Path(cfg.out_dir) / "pruned"
    shutil.rmtree(run / "checkpoints")
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name != "train.log"}
    with pytest.raises(ConfigError) as info:
        train(cfg.replace(lr=1e-2))
    assert str(info.value) == (f"{run / 'results.json'} belongs to a run of another config (lr=0.003 there, "
                               "0.01 now) and no checkpoint is left to resume; use another --run-name to start a "
                               "new run")
    with pytest.raises(ConfigError, match=r"results.json is a finished run with no checkpoint left to continue it; "
                                          r"starting again would overwrite it: use another --run-name$"):
        train(cfg.replace(epochs=2))
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name != "train.log"} == before
    (run / "results.json").rename(run / "kept.json")  # without results either, config.json still speaks
    with pytest.raises(ConfigError, match=r"config.json belongs to a run of another config \(lr=0.003 there, 0.01 "
                                          r"now\) and no checkpoint or results are left; use another --run-name"):
        train(cfg.replace(lr=1e-2))
    (run / "kept.json").rename(run / "results.json")
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name != "train.log"} == before
    assert train(cfg)["run_dir"] == str(run)  # the same config and epochs: finished before, not trained again


def test_a_run_that_failed_before_its_first_epoch_gives_its_name_to_the_corrected_config(base, tmp_path, caplog):
    """A refused value or a missing file ends a run before it trains: its folder holds only the record of
    that (results.json failed, no epoch, no weights), which the corrected command replaces; train.log keeps it."""
    cfg = base.replace(run_name="typo", epochs=1)
    with pytest.raises(CacheError, match="float32"):
        train(cfg.replace(cache_dtype="float16"))  # the cache was built in float32
    run = Path(cfg.out_dir) / "typo"
    failed = json.loads((run / "results.json").read_text())
    assert failed["status"] == "failed" and failed["epochs"] == [] and not (run / "best.safetensors").exists()
    results = train(cfg)
    assert results["status"] == "finished" and results["run_dir"] == str(run)
    assert "the run there ended before its first epoch (" in caplog.text
    log = (run / "train.log").read_text()
    assert "run failed: " in log and log.count("best epoch 0 |") == 1  # both attempts, in order
    results = json.loads((run / "results.json").read_text())
    results["status"] = "interrupted"  # stopped before its first checkpoint
    (run / "results.json").write_text(json.dumps(results))
    assert train(cfg.replace(epochs=2))["status"] == "finished"


def test_a_run_killed_before_its_first_epoch_is_said_killed_and_to_start_from_its_beginning(base, caplog):
    """SIGKILL during the first epoch: results.json still says running, with no epoch. The next attempt said the
    run 'ended before its first epoch (running)' and that what it trained after its last checkpoint (none) is
    trained again."""
    cfg = base.replace(run_name="killed-early", epochs=1)
    run = Path(train(cfg)["run_dir"])
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "status": "running", "epochs": []}))
    for kept in ("best.safetensors", "checkpoints"):
        shutil.rmtree(run / kept) if (run / kept).is_dir() else (run / kept).unlink()
    caplog.set_level(logging.INFO, logger="iisan")
    assert train(cfg)["status"] == "finished"
    assert f"{run}: the run there ended before its first epoch (killed); it starts again" in caplog.text
    assert "stopped without a word (killed, or its machine went down): it left no checkpoint, and the run " \
           "starts from its beginning" in caplog.text


def test_a_run_killed_inside_its_first_epoch_after_a_checkpoint_is_said_to_go_on_from_it(base, caplog, monkeypatch):
    """Killed after a checkpoint saved inside epoch 0 (no epoch finished): the next attempt resumes from it, and
    its first warning said the run 'starts from its beginning'."""
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return loss(*args)

    cfg = base.replace(run_name="killed-mid-epoch", epochs=1)
    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", interrupting)
    with pytest.raises(RunInterrupted):
        train(cfg)
    monkeypatch.undo()
    run = Path(cfg.out_dir) / "killed-mid-epoch"
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == [] and checkpoint.checkpoints(run / "checkpoints")
    (run / "results.json").write_text(json.dumps({**results, "status": "running"}))  # as a SIGKILL leaves it
    caplog.set_level(logging.INFO, logger="iisan")
    assert train(cfg)["resumed_from"] == ["epoch-0000-step-00003"]
    assert "stopped without a word (killed, or its machine went down): whatever it trained after its last " \
           "checkpoint is trained again" in caplog.text


def test_an_attempt_refused_after_a_kill_says_the_refusal_alone(base, caplog):
    """A run killed without a word, asked again under its --run-name with another config: this attempt's refusal
    is what it says; before, it first warned that 'whatever it trained after its last checkpoint is trained
    again', then refused to resume at all."""
    cfg = base.replace(run_name="killed-then-other", epochs=1)
    run = Path(train(cfg)["run_dir"])
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "status": "running"}))  # as a SIGKILL leaves it
    caplog.set_level(logging.INFO, logger="iisan")
    with pytest.raises(TrainingError, match="belongs to a different config"):
        train(cfg.replace(lr=cfg.lr * 2, epochs=2))
    assert "stopped without a word" not in caplog.text
    assert "stopped without a word" not in (run / "train.log").read_text()
    assert train(cfg.replace(epochs=2))["resumed_from"] == ["epoch-0000"]  # the same config: it goes on
    assert "stopped without a word (killed, or its machine went down): whatever it trained after" in caplog.text


def restate(path: Path, edit) -> None:
    """Edit a checkpoint's state.json and record the edit in its manifest (intact, but not what we wrote)."""
    from iisan.digests import sha256

    state = json.loads((path / checkpoint.STATE).read_text())
    edit(state)
    (path / checkpoint.STATE).write_text(json.dumps(state))
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    manifest["files"][checkpoint.STATE] = {"bytes": (path / checkpoint.STATE).stat().st_size,
                                           "sha256": sha256(path / checkpoint.STATE)}
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


def test_an_intact_checkpoint_of_unusable_content_is_one_line(base):
    """A state.json whose checksums hold but whose content this version cannot use (another version
    wrote it, or a hand edit): refused, or named, in one line, never a traceback."""
    cfg = base.replace(run_name="odd", epochs=1)
    train(cfg)
    path = Path(cfg.out_dir) / "odd" / "checkpoints" / "epoch-0000"
    restate(path, lambda state: state.update(rng={**state["rng"], "python": "z"}))
    with pytest.raises(TrainingError) as info:
        train(cfg.replace(epochs=2))
    assert str(info.value).startswith(f"cannot resume: {path} holds a state this version cannot restore (")
    assert str(info.value).endswith("); use another --run-name to start a new run") and "\n" not in str(info.value)
    restate(path, lambda state: state.update(config=5))
    with pytest.raises(TrainingError) as info:
        train(cfg.replace(epochs=2))
    assert str(info.value) == (f"cannot resume: {path / 'state.json'} holds no config (an object), so cannot be "
                               "checked against this run's")


def test_a_second_ctrl_c_inside_a_checkpoints_write_leaves_no_partial_checkpoint(base, monkeypatch):
    """The first Ctrl-C asks for a checkpoint; a second one while its files are written stops the process
    there: the half-written folder (as large as the model: FFT's is GBs) is not left hidden in the run."""
    cfg = base.replace(run_name="ctrl-c-twice", epochs=2)
    real_save, calls = checkpoint_writing.save_file, []

    def interrupted(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's model.safetensors, half written
            Path(path).write_bytes(b"\0" * 1000)
            raise KeyboardInterrupt
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_writing, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    root = Path(cfg.out_dir) / "ctrl-c-twice" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0000"]


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(base, reference, monkeypatch):
    cfg = base.replace(run_name="full-disk", epochs=2)
    real_save, calls = checkpoint_writing.save_file, []

    def disk_fills_up(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 4:  # the second checkpoint's train_state.safetensors: half written, then ENOSPC
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_writing, "save_file", disk_fills_up)
    root = Path(cfg.out_dir) / "full-disk" / "checkpoints"
    with pytest.raises(TrainingError) as info:
        train(cfg)
    assert str(info.value) == (f"could not write checkpoint {root / 'epoch-0001'}: No space left on device; "
                               f"the previous checkpoint {root / 'epoch-0000'} is intact")
    assert [p.name for p in root.iterdir()] == ["epoch-0000"]  # no half-written folder left
    assert checkpoint.verify(root / "epoch-0000") is None
    monkeypatch.undo()
    resumed = train(cfg)
    assert resumed["resumed_from"] == ["epoch-0000"]
    keys = ("epoch", "loss", "valid", "test")
    assert [[e.get(k) for k in keys] for e in resumed["epochs"]] == \
        [[e.get(k) for k in keys] for e in reference["epochs"][:2]]


def test_non_finite_loss_stops_with_the_step_range_and_keeps_the_checkpoint(base, monkeypatch):
    cfg = base.replace(run_name="nan")
    poison_at(monkeypatch, 15)
    root = Path(cfg.out_dir) / "nan" / "checkpoints"
    with pytest.raises(TrainingError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("non-finite loss at step 14 (epoch 1, steps 10..19); ")
    # the NaN flowed back into the weights; nothing the run was fed is at fault
    assert "trained weight tensor(s) now hold non-finite values" in message
    assert "the learning rate of" not in message and "states" not in message
    assert message.endswith(f"; last good checkpoint: {root / 'epoch-0000'}; best weights: "
                            f"{root.parent / 'best.safetensors'}")
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0000"]
    assert checkpoint.verify(root / "epoch-0000") is None
    results = json.loads((root.parent / "results.json").read_text())
    assert results["status"] == "failed" and results["error"].startswith("non-finite loss at step 14")
    assert [e["epoch"] for e in results["epochs"]] == [0]  # the history up to the failure
    assert "ERROR iisan.train.records: run failed: non-finite loss at step 14" in \
        (root.parent / "train.log").read_text()


def poison_validation(monkeypatch, epoch: int) -> None:
    """Epoch ``epoch``'s validation metrics made NaN, the weights left finite: scores that overflowed in
    evaluation (an lr of 1 did it on the demo)."""
    import iisan.train.trainer as trainer

    real, seen = trainer.evaluate_model, []

    def evaluated(model, data, split, *args, **kwargs):
        metrics = real(model, data, split, *args, **kwargs)
        seen.append(split)
        return {k: math.nan for k in metrics} if split == "valid" and seen.count("valid") == epoch + 1 else metrics

    monkeypatch.setattr(trainer, "evaluate_model", evaluated)


@pytest.mark.parametrize("mode", ["fail", "authors"])
def test_non_finite_validation_metrics_end_training_as_a_nan_loss_does(base, reference, monkeypatch, mode):
    """A NaN validation HR@10 compares as no improvement, so the run would finish as if nothing had happened,
    naming that epoch's checkpoint the last good one. It is a NaN loss's case: failed (``fail``), or finished
    at the best epoch before it (``authors``); the epoch neither saved nor reported."""
    cfg = base.replace(run_name=f"nan-valid-{mode}", nonfinite=mode)
    poison_validation(monkeypatch, 2)
    root = Path(cfg.out_dir) / cfg.run_name / "checkpoints"
    said = ("non-finite validation metrics after epoch 2 (hit@5 nan, ", "; the trained weights are finite: the "
            "model's scores overflowed (lower the learning rates); last good checkpoint: "
            f"{root / 'epoch-0001'}; best weights: {root.parent / 'best.safetensors'}")
    if mode == "fail":
        with pytest.raises(TrainingError) as info:
            train(cfg)
        assert str(info.value).startswith(said[0]) and str(info.value).endswith(said[1])
    else:
        finished = train(cfg)
        assert finished["ended"] == "non-finite validation metrics" and finished["stopped"].startswith(said[0])
    results = json.loads((root.parent / "results.json").read_text())
    assert results["status"] == ("failed" if mode == "fail" else "finished")
    assert [e["valid"] for e in results["epochs"]] == [e["valid"] for e in reference["epochs"][:2]]  # epoch 2: none
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0001", "epoch-0000"]


def poison_step(monkeypatch, step: int, how: str) -> None:
    """The loss of the run's step ``step`` (0-based, 10 steps an epoch) made NaN (``nan``: its gradients too)
    or infinite (``inf``: a constant added, so the gradients and weights stay finite)."""
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def poisoned(*args):
        calls.append(1)
        value = loss(*args)
        if len(calls) != step + 1:
            return value
        return value * float("nan") if how == "nan" else value + float("inf")

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", poisoned)


def test_nonfinite_authors_ends_at_a_nan_with_the_best_epoch_so_far(base, reference, monkeypatch):
    """As the authors' code: a NaN ends training, and the run's result is the best epoch before it."""
    cfg = base.replace(run_name="nan-authors", nonfinite="authors")
    poison_step(monkeypatch, 24, "nan")
    results = train(cfg)
    scores = [e["valid"]["hit@10"] for e in reference["epochs"][:2]]  # the same training up to the NaN
    best = scores.index(max(scores))  # the first of equal scores: a later one must be better to count
    assert results["status"] == "finished" and results["best_epoch"] == best
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]  # epoch 2, which held the NaN, is not reported
    assert results["test"] == reference["epochs"][best]["test"]
    assert results["stopped"].startswith("non-finite loss at step 24 (epoch 2, steps 20..29); ")
    assert results["stopped"].endswith(f"; --nonfinite authors: training ends here and the best epoch so far "
                                       f"({best}) is the result")
    on_disk = json.loads((Path(cfg.out_dir) / "nan-authors" / "results.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["stopped"] == results["stopped"]
    assert on_disk["ended"] == "non-finite loss"
    monkeypatch.undo()
    assert train(cfg) == on_disk  # finished: not trained again


def test_nonfinite_authors_goes_on_past_an_infinite_loss_and_fails_at_a_nan_before_any_epoch(base, reference,
                                                                                           monkeypatch, caplog):
    poison_step(monkeypatch, 14, "inf")
    overflowed = r"the learning rates, the batch's item states and the weights are finite: the loss itself overflowed"
    with pytest.raises(TrainingError, match=r"^non-finite loss at step 14 \(epoch 1, steps 10..19\); " + overflowed):
        train(base.replace(run_name="inf-fail", epochs=2))  # the default: any non-finite loss fails the run
    poison_step(monkeypatch, 14, "inf")
    results = train(base.replace(run_name="inf-authors", epochs=2, nonfinite="authors"))
    assert results["status"] == "finished" and "stopped" not in results and len(results["epochs"]) == 2
    assert results["epochs"][1]["loss"] == float("inf")
    assert [e["valid"] for e in results["epochs"]] == [e["valid"] for e in reference["epochs"][:2]]
    folder = Path(base.out_dir) / "inf-authors"  # written as null: JSON has no Infinity (JavaScript refused the
    for name in ("results.json", "metrics.jsonl"):  # file, jq read 1.8e308)
        text = (folder / name).read_text()
        assert "Infinity" not in text and '"loss": null' in text, name
    assert json.loads((folder / "results.json").read_text(), parse_constant=pytest.fail)["epochs"][1]["loss"] is None
    from iisan.experiments.results_file import check_results
    check_results(json.loads((folder / "results.json").read_text()))  # `iisan results` reads it
    assert "--nonfinite authors: an infinite loss does not stop the run" in caplog.text
    longer = train(base.replace(run_name="inf-authors", epochs=3, nonfinite="authors"))  # its checkpoint holds
    assert longer["resumed_from"] == ["epoch-0001"] and len(longer["epochs"]) == 3  # the null: refused before
    assert longer["epochs"][1]["loss"] is None
    poison_step(monkeypatch, 3, "nan")
    with pytest.raises(TrainingError, match=r"; --nonfinite authors: no epoch had finished before it, so there is "
                                            r"no result$"):
        train(base.replace(run_name="nan-first", nonfinite="authors"))


@pytest.mark.parametrize("mode, how, steps_run", [("fail", "nan", 14), ("authors", "nan", 14), ("fail", "inf", 14),
                                                   ("authors", "inf", 20)])
def test_a_loss_that_ends_training_ends_the_epoch_at_the_next_look(base, monkeypatch, mode, how, steps_run):
    """The losses are looked at every FINITE_POLL_STEPS steps of an epoch (4 here): a NaN at step 11
    (epoch 1, steps 10..19) ends the epoch after step 13, not 19; under --nonfinite authors an infinite
    loss goes on."""
    import iisan.train.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "FINITE_POLL_STEPS", 4)
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def poisoned(*args):
        calls.append(1)
        value = loss(*args)
        if len(calls) != 12:
            return value
        return value * float("nan") if how == "nan" else value + float("inf")

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", poisoned)
    cfg = base.replace(run_name=f"poll-{mode}-{how}", epochs=2, nonfinite=mode)
    if mode == "fail" or how == "nan":
        with pytest.raises(TrainingError, match=r"^non-finite loss at step 11 \(epoch 1, steps 10..19\); ") \
                if mode == "fail" else contextlib.nullcontext():
            results = train(cfg)
        if mode == "authors":
            assert [e["epoch"] for e in results["epochs"]] == [0]
            assert results["stopped"].startswith("non-finite loss at step 11 (epoch 1, steps 10..19); ")
    else:
        assert len(train(cfg)["epochs"]) == 2
    assert len(calls) == steps_run


def test_a_longer_resume_past_lost_best_weights_is_refused_and_loses_nothing(base, reference):
    """Best epoch 2 of 4 (the reference's): resumed for a fifth epoch from epoch-0003 without best.safetensors,
    nothing would write epoch 2's weights again (and pruning would drop epoch-0002, which holds them)."""
    assert reference["best_epoch"] == 2 and len(reference["epochs"]) == 4
    cfg = base.replace(run_name="lost-best")
    folder = Path(train(cfg)["run_dir"])
    best, root = folder / "best.safetensors", folder / "checkpoints"
    kept = best.read_bytes()
    for damage, problem in [(lambda: best.unlink(), f"{best} is missing"),
                            (lambda: best.write_bytes(b"\x08"), f"{best} is not a readable safetensors file")]:
        damage()
        with pytest.raises(TrainingError) as info:
            train(cfg.replace(epochs=5))
        assert str(info.value).startswith(problem)
        assert str(info.value).endswith(
            f", and {root / 'epoch-0003'}, which the run would resume from, is not its best epoch (2), so nothing "
            f"would write them again: move the checkpoints newer than {root / 'epoch-0002'} out of {root} to "
            f"resume from it, restore best.safetensors from a copy, or use another --run-name to train again")
        assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0003", "epoch-0002"]
    best.write_bytes(kept)
    longer = train(cfg.replace(epochs=5))
    assert longer["resumed_from"] == ["epoch-0003"] and len(longer["epochs"]) == 5


def test_resume_flag_without_a_run_name_continues_the_newest_run(base, tmp_path):
    cfg = base.replace(out_dir=str(tmp_path), epochs=1)
    first = train(cfg)
    again = train(cfg.replace(epochs=2, resume=True))
    assert again["run_dir"] == first["run_dir"] and again["resumed_from"] == ["epoch-0000"]
    assert [e["epoch"] for e in again["epochs"]] == [0, 1]


def test_optimizer_state_round_trips_exactly(base):
    from safetensors.torch import load, save

    from iisan.train.runstate import optimizer_from_files, optimizer_to_files

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        groups = [{"name": "a", "params": list(model[0].parameters()), "lr": 0.1},
                  {"name": "b", "params": list(model[1].parameters()), "lr": 0.01}]
        return model, torch.optim.Adam(groups)

    def step(model, optimizer):
        model(torch.ones(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    a, opt_a = model_and_optimizer()
    step(a, opt_a)
    state, tensors = optimizer_to_files(opt_a)
    b, opt_b = model_and_optimizer()
    b.load_state_dict(a.state_dict())
    optimizer_from_files(opt_b, json.loads(json.dumps(state)), load(save(tensors)))
    assert opt_b.param_groups[0]["betas"] == (0.9, 0.999)
    step(a, opt_a)
    step(b, opt_b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_run_folder_in_use_is_refused(base, tmp_path, monkeypatch):
    cfg = base.replace(out_dir=str(tmp_path), run_name="busy", epochs=1)
    held = runfolder.lock_run_folder(tmp_path / "busy")
    busy = rf"run folder {tmp_path / 'busy'} is in use by pid {os.getpid()} on "
    with pytest.raises(TrainingError, match=busy):
        train(cfg)
    held.close()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as a caller may have set it
    loss, seen = recommender_module.in_batch_softmax_loss, []

    def watched(*args):  # the global switches as each training step finds them
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return loss(*args)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", watched)
    assert len(train(cfg.replace(deterministic=True))["epochs"]) == 1  # the lock goes with its holder
    assert seen and set(seen) == {(True, False, ":4096:8")}  # --deterministic: on for every step
    # --deterministic is undone after the run: every global switch it turned
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cudnn.benchmark


def test_a_field_added_after_the_checkpoint_counts_as_its_default(base):
    """A checkpoint written before a config field existed resumes when the field is at its default now
    (that older version behaved as the default does) and is refused when it is not."""
    current = base.to_dict()
    older = {k: v for k, v in current.items() if k not in ("smoke", "text_layers", "dedup_items")}
    assert checkpoint.config_differences(older, current) == []
    changed = base.replace(dedup_items="off").to_dict()
    assert checkpoint.config_differences(older, changed) == ["dedup_items='auto' there, 'off' now"]
    assert checkpoint.config_differences(current, changed) == ["dedup_items='auto' there, 'off' now"]
    listed = base.replace(text_layers=(0, 1)).to_dict()  # layers left to the rule are named as such, not None
    assert checkpoint.config_differences(listed, current) == ["text_layers=[0, 1] there, auto (by --layer-rule) now"]
    # a field whose default is not what runs did before it (BEFORE_THE_FIELD): not compared, so a run saved
    # before --layer-rule resumes, and a finished one is found finished, under either rule
    without_rule = {k: v for k, v in current.items() if k != "layer_rule"}
    assert checkpoint.config_differences(without_rule, current) == []
    assert checkpoint.config_differences(without_rule, base.replace(layer_rule="groups").to_dict()) == []
    assert checkpoint.config_differences(current, base.replace(layer_rule="groups").to_dict()) == [
        "layer_rule='stride' there, 'groups' now"]


def test_a_config_saved_before_the_layer_rule_counts_as_groups_where_the_rules_differ(base, tmp_path):
    """A config saved before --layer-rule read the layers group dropping picks: the same run as one under
    the stride rule only where both rules pick the same layers of its towers (tiny ViT, 3 layers: 6 groups
    -> 1, 2, 3 either way; 2 groups -> 2, 3 by groups, 1, 3 by stride), and never where the towers' depth
    cannot be read (no encoder folder, no cache)."""
    from iisan.model.build import picked_layers

    two = base.replace(layer_groups=2)
    assert picked_layers(two) == {"text": (0, 1, 2), "image": (0, 1, 3)}
    assert picked_layers(two.replace(layer_rule="groups")) == {"text": (0, 1, 2), "image": (0, 2, 3)}
    assert picked_layers(two.replace(method="fft")) == {}  # a baseline reads no layers
    older = {k: v for k, v in two.to_dict().items() if k != "layer_rule"}
    assert checkpoint.config_differences(older, two.to_dict()) == ["layer_rule='groups' there, 'stride' now"]
    assert checkpoint.config_differences(older, two.replace(layer_rule="groups").to_dict()) == []
    baseline = checkpoint.config_differences(older, two.replace(method="fft", feed="live").to_dict())
    assert baseline == ["feed='cached' there, 'live' now", "method='iisan' there, 'fft' now"]
    # where the rules agree, an unreadable depth refuses: no folder to read it from, no cache (live)
    gone = base.replace(image_model=str(tmp_path / "vit-not-here"), feed="live")
    assert picked_layers(gone) is None
    old_gone = {k: v for k, v in gone.to_dict().items() if k != "layer_rule"}
    assert checkpoint.config_differences(old_gone, gone.to_dict()) == ["layer_rule='groups' there, 'stride' now"]
    # the cache records the depth when the folder is gone: the rules agree there, so the run is the same
    assert picked_layers(gone.replace(feed="cached")) == picked_layers(base)
    cached_gone = gone.replace(feed="cached").to_dict()
    assert checkpoint.config_differences({k: v for k, v in cached_gone.items() if k != "layer_rule"}, cached_gone) == []


def test_best_weights_of_a_run_saved_before_the_layer_rule_fit_its_config_where_the_rules_agree(base, tmp_path):
    """A run resumed under --layer-rule stride rewrites config.json; its best weights may still be of an epoch
    the older version saved (no layer_rule in their metadata). The rules are judged on the run's own towers
    (not the default encoders): agreeing, the weights fit; not (2 groups of the tiny ViT), they are refused."""
    import json

    from iisan.errors import ConfigError
    from iisan.experiments.trained import check_weights_config

    for groups, fits in ((6, True), (2, False)):
        config = base.replace(layer_groups=groups).to_dict()
        metadata = {"config": json.dumps({k: v for k, v in config.items() if k != "layer_rule"})}
        if fits:
            check_weights_config(tmp_path / "best.safetensors", metadata, config, tmp_path / "config.json")
            continue
        with pytest.raises(ConfigError, match=r"layer_rule='groups' there, 'stride' now"):
            check_weights_config(tmp_path / "best.safetensors", metadata, config, tmp_path / "config.json")


def test_a_run_saved_before_the_layer_rule_is_not_resumed_or_taken_as_finished_by_other_layers(base):
    """A 2-group run that a version before --layer-rule trained is the stride rule's default-named run
    folder too; resuming it, or taking its results as finished, under the stride rule would read other ViT
    layers than its weights were trained on. Refused, naming the rule; under --layer-rule groups it resumes."""
    from iisan.train.run_results import read_results
    from iisan.train.runfolder import finished_results

    cfg = base.replace(run_name="before-rule", layer_groups=2, layer_rule="groups", epochs=1)
    train(cfg)
    folder = Path(cfg.out_dir) / "before-rule"
    restate(folder / "checkpoints" / "epoch-0000", lambda state: state["config"].pop("layer_rule"))
    results = read_results(folder / "results.json")
    results["config"].pop("layer_rule")
    assert finished_results(cfg, results) is results
    assert finished_results(cfg.replace(layer_rule="stride"), results) is None
    with pytest.raises(TrainingError, match=r"layer_rule='groups' there, 'stride' now"):
        train(cfg.replace(layer_rule="stride", epochs=2))
    assert [e["epoch"] for e in train(cfg.replace(epochs=2))["epochs"]] == [0, 1]


def test_a_non_finite_loss_names_the_batch_items_whose_states_are_not_finite(base, monkeypatch):
    """The cache refuses non-finite rows when it is loaded; were one to reach training anyway (here: let
    through on purpose), the report names the items of the failing batch and where their states came from."""
    import re

    import iisan.model.build as build

    real = build.load_cache

    def poisoned(path, expected, item_ids):
        table, meta = real(path, expected, item_ids)
        if path.name == "text.safetensors":
            table[1::2] = float("nan")  # every other item
        return table, meta

    monkeypatch.setattr(build, "load_cache", poisoned)
    with pytest.raises(TrainingError) as info:
        train(base.replace(run_name="nan-states", epochs=1))
    message = str(info.value)
    assert message.startswith("non-finite loss at step 0 (epoch 0, steps 0..9); ")
    assert re.search(r"; \d+ item\(s\) of that batch have non-finite text states \(e\.g\. 'I\d+', 'I\d+', 'I\d+'; "
                     rf"from {re.escape(str(Path(base.cache_dir) / 'text.safetensors'))}\); ", message), message
    assert "image states" not in message
    assert message.endswith("; last good checkpoint: none yet; best weights: none yet")  # none were written


@pytest.mark.parametrize("method,feed", [("fft", "live"), ("id", "cached"), ("iisan", "live")])
def test_a_non_finite_loss_is_explained_for_every_method(base, monkeypatch, method, feed):
    """The baselines and the ID model have no separate item states to check; the live feed's are checked
    by running the frozen encoders over the failing batch again (finite here: the loss is at fault)."""
    loss = recommender_module.in_batch_softmax_loss
    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", lambda *a: loss(*a) * float("nan"))
    with pytest.raises(TrainingError) as info:
        train(base.replace(run_name=f"nan-{method}-{feed}", method=method, feed=feed, epochs=1,
                           max_steps_per_epoch=2))
    message = str(info.value)
    assert message.startswith("non-finite loss at step 0 (epoch 0, steps 0..1); ")
    assert "states" not in message and "trained weight tensor(s) now hold non-finite values" in message


def test_a_non_finite_learning_rate_is_named():
    from iisan.train.nonfinite import learning_rates

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([{"params": [weight], "lr": 1e-3, "name": "recsys"},
                                  {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3, "name": "image"}])
    assert learning_rates(optimizer) == []
    optimizer.param_groups[1]["lr"] = float("nan")  # e.g. from a hand-edited checkpoint
    assert learning_rates(optimizer) == ["the learning rate of group 'image' is nan"]


def test_resume_of_a_run_that_does_not_exist_makes_no_folder(base, tmp_path):
    cfg = base.replace(out_dir=str(tmp_path), run_name="never-ran", resume=True)
    with pytest.raises(ConfigError, match=f"--resume: no checkpoint in {tmp_path / 'never-ran' / 'checkpoints'}"):
        train(cfg)
    assert not (tmp_path / "never-ran").exists()  # no failed results.json to show up in `iisan results`


def test_fewer_epochs_than_a_run_has_trained_is_refused_and_changes_nothing(base, tmp_path):
    cfg = base.replace(out_dir=str(tmp_path), run_name="two", epochs=2)
    train(cfg)
    config_before = (tmp_path / "two" / "config.json").read_bytes()
    results_before = (tmp_path / "two" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match=f"--epochs 1: {tmp_path / 'two'} has trained 2 epochs already") as err:
        train(cfg.replace(epochs=1))
    # a sweep's point: more --epochs for the whole grid would carry every finished point on too
    assert "in a sweep with --grid-index for this point alone: the others would go on too" in str(err.value)
    assert (tmp_path / "two" / "config.json").read_bytes() == config_before
    assert (tmp_path / "two" / "results.json").read_bytes() == results_before
    log = (tmp_path / "two" / "train.log").read_text()  # the attempt is noted, not as the run failing
    assert "WARNING iisan.train.records: this attempt ended before training (failed: --epochs 1: " in log
    assert "; the run in this folder is as it was" in log and "run failed" not in log
    assert len(train(cfg.replace(epochs=3))["epochs"]) == 3  # more goes on


def test_a_run_finished_by_another_process_while_this_one_waited_for_its_folder_is_not_resumed(base, tmp_path,
                                                                                                caplog):
    """Two copies of one command: the second looks (not finished), the first finishes and lets go of the
    folder, the second locks it. It returns the finished results, as a later look would have, instead of
    resuming a finished run (a second header in train.log, an entry in resumed_from, results.json rewritten)."""
    cfg = base.replace(out_dir=str(tmp_path), run_name="twice", epochs=1)
    first = train(cfg)
    run = tmp_path / "twice"
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    with caplog.at_level("INFO"):
        second = train(cfg, reuse=False)  # its look came before the first run finished
    assert second["test"] == first["test"] and second["resumed_from"] == first["resumed_from"] == []
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    assert "finished before with this config; not training it again" in caplog.text


def test_a_lower_patience_under_which_the_run_would_have_stopped_earlier_is_refused(base, tmp_path):
    """Learning rates too small to move a score: epoch 0 is the best and epochs 1-3 are 3 without
    improvement. Patience 1 would have stopped the run after epoch 2, so its record cannot be patience 1's;
    patience 2 stops it exactly where it is, the same run."""
    rates = dict.fromkeys(("lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text"), 1e-12)
    cfg = base.replace(out_dir=str(tmp_path), run_name="flat", epochs=4, **rates)
    results = train(cfg)
    assert results["best_epoch"] == 0 and len(results["epochs"]) == 4
    before = (tmp_path / "flat" / "results.json").read_bytes()
    with pytest.raises(ConfigError) as info:
        train(cfg.replace(patience=1))
    assert str(info.value) == (f"--patience 1: {tmp_path / 'flat'} has trained 3 epochs in a row without improvement "
                               "(epochs 1-3), so with 1 it would have stopped after epoch 2, 1 epoch(s) earlier than "
                               "it did; give at least 2 to go on with it, or another --run-name")
    assert (tmp_path / "flat" / "results.json").read_bytes() == before
    again = train(cfg.replace(patience=2))
    assert again["config"]["patience"] == 2 and len(again["epochs"]) == 4


def test_a_lower_patience_is_held_against_every_stretch_without_improvement_not_only_the_last():
    """Scores 0.1, 0.3, 0.2, 0.25, 0.4, 0.5: epochs 2-3 are two without improvement, then it improves again.
    Patience 1 would have stopped after epoch 3 (two bad epochs) although the run ends on an improvement;
    patience 2 trains past them all; patience 0 would have stopped after epoch 2."""
    from iisan.train.progress import check_patience, stopping_point

    records = [{"epoch": e, "valid": {"hit@10": v}} for e, v in enumerate((0.1, 0.3, 0.2, 0.25, 0.4, 0.5))]
    assert [stopping_point(records, p) for p in (0, 1, 2)] == [2, 3, None]
    check_patience(2, records, Path("run"))
    for patience, stop, earlier in ((1, 3, 2), (0, 2, 3)):
        with pytest.raises(ConfigError) as info:
            check_patience(patience, records, Path("run"))
        assert str(info.value) == (
            f"--patience {patience}: run has trained 2 epochs in a row without improvement (epochs 2-3), so with "
            f"{patience} it would have stopped after epoch {stop}, {earlier} epoch(s) earlier than it did; give at "
            "least 2 to go on with it, or another --run-name")
    # the least patience that goes on is named with the stretch that needs it, where that is another
    scores = (0.5, 0.4, 0.4, 0.6, 0.1, 0.1, 0.1, 0.1, 0.7)
    with pytest.raises(ConfigError) as info:
        check_patience(1, [{"epoch": e, "valid": {"hit@10": v}} for e, v in enumerate(scores)], Path("run"))
    assert str(info.value) == (
        "--patience 1: run has trained 2 epochs in a row without improvement (epochs 1-2), so with 1 it would "
        "have stopped after epoch 2, 6 epoch(s) earlier than it did; give at least 4 for its 4 epochs in a row "
        "without improvement (epochs 4-7) to go on with it, or another --run-name")
    # a first epoch scored NaN is no improvement (nothing before it to compare with): one line, no traceback
    with pytest.raises(ConfigError, match=r"has trained 1 epoch without improvement \(epoch 0\), so with 0"):
        check_patience(0, [{"epoch": e, "valid": {"hit@10": v}} for e, v in enumerate((math.nan, 0.1, 0.1))],
                       Path("run"))
    # a stretch at the end that stops it right after the last epoch is the same run; one epoch more is not
    flat = records[:2] + [{"epoch": e, "valid": {"hit@10": 0.2}} for e in (2, 3)]
    check_patience(1, flat, Path("run"))
    with pytest.raises(ConfigError, match="stopped after epoch 2, 1 epoch"):
        check_patience(0, flat, Path("run"))


@pytest.mark.parametrize("manifest", [
    "[]", '{"format": "iisan-checkpoint/1"}', '{"format": "iisan-checkpoint/1", "files": []}',
    '{"format": "iisan-checkpoint/1", "files": {"model.safetensors": 5}}', "[" * 100000 + "]" * 100000,
    '{"format": "iisan-checkpoint/1", "files": {}}', '{"n": 1' + "0" * 5000 + "}",
], ids=["list", "no-files", "files-list", "entry-int", "too-deep", "files-empty", "integer-too-long"])
def test_a_manifest_of_the_wrong_shape_is_refused_for_the_previous_checkpoint(reference, manifest, tmp_path):
    root = Path(reference["run_dir"]) / "checkpoints"
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    (copy / "epoch-0003" / checkpoint.MANIFEST).write_text(manifest)
    config = json.loads((root / "epoch-0003" / "state.json").read_text())["config"]
    found, refused = checkpoint.latest(copy, config)
    assert found.path == copy / "epoch-0002" and len(refused) == 1
    assert refused[0].startswith(f"{copy / 'epoch-0003' / checkpoint.MANIFEST} is damaged"), refused


def test_a_run_folder_whose_config_is_nested_too_deep_is_not_a_run_folder(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100000 + "]" * 100000)
    assert not runfolder.is_run_folder(tmp_path)


def test_a_users_file_edited_in_place_is_neither_finished_before_nor_resumed(base, tmp_path, caplog):
    """A run folder records the fingerprints of the users and items files it read: after the users file
    is edited in place, a rerun is refused in one line naming the file (it returned the old numbers as
    "finished before"; with more epochs it resumed on the new users), and using the run warns."""
    import re

    from iisan.digests import file_fingerprint
    from iisan.errors import ConfigError
    from iisan.experiments.trained import load_run

    users = tmp_path / "users.tsv"
    shutil.copy(base.users, users)
    cfg = base.replace(users=str(users), run_name="edited", epochs=1)
    first = train(cfg)
    assert first["users_fingerprint"] == file_fingerprint(users) and first["items_fingerprint"]
    lines = users.read_text().splitlines(keepends=True)
    users.write_text("".join(lines[: len(lines) // 2]))
    for again in (cfg, cfg.replace(epochs=2)):
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(users))} has changed since .*edited read it \(users "
                                              rf"file fingerprint {first['users_fingerprint']} then, "):
            train(again)
    with caplog.at_level("WARNING"):
        load_run(first["run_dir"], device="cpu")
    assert f"{users.resolve()} is not the users file {first['run_dir']} trained on" in caplog.text
    assert "use the users in it" in caplog.text


def test_a_cache_of_another_content_is_not_the_run_s_cache(base, tmp_path):
    """--cache-dir may change between attempts of a run (a moved cache), its content may not: a finished
    run rerun on a float16 cache of the same encoders is refused, naming what differs, not answered with
    the float32 run's numbers; results.json records what identifies the cache it read."""
    import re

    from iisan.errors import ConfigError

    cfg = base.replace(run_name="cache-content", epochs=1)
    first = train(cfg)
    assert first["cache"]["text"]["dtype"] == "float32" and first["cache"]["image"]["layers"] == "[0, 1, 2, 3]"
    half = base.replace(cache_dir=str(tmp_path / "cache16"))
    build_cache_from_config(half, dtype="float16")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path / 'cache16' / 'text.safetensors'))} is not "
                                          r"the cache .*cache-content trained on \(dtype float32 then, float16 now\)"):
        train(cfg.replace(cache_dir=half.cache_dir))
    assert train(cfg)["status"] == "finished"  # its own cache: finished before


def test_a_run_resumed_under_another_commit_lists_both(base, monkeypatch, caplog):
    """results.json's git_commits: the commit of every attempt that trained the run, the later one with a
    warning when it differs (git_commit alone named only the last)."""
    import iisan.train.records as records

    cfg = base.replace(run_name="two-commits", epochs=1)
    monkeypatch.setattr(records, "git_commit", lambda: "aaaa111")
    assert train(cfg)["git_commits"] == ["aaaa111"]
    monkeypatch.setattr(records, "git_commit", lambda: "bbbb222")
    with caplog.at_level("WARNING"):
        longer = train(cfg.replace(epochs=2))
    assert longer["git_commits"] == ["aaaa111", "bbbb222"] and longer["git_commit"] == "bbbb222"
    assert "was trained so far at commit aaaa111 and goes on at bbbb222" in caplog.text
    assert train(cfg.replace(epochs=3))["git_commits"] == ["aaaa111", "bbbb222"]  # the same commit again: once


def crash_at(monkeypatch, call: int, look=lambda calls: None) -> None:
    """The machine goes down during the ``call``-th training loss (no signal: nothing saved then); ``look(n)``
    before each, the ``n``-th."""
    loss, calls = recommender_module.in_batch_softmax_loss, []

    def crashing(*args):
        calls.append(1)
        look(len(calls))
        if len(calls) == call:
            raise RuntimeError("the machine went down")
        return loss(*args)

    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss", crashing)


def crashed_run(base, monkeypatch, name: str, **settings) -> tuple[Config, Path]:
    """A --checkpoint-every 3 run that crashed at epoch 1's step 8 (its newest checkpoint epoch-0001-step-00006),
    and its checkpoints' folder."""
    cfg = base.replace(run_name=name, checkpoint_every=3, **settings)
    crash_at(monkeypatch, 18)
    with pytest.raises(RuntimeError):
        train(cfg)
    monkeypatch.undo()
    return cfg, Path(cfg.out_dir) / name / "checkpoints"


def test_checkpoint_every_n_steps_keeps_the_newest_and_a_crash_resumes_from_it_exactly(base, reference, monkeypatch):
    """--checkpoint-every 3 on 10 steps an epoch: after steps 3, 6 and 9, each pruning the one before; the
    epoch's own checkpoint prunes them all. A crash (no signal, no save) in epoch 1's step 8 resumes from
    epoch-0001-step-00006 and gives the numbers of a run without them."""
    cfg = base.replace(run_name="every-3", checkpoint_every=3)
    root = Path(cfg.out_dir) / "every-3" / "checkpoints"
    seen = {}
    crash_at(monkeypatch, 18, lambda n: seen.update({n: [p.name for p in checkpoint.checkpoints(root)]}))  # (step 8)
    with pytest.raises(RuntimeError, match="the machine went down"):
        train(cfg)
    monkeypatch.undo()
    assert seen[4] == ["epoch-0000-step-00003"] and seen[10] == ["epoch-0000-step-00009"]
    assert seen[11] == ["epoch-0000"]  # the epoch's own removed its steps'
    assert seen[18] == ["epoch-0001-step-00006", "epoch-0000"]
    assert checkpoint.verify(root / "epoch-0001-step-00006") is None
    resumed = train(cfg)
    assert resumed["resumed_from"] == ["epoch-0001-step-00006"]
    same_run(reference, resumed)
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0003", "epoch-0002"]


@pytest.mark.parametrize("every, steps", [(3, [3, 6, 9]), (5, [5])])  # (5: the epoch's last step has its own)
def test_checkpoint_every_does_not_count_its_writing_as_training_time(base, reference, monkeypatch, every, steps):
    """Each write moves a fake clock on by 1000 s: neither the epoch's training seconds nor a later checkpoint's
    count the mid-epoch ones (a run that counted them would show 1000 s and more)."""
    import iisan.train.resuming as resuming

    offset, perf_counter, write, saved = [0.0], time.perf_counter, resuming.write_checkpoint, []

    def writing(root, name, model, train_state, state, keep):
        path = write(root, name, model, train_state, state, keep)
        saved.append((name, state["train_seconds_in_epoch"]))
        offset[0] += 1000.0
        return path

    monkeypatch.setattr(time, "perf_counter", lambda: perf_counter() + offset[0])
    monkeypatch.setattr(resuming, "write_checkpoint", writing)
    results = train(base.replace(run_name=f"every-{every}-timed", epochs=1, checkpoint_every=every))
    assert [name for name, _ in saved] == [f"epoch-0000-step-{step:05d}" for step in steps] + ["epoch-0000"]
    assert offset[0] == 1000 * len(saved)
    within = [seconds for _, seconds in saved[:-1]] + [results["epochs"][0]["train_seconds"]]
    assert 0 < within[0] and within == sorted(within) and within[-1] < 1000
    assert results["epochs"][0]["loss"] == reference["epochs"][0]["loss"]


def test_checkpoint_every_is_no_part_of_a_runs_identity_and_must_not_be_negative(base, reference):
    from iisan.train.runnames import run_dir

    assert train(base.replace(run_name="reference", checkpoint_every=4)) == reference  # finished before
    assert run_dir(base.replace(checkpoint_every=7)) == run_dir(base)
    with pytest.raises(ConfigError, match=r"^checkpoint_every=-1 must be >= 0$"):
        base.replace(checkpoint_every=-1)


def test_checkpoint_every_writes_no_checkpoint_after_a_non_finite_loss(base, monkeypatch):
    """A NaN loss at epoch 1's step 2, before its first --checkpoint-every 3 checkpoint (between the loop's
    looks at the losses, every 10 steps): the run fails there, and its last good checkpoint is epoch 0's."""
    cfg = base.replace(run_name="nan-every", checkpoint_every=3)
    calls = poison_at(monkeypatch, 12)
    root = Path(cfg.out_dir) / "nan-every" / "checkpoints"
    with pytest.raises(TrainingError, match=r"^non-finite loss at step 11 \(epoch 1, steps 10\.\.19\); .*"
                                            f"last good checkpoint: {re.escape(str(root / 'epoch-0000'))};"):
        train(cfg)
    assert len(calls) == 13 and [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0000"]


def test_one_relative_path_from_two_working_folders_is_shown_as_the_two_paths_it_means(tmp_path, monkeypatch):
    """A run folder reached from another folder (a copy, a container's mount): 'images='demo/images.lmdb' there,
    'demo/images.lmdb' now' read as no difference at all."""
    (tmp_path / "then").mkdir()
    (tmp_path / "now").mkdir()
    saved = Config(users="data/u.tsv", items="data/i.tsv").to_dict()
    monkeypatch.chdir(tmp_path / "now")
    assert checkpoint.config_differences(saved, saved, str(tmp_path / "then")) == [
        f"items={str(tmp_path / 'then' / 'data' / 'i.tsv')!r} there, {str(tmp_path / 'now' / 'data' / 'i.tsv')!r} now",
        f"users={str(tmp_path / 'then' / 'data' / 'u.tsv')!r} there, {str(tmp_path / 'now' / 'data' / 'u.tsv')!r} now"]
    moved = {**saved, "users": "other/u.tsv"}
    assert checkpoint.config_differences(saved, moved, str(tmp_path / "then"))[1] == \
        "users='data/u.tsv' there, 'other/u.tsv' now"  # two spellings: as written


def test_a_stop_at_a_step_checkpoint_every_saves_writes_one_checkpoint_and_resumes_exactly(base, reference,
                                                                                          monkeypatch):
    import iisan.train.resuming as resuming

    cfg = base.replace(run_name="ctrl-c-due", checkpoint_every=3)
    write, written = resuming.write_checkpoint, []
    monkeypatch.setattr(resuming, "write_checkpoint", lambda root, name, *args: written.append(name) or
                        write(root, name, *args))
    interrupt_at(monkeypatch, 16)  # epoch 1, step 6 of 10
    with pytest.raises(RunInterrupted, match=r"during epoch 1 after step 6 of 10; checkpoint saved in \S*"
                                             r"epoch-0001-step-00006\. To resume"):
        train(cfg)
    assert written[-3:] == ["epoch-0000", "epoch-0001-step-00003", "epoch-0001-step-00006"]
    monkeypatch.undo()
    same_run(reference, train(cfg))


@pytest.mark.parametrize("every", [3, 6])  # (6: its first checkpoint takes the old one's name)
def test_an_epoch_restarted_under_another_process_count_drops_its_old_mid_epoch_checkpoint(base, monkeypatch,
                                                                                            caplog, every):
    """Resumed by another number of processes, epoch 1 starts again (``Progress.load``, forced here): the old
    epoch-0001-step-00006 sorted as newer than the new run's steps, was counted, resumed from again after a
    crash, and at its name set aside with a warning that this run could not resume from it, never pruned."""
    import iisan.train.progress as progress_module

    cfg, root = crashed_run(base, monkeypatch, f"restarted-{every}", epochs=2)
    loss, seen = recommender_module.in_batch_softmax_loss, []
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0001-step-00006", "epoch-0000"]
    load = progress_module.Progress.load
    monkeypatch.setattr(progress_module.Progress, "load",
                        lambda self, state, path, epochs, restart_epoch=False: load(self, state, path, epochs, True))
    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss",
                        lambda *args: seen.append([p.name for p in checkpoint.checkpoints(root)]) or loss(*args))
    caplog.set_level(logging.INFO, logger="iisan")
    train(cfg.replace(checkpoint_every=every))
    assert seen[every] == [f"epoch-0001-step-{every:05d}", "epoch-0000"]  # after the restarted epoch's first
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0000", "epoch-0001"]
    assert "starts again from its first step" in caplog.text and "could not resume from" not in caplog.text


def test_the_seconds_a_mid_epoch_checkpoint_saved_count_in_its_epoch_alone(base, monkeypatch):
    import iisan.train.progress as progress_module

    cfg, _ = crashed_run(base, monkeypatch, "partial-seconds")
    load = progress_module.Progress.load

    def loading(self, *args, **kwargs):
        load(self, *args, **kwargs)
        self.partial_seconds += 1e6  # what epoch 1's first six steps took, as saved (made unmistakable)

    monkeypatch.setattr(progress_module.Progress, "load", loading)
    seconds = [e["train_seconds"] for e in train(cfg)["epochs"]]
    assert seconds[1] >= 1e6 and max(seconds[0], seconds[2], seconds[3]) < 1e6


def test_a_checkpoint_a_new_one_of_its_name_replaces_stays_until_that_one_is_in_place(base, monkeypatch):
    """A stop between moving the old one out and moving the new one in (a second Ctrl-C) lost both."""
    _, root = crashed_run(base, monkeypatch, "replacing", epochs=2)
    old = checkpoint.read(root / "epoch-0001-step-00006")
    replace = os.replace

    def stopped(source, target):
        if str(source).endswith(".tmp") and Path(target).name == "epoch-0001-step-00006":
            raise KeyboardInterrupt
        return replace(source, target)

    monkeypatch.setattr(checkpoint_writing.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_writing.write_checkpoint(root, "epoch-0001-step-00006", old.model, old.train_state, old.state, 2)
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0000", "epoch-0001-step-00006"]
    assert checkpoint.verify(root / "epoch-0001-step-00006") is None


def test_a_damaged_newer_mid_epoch_checkpoint_is_left_in_place_not_taken_for_a_restarted_epochs(base, monkeypatch):
    """Its digest fails, so the run resumes from epoch 0 (no restart): the new epoch's first checkpoint deleted
    it as one of a restarted epoch (its sizes and state alone were looked at)."""
    cfg, root = crashed_run(base, monkeypatch, "damaged-newer", epochs=2)
    model = root / "epoch-0001-step-00006" / checkpoint.MODEL
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    loss, seen = recommender_module.in_batch_softmax_loss, []
    monkeypatch.setattr(recommender_module, "in_batch_softmax_loss",
                        lambda *args: seen.append([p.name for p in checkpoint.checkpoints(root)]) or loss(*args))
    assert train(cfg)["resumed_from"] == ["epoch-0000"]
    assert seen[3] == ["epoch-0001-step-00006", "epoch-0001-step-00003"]  # (epoch 1, after step 3; it counts)


def test_a_run_killed_before_pruning_its_last_checkpoint_is_pruned_when_it_finishes(base, monkeypatch, caplog):
    """An attempt killed between writing the last epoch's checkpoint and pruning (here: the prune fails) left
    epoch-0000 and a half-removed mid-epoch checkpoint beside epoch-0001; the next attempt, with nothing left to
    train, finishes the run and prunes them (before, they stayed for good: nothing wrote a checkpoint again)."""
    cfg = base.replace(run_name="unpruned", epochs=2, keep_checkpoints=1)
    root = Path(cfg.out_dir) / "unpruned" / "checkpoints"
    prune = checkpoint_writing.prune

    def killed(where, keep, config, written):
        if written.name == "epoch-0001":
            raise RuntimeError("killed before pruning")
        return prune(where, keep, config, written)

    monkeypatch.setattr(checkpoint_writing, "prune", killed)
    with pytest.raises(RuntimeError, match="killed before pruning"):
        train(cfg)
    monkeypatch.undo()
    (root / ".epoch-0001-step-00008.pruned.tmp").mkdir()
    assert [p.name for p in checkpoint.checkpoints(root)] == ["epoch-0001", "epoch-0000"]
    with caplog.at_level(logging.INFO):
        done = train(cfg)
    assert done["status"] == "finished" and len(done["epochs"]) == 2
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]
    assert "removed 1 checkpoint(s) of the finished run that an attempt killed before pruning left " \
           "(--keep-checkpoints 1)" in caplog.text


def test_a_finished_run_killed_before_keep_checkpoints_0_removed_them_is_pruned_when_found(base, monkeypatch,
                                                                                             caplog):
    """--keep-checkpoints 0: killed after results.json said finished, before the checkpoints went. The next
    command, finding the run finished, removes them by the run's own --keep-checkpoints, the folder locked, and
    answers 'finished before' (before: they stayed for good); it needs no cache to do so (the run is not set up)."""
    import iisan.train.resuming as resuming

    cfg = base.replace(run_name="kept-0", epochs=2, keep_checkpoints=0)
    root = Path(cfg.out_dir) / "kept-0" / "checkpoints"
    monkeypatch.setattr(resuming, "prune_finished", lambda *args: None)  # (killed before it)
    first = train(cfg)
    monkeypatch.undo()
    assert first["status"] == "finished" and checkpoint.checkpoints(root)
    os.rename(cfg.cache_dir, cfg.cache_dir + ".away")
    try:
        with caplog.at_level(logging.INFO):
            again = train(cfg.replace(keep_checkpoints=3))  # the run's own 0 decides, not the command's
    finally:
        os.rename(cfg.cache_dir + ".away", cfg.cache_dir)
    assert again["epochs"] == first["epochs"] and not root.exists()
    assert "finished before with this config; not training it again" in caplog.text
    assert "removed 1 checkpoint(s) of the finished run (--keep-checkpoints 0)" in caplog.text  # (one while training)
    assert runfolder.reusable_results(cfg) is not None


def test_a_finished_runs_leftover_temporary_folder_goes_and_a_checkpoint_it_cannot_read_stays(base, caplog):
    """A finished run's folder holding a kill's temporary checkpoint folder and a checkpoint of another config
    (copied in): the temporary one goes when the run is found finished; the other is not this run's to delete,
    stays, and counts for nothing to prune (the next look takes no lock for it)."""
    from iisan.train.checkpoint_writing import prune

    cfg = base.replace(run_name="leftovers", epochs=2, keep_checkpoints=1)
    done = train(cfg)
    root = Path(done["run_dir"]) / "checkpoints"
    shutil.copytree(root / "epoch-0001", root / ".epoch-0002.tmp")
    shutil.copytree(root / "epoch-0001", root / "epoch-0009")
    restate(root / "epoch-0009", lambda state: state["config"].update(lr=0.5))
    assert prune(root, 1, cfg.to_dict(), None, dry=True) == 1  # the temporary folder alone
    assert train(cfg)["epochs"] == done["epochs"]
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "epoch-0009"]
    assert prune(root, 1, cfg.to_dict(), None, dry=True) == 0
