"""What a run leaves for people to read, written while it runs (rank 0 only), in its run folder:

    train.log        the resolved config and environment at the top of each start (a resume appends
                     another), then exactly the console's log lines (a handler on the ``iisan`` logger)
    metrics.jsonl    one JSON line per finished epoch (loss, train and eval seconds, steps, every
                     validation metric, test metrics when computed, the local time it ended), flushed to
                     disk before the epoch's log line, so a killed run keeps every epoch it reported; after
                     a resume it holds the resumed checkpoint's history, then the new epochs
    results.json     rewritten every epoch: status running | finished | failed | interrupted, the config,
                     the metrics at the best-validation epoch so far, the history, timings, parameters,
                     memory and provenance
    tensorboard/     with ``--report-to tensorboard``: the same per-epoch numbers as scalars
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..claims import refuse_link
from ..config import Config
from ..console import metrics_text
from ..devices import device_name
from ..errors import RunInterrupted, UserError, parse_json
from ..files import atomic_path, json_text, write_json_atomic
from ..logfiles import Logging
from ..memory import MemoryPeaks
from ..methods import METHOD_NAMES, named_unread
from ..metric_names import SELECTED_BY
from ..precedence import said_switched_off
from ..provenance import command_line, git_commit, versions
from .checkpoint import recorded_content
from .progress import Progress
from .runfolder import RESULTS

log = logging.getLogger(__name__)

LOG, METRICS, TENSORBOARD = "train.log", "metrics.jsonl", "tensorboard"


def error_status(err: BaseException) -> tuple[str, str]:
    """(status, one-line reason) of a run that ended with ``err``."""
    status = "interrupted" if isinstance(err, (KeyboardInterrupt, RunInterrupted)) else "failed"
    text = " ".join(str(err).split()) or type(err).__name__
    return status, text if isinstance(err, UserError) or status == "interrupted" else f"{type(err).__name__}: {text}"


@dataclass(frozen=True)
class ParameterCount:
    """The model's ``trainable`` and ``total`` parameters, and the trainable ones under each learning-rate
    key (``by_rate``: ``optim.trained_by_rate``); results.json's ``parameters``."""

    trainable: int
    total: int
    by_rate: dict[str, int]


class RunRecord:
    """The files above for one run. ``main``: this process writes them (rank 0 under torchrun); on the
    other ranks every method only computes what it returns."""

    def __init__(self, cfg: Config, run_dir: Path, device: torch.device, world_size: int = 1, main: bool = True):
        self.cfg, self.run_dir, self.device, self.world_size, self.main = cfg, run_dir, device, world_size, main
        self.versions, self.commit = versions(), git_commit()  # once: git runs a process
        self.commits = [self.commit]  # of every attempt that trained the run (``resumed_under``)
        self.world_sizes = [world_size]  # and their process counts
        self.devices = [device_name(device)]  # and their devices (a CPU's thread count changes the last bits)
        self.wrote_finished = False  # results.json says finished (``ended`` leaves it so)
        # from here on: not a cache build's, or an earlier run's in this process; the LMDB's pages where it is read
        self.memory = MemoryPeaks(device, cfg.method != "id" and cfg.feed == "live" and cfg.towers != "text")
        self.parameters, self.step = ParameterCount(0, 0, {}), {}  # set once the model is built
        self.items_fingerprint = ""  # set once the data is read: trained runs refuse another items file
        self.users_fingerprint = ""  # and another users file (``same_inputs.refuse_changed_data``)
        self.kept_items = ""  # ``SeqRecData.kept_items``: using an ID run refuses a users file keeping other items
        self.cache: dict = {}  # what identifies the cache a cached run reads (``same_inputs.cache_record``)
        self.encoders: dict = {}  # and the encoder folders a live run reads (``same_inputs.encoder_record``)
        self.log_file = Logging()  # train.log, from ``start_log`` to ``close``
        self.metrics: list[str] | None = None  # metrics.jsonl's lines, each encoded once
        self.writer = None

    # ----------------------------------------------------------------------------------------------
    # train.log

    def start_log(self) -> None:
        """Append the header, then copy every ``iisan`` log line into train.log until ``close``."""
        if not self.main:
            return
        path = self.run_dir / LOG
        refuse_link(path, "the run's log")
        self.log_file.open(path, self.header())  # (a byte like 0x80 in --run-name is written escaped, not a crash)

    def say_unended_attempt(self, resumes: bool) -> None:
        """The folder's results say ``running``, yet this process holds its lock: the attempt before this one
        stopped without a word (SIGKILL, a lost machine), which its train.log did not say. Said once this attempt
        knows whether it resumes (a checkpoint) or starts again (``resuming.RunCheckpoints.choose``), not where
        it is refused (its error says why)."""
        try:
            earlier = parse_json((self.run_dir / RESULTS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(earlier, dict) or earlier.get("status") != "running":
            return
        log.warning("the attempt before this one stopped without a word (killed, or its machine went down): %s",
                    "whatever it trained after its last checkpoint is trained again" if resumes else
                    "it left no checkpoint, and the run starts from its beginning")

    def header(self) -> str:
        """Its first line is how a folder holding only train.log is known for a run's (``runfolder.LOG_HEAD``)."""
        listed = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        return "\n".join([
            f"=== {self.run_dir.name}: started {time.strftime('%Y-%m-%d %H:%M:%S %z')} ===",
            f"command: {command_line()}",
            f"commit: {self.commit}",
            f"device: {device_name(self.device)}; processes: {self.world_size}",
            f"versions: {listed}",
            "config: " + json.dumps(self.cfg.to_dict(), indent=1),
            *([f"not read by this run (method={self.cfg.method}, towers={self.cfg.towers}, feed={self.cfg.feed}), "
               f"given other than their defaults: {', '.join(unread)}"] if (unread := self.unread_given()) else []),
            *(f"said when the config was read: {warning}" for warning in said_switched_off(self.cfg)),
            "",
        ])

    def unread_given(self) -> list[str]:
        """``key=value`` for each key given that this run never reads: the console warned of them when the config
        was resolved (``methods.newly_unread``), before this file was opened."""
        cfg = self.cfg
        return [f"{k}={getattr(cfg, k)!r}" for k in named_unread(cfg.to_dict(), cfg.method, cfg.towers, cfg.feed)]

    def note(self, level: int, message: str, err: BaseException | None = None) -> None:
        """A line for train.log only (the console says it its own way, e.g. ``iisan: error: ...``); with ``err``,
        its traceback below it."""
        if (handler := self.log_file.handler) is not None:
            trace = (type(err), err, err.__traceback__) if err is not None else None
            handler.handle(logging.LogRecord(log.name, level, __file__, 0, message, None, trace))

    # ----------------------------------------------------------------------------------------------
    # metrics.jsonl and TensorBoard

    def start_metrics(self, history: list[dict]) -> None:
        """metrics.jsonl holds ``history`` (the resumed checkpoint's epochs; none for a fresh run), then
        one line more per epoch. Rewritten whole each time (a temporary file, synced, then renamed): a
        full disk leaves the previous file, never half a line."""
        if not self.main:
            return
        self.metrics = [json_text(record) + "\n" for record in history]
        self.write_metrics()
        if self.cfg.report_to == "tensorboard":
            # from the epoch this attempt trains next: a killed attempt's scalars of it and later are dropped (an
            # epoch logged, then killed before its checkpoint, is trained again: it showed twice)
            self.writer = tensorboard_writer(self.run_dir / TENSORBOARD, history[-1]["epoch"] + 1 if history else 0)

    def resumed_under(self, state: dict) -> None:
        """The commits, process counts and devices of the attempts before this one (a checkpoint's
        ``git_commits``, its ``world_sizes`` then the ``world_size`` of the attempt that saved it, its ``devices``
        then its ``device``): a resume under another commit or device than the last is a warning, and results.json
        lists every commit, count and device, each change once."""
        commits = [c for c in state.get("git_commits") or () if isinstance(c, str)]
        if commits and commits[-1] != self.commit:
            log.warning("%s was trained so far at commit %s and goes on at %s (results.json's git_commits lists "
                        "both)", self.run_dir, commits[-1], self.commit)
        sizes = _then([n for n in state.get("world_sizes") or () if type(n) is int and n >= 1], state["world_size"])
        self.commits, self.world_sizes = _then(commits, self.commit), _then(sizes, self.world_size)
        devices = _then([d for d in state.get("devices") or () if isinstance(d, str)], str(state.get("device")))
        here = device_name(self.device)
        if devices[-1] not in (here, device_name(self.device, model=False)):  # (the latter: an older version's name)
            log.warning("%s was trained so far on %s and goes on on %s: its numbers will not match an uninterrupted "
                        "run on either bit for bit (results.json's devices lists both)", self.run_dir, devices[-1],
                        here)
        self.devices = _then(devices, here)
        self.memory.resume(state)

    def write_metrics(self) -> None:
        with atomic_path(self.run_dir / METRICS) as tmp:  # synced before the rename: on disk before the epoch is told
            tmp.write_text("".join(self.metrics), encoding="utf-8")

    def epoch(self, record: dict) -> None:
        if not self.main:
            return
        self.metrics.append(json_text(record) + "\n")
        self.write_metrics()
        if self.writer is not None:
            for name, value in scalars(record).items():
                self.writer.add_scalar(name, value, record["epoch"])
            self.writer.flush()

    # ----------------------------------------------------------------------------------------------
    # results.json

    def results(self, progress: Progress, status: str, error: str = "") -> dict:
        """The contents of ``results.json``."""
        cfg = self.cfg
        return {
            "status": status,
            **({"error": error} if error else {}),
            "method": METHOD_NAMES[cfg.method],
            "feed": cfg.feed,  # live for every method but IISAN (Config.validate)
            "best_epoch": progress.stopper.best_epoch,
            "selected_by": f"valid {SELECTED_BY}",  # what chose the best epoch (metric_names.py)
            **({"ended": progress.ending()} if status == "finished" else {}),
            **({"stopped": progress.stopped} if progress.stopped else {}),
            "valid": progress.best_valid,
            "test": progress.best_test,
            "epochs": progress.epochs,
            "timing": progress.timing(),
            "step": self.step,
            "parameters": asdict(self.parameters),
            **self.memory.report(),  # peak_memory, and by phase: training's is the paper's measure
            "device": device_name(self.device),
            "world_size": self.world_size,
            "world_sizes": self.world_sizes,  # of every attempt: a run resumed under another count differs
            "devices": self.devices,  # likewise: another device, or another thread count on a CPU
            "resumed_from": progress.resumed_from,
            "versions": self.versions,
            "git_commit": self.commit,
            "git_commits": self.commits,
            "config": cfg.to_dict(),
            "items_fingerprint": self.items_fingerprint,
            "users_fingerprint": self.users_fingerprint,
            "kept_items": self.kept_items,
            "cache": self.cache,
            "encoders": self.encoders,
            "run_dir": str(self.run_dir),
            "working_dir": os.getcwd(),  # what relative paths in the config are relative to
        }

    def data_content(self) -> dict[str, str]:
        """What the data this run reads holds, by config key (``checkpoint.recorded_content``)."""
        return recorded_content({"users_fingerprint": self.users_fingerprint, "cache": self.cache,
                                 "items_fingerprint": self.items_fingerprint, "encoders": self.encoders})

    def write(self, results: dict) -> dict:
        if self.main:
            write_json_atomic(self.run_dir / RESULTS, results)
        self.wrote_finished = results.get("status") == "finished"  # what ``ended`` keeps
        return results

    def ended(self, progress: Progress, err: BaseException, started: bool) -> None:
        """train.log and results.json say how the run ended (failed or interrupted) and why. An attempt
        that ended before it ``started`` (refused: another config, a bad file) leaves the results of the
        run already in the folder as they were, as one ended after results.json said finished (a caller's log
        handler raising at the summary line) does. A record that cannot be written (the full disk that
        stopped the run) is only a warning, so the error that ended the run stays the one reported."""
        status, reason = error_status(err)
        try:
            after = self.wrote_finished
            kept = after or not started and (self.run_dir / RESULTS).is_file()  # the run already here stays as it was
            # An unexpected error's traceback goes into train.log (the console shows it with -v): a bug report
            line = (f"this attempt ended {'after the run finished' if after else 'before training'} ({status}: "
                    f"{reason}); the run in this folder is as it was" if kept else f"run {status}: {reason}")
            self.note(logging.ERROR if status == "failed" and not kept else logging.WARNING, line,
                      None if isinstance(err, (UserError, KeyboardInterrupt, RunInterrupted)) else err)
            if not kept:
                self.write(self.results(progress, status, reason))
        except (UserError, OSError) as also:
            log.warning("could not record how the run ended: %s", also)

    def close(self) -> None:
        self.log_file.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics = self.writer = None


def epoch_line(record: dict, bad_epochs: int) -> str:
    """The console's (and train.log's) line for a finished epoch."""
    valid, test = record["valid"], record.get("test")
    loss = f"{record['loss']:.4f}" if abs(record["loss"]) < 1e6 else f"{record['loss']:.4e}"  # not 21 digits
    line = (f"epoch {record['epoch']:3d} | loss {loss} | train {record['train_seconds']:.2f} s | "
            f"eval {record['eval_seconds']:.2f} s | valid {metrics_text(valid)}")
    if test:
        return line + f" | test {metrics_text(test)} (best)"
    return line + f" | {bad_epochs} epoch(s) without improvement"


def scalars(record: dict) -> dict[str, float]:
    """An epoch record's numbers as TensorBoard tags: loss, seconds/train, valid/hit@10, test/ndcg@10, ..."""
    out = {"loss": record["loss"], "seconds/train": record["train_seconds"], "seconds/eval": record["eval_seconds"]}
    for split in ("valid", "test"):
        out.update({f"{split}/{k}": v for k, v in record.get(split, {}).items()})
    return out


def tensorboard_writer(path: Path, first_epoch: int):
    """A SummaryWriter whose scalars from ``first_epoch`` on replace any earlier attempt's, or None with one logged
    line when the tensorboard package is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
    except ImportError:
        log.warning("--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                    "train.log and metrics.jsonl are written, TensorBoard scalars are not")
        return None
    return SummaryWriter(str(path), purge_step=first_epoch)


def _then(earlier: list, now) -> list:
    """``earlier`` values of the attempts before this one and ``now``, this attempt's, each change once."""
    return earlier if earlier and earlier[-1] == now else [*earlier, now]
