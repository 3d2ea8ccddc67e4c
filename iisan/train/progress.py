"""Where a run stands between steps: early stopping, the best metrics, the per-epoch history and the
position in the epoch. All of it is plain JSON in every checkpoint's ``state.json``, so a resumed run
carries on exactly where the interrupted one was."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, TrainingError
from ..metric_names import SELECTED_BY, UNSAID

# How --nonfinite authors ended a finished run (its "ended"), as the first words of the report it stopped on
# (``nonfinite.nonfinite_loss``, ``nonfinite.nonfinite_scores``).
LOSS, SCORES = "non-finite loss", "non-finite validation metrics"

log = logging.getLogger(__name__)


@dataclass
class EarlyStopping:
    """Stop once the score has not improved for more than ``patience`` epochs (authors: ``count > 10``)."""

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def improves(self, score: float) -> bool:
        return score > self.best

    def update(self, epoch: int, score: float) -> bool:
        """True if ``score`` is a new best."""
        if self.improves(score):
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs > self.patience

    def state(self) -> dict:
        return {"best": None if self.best == -math.inf else self.best, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "metric": SELECTED_BY}

    def load(self, state: dict) -> None:
        self.best = -math.inf if state["best"] is None else state["best"]
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]


def stopping_point(records: list[dict], patience: int) -> int | None:
    """The position in ``records`` (a run's epochs) after which early stopping with ``patience`` ends the
    run, replayed on their validation HR@10 as training scores it; None: it trains past them all."""
    stopper = EarlyStopping(patience)
    for i, record in enumerate(records):
        stopper.update(record["epoch"], record["valid"][SELECTED_BY])
        if stopper.should_stop:
            return i
    return None


def stretch(records: list[dict], patience: int) -> tuple[int, int, int]:
    """Where early stopping with ``patience`` ends the run (it must, within ``records``): the position it
    stops after, and the first and last positions of the stretch without improvement that stops it."""
    stop = stopping_point(records, patience)
    start = stop - patience
    best = max((r["valid"][SELECTED_BY] for r in records[:start]), default=-math.inf)  # what the stretch fails to beat
    end = next((i - 1 for i in range(stop + 1, len(records)) if records[i]["valid"][SELECTED_BY] > best),
               len(records) - 1)
    return stop, start, end


def check_patience(patience: int, records: list[dict], run: Path) -> None:
    """Refuse a patience under which the run would have stopped before it did, anywhere in its history (an
    earlier stretch without improvement counts as much as the last): its epochs and results are not that
    patience's. A higher one goes on training; one that stops right after the last epoch is the same run.
    The message names the stretch that stops it first, and the one that the least patience that goes on
    needs, where that is another."""
    last = len(records) - 1

    def goes_on(p: int) -> bool:
        stop = stopping_point(records, p)
        return stop is None or stop == last

    if goes_on(patience):
        return

    def epochs(first: int, final: int) -> str:
        n, which = final - first + 1, f"{records[first]['epoch']}-{records[final]['epoch']}"
        return f"{n} epochs in a row without improvement (epochs {which})" if n > 1 else \
            f"1 epoch without improvement (epoch {records[first]['epoch']})"

    least = next(p for p in range(patience + 1, last + 1) if goes_on(p))  # patience ``last`` never stops early
    stop, start, end = stretch(records, patience)
    needs = stretch(records, least - 1)  # the stretch that stops it under any patience below ``least``
    why = "" if needs[1:] == (start, end) else f" for its {epochs(*needs[1:])}"
    raise ConfigError(f"--patience {patience}: {run} has trained {epochs(start, end)}, so with {patience} it would "
                      f"have stopped after epoch {records[stop]['epoch']}, {last - stop} epoch(s) earlier than it "
                      f"did; give at least {least}{why} to go on with it, or another --run-name")


@dataclass
class Progress:
    """``epochs`` holds one record per finished epoch (loss, seconds, validation, test on improvement);
    ``start_epoch`` / ``start_step`` say where training goes on, ``partial_seconds`` how long the steps
    already done in that epoch took."""

    stopper: EarlyStopping
    best_valid: dict = field(default_factory=dict)
    best_test: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)
    resumed_from: list = field(default_factory=list)
    global_step: int = 0
    start_epoch: int = 0
    start_step: int = 0
    partial_seconds: float = 0.0
    stopped: str = ""  # why training ended before early stopping or the last epoch (``--nonfinite authors``)

    def ending(self) -> str:
        """Why a finished run ended: its patience ran out, ``--nonfinite authors`` stopped it, or its last epoch."""
        if self.stopped:
            return SCORES if self.stopped.startswith(SCORES) else LOSS
        return "early stopping" if self.stopper.should_stop else "last epoch"

    def state(self, epoch: int, step: int | None, seconds: float) -> dict:
        """The checkpoint's record after ``step`` steps of ``epoch`` (``step`` None: the epoch is done)
        that took ``seconds`` of training."""
        return {"epoch": epoch, "step": step,
                "next_epoch": epoch + 1 if step is None else epoch, "next_step": 0 if step is None else step,
                "global_step": self.global_step, "train_seconds_in_epoch": seconds,
                "early_stopping": self.stopper.state(), "best_valid": self.best_valid, "best_test": self.best_test,
                "epochs": self.epochs, "resumed_from": self.resumed_from}

    def load(self, state: dict, checkpoint: Path, epochs: int, restart_epoch: bool = False) -> None:
        """Go on from ``checkpoint``'s record, for a run of ``epochs`` epochs in all (fewer than it has
        trained already is an error: its results hold them all). ``restart_epoch``: it was saved by another
        number of processes, so steps done mid-epoch were of another sharding (and another steps-per-epoch);
        no rank can tell which of its own batches they covered, so that epoch starts again from its first
        step (its steps so far stay in the weights)."""
        if len(state["epochs"]) > epochs:
            raise ConfigError(f"--epochs {epochs}: {checkpoint.parent.parent} has trained {len(state['epochs'])} "
                              "epochs already; give at least that many (--epochs, or epochs in the config file; in a "
                              "sweep with --grid-index for this point alone: the others would go on too) to go on "
                              "with it, or another --run-name")
        chosen_by = state["early_stopping"].get("metric", UNSAID)
        if chosen_by != SELECTED_BY:  # its best value, best epoch and best weights are another metric's
            raise TrainingError(f"{checkpoint} chose its best epoch by valid {chosen_by!s:.40} and this code "
                                f"chooses by valid {SELECTED_BY} (iisan/metric_names.py): resume it where "
                                f"SELECTED_BY is {chosen_by!s:.40}, or give another --run-name to train again")
        check_patience(self.stopper.patience, state["epochs"], checkpoint.parent.parent)
        self.stopper.load(state["early_stopping"])
        self.best_valid, self.best_test, self.epochs = state["best_valid"], state["best_test"], state["epochs"]
        self.global_step, self.start_epoch, self.start_step = (state["global_step"], state["next_epoch"],
                                                               state["next_step"])
        self.partial_seconds = state["train_seconds_in_epoch"]
        self.resumed_from = state["resumed_from"] + [checkpoint.name]
        if restart_epoch and state["step"] is not None:
            log.warning("%s stopped after step %d of epoch %d with %d process(es): epoch %d starts again from "
                        "its first step", checkpoint, state["step"], state["epoch"], state["world_size"],
                        state["epoch"])
            self.start_step, self.partial_seconds = 0, 0.0

    def timing(self) -> dict:
        """Seconds per training epoch (the first of each attempt excluded when there are others: it pays
        warm-up costs, a resumed run's again; records without ``warm_up`` mark the first epoch alone), the
        first epoch's, and evaluation seconds per epoch (None before the first epoch ends)."""
        train = [e["train_seconds"] for e in self.epochs]
        if not train:
            return {"train_seconds_per_epoch": None, "first_epoch_train_seconds": None,
                    "eval_seconds_per_epoch": None}
        steady = [t for i, (t, e) in enumerate(zip(train, self.epochs)) if not e.get("warm_up", i == 0)]
        return {"train_seconds_per_epoch": float(np.mean(steady or train)),
                "first_epoch_train_seconds": train[0],
                "eval_seconds_per_epoch": float(np.mean([e["eval_seconds"] for e in self.epochs]))}
