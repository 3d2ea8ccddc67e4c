"""A run's checkpoints, seen from the run (``Run.checkpoints``): which one it resumes from, restoring it,
and writing one at the end of each epoch or on a stop request.

Rank 0 chooses and writes; every rank restores, and adds its RNG streams and partial-epoch losses to what
rank 0 writes. What a checkpoint holds and how it is verified is ``checkpoint``; the RNG, optimiser and
scaler parts are ``runstate``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import weakref
from pathlib import Path

import torch

from ..console import Bar
from ..devices import device_name, sync
from ..distributed import broadcast_text, gather_same
from ..errors import ConfigError, TrainingError, UserError
from ..files import shown_bytes
from . import checkpoint, runstate
from .checkpoint import CHECKPOINTS
from .checkpoint_writing import prune_finished, write_checkpoint
from .interrupt import EvaluationStopped
from .runfolder import BEST, best_weights_problem, refuse_to_overwrite
from .weights import copy_weights, ensure_best_weights, trainable_state

log = logging.getLogger(__name__)


class RunCheckpoints:
    """The checkpoints of ``run`` (a ``trainer.Run``), under ``<run folder>/checkpoints``."""

    def __init__(self, run):
        self.run = weakref.proxy(run)  # the run holds this: no cycle to keep a finished run's model alive
        self.root = run.run_dir / CHECKPOINTS
        self.last_written = ""  # the name of the checkpoint this process wrote last

    def choose(self) -> checkpoint.Checkpoint | None:
        """The newest checkpoint this run can resume from, or None for a fresh run (one that may start).
        Rank 0 decides (``decisions.decide``)."""
        cfg = self.run.cfg
        found, refused = checkpoint.latest(self.root, cfg.to_dict())
        if found is not None:
            refuse_lost_best_weights(self.run.run_dir, found)
        elif refused:
            raise TrainingError(checkpoint.cannot_resume(refused))
        elif cfg.resume:
            raise ConfigError(f"--resume: no checkpoint in {self.root}")
        else:
            refuse_to_overwrite(self.run.run_dir, cfg)
        self.run.record.say_unended_attempt(resumes=found is not None)
        return found

    def restore(self, found: checkpoint.Checkpoint) -> dict:
        """Weights, optimiser, RNG streams and progress from ``found``; returns the gradient scaler's state,
        which the step (built after this) takes."""
        run, state = self.run, found.state
        dist, progress = run.dist, run.progress
        copy_weights(run.model, found.model, found.path / checkpoint.MODEL)
        runstate.optimizer_from_files(run.optimizer, state["optimizer"], found.train_state)
        exact = runstate.restore_rng(state["rng"], found.train_state, dist, run.device, run.cfg.seed)
        if not exact or state["world_size"] != dist.world_size:
            log.warning("%s was saved by %d process(es) on %s; resuming with %d: the run goes on, but will "
                        "not match an uninterrupted run bit for bit", found.path, state["world_size"],
                        state["device"], dist.world_size)
        progress.load(state, found.path, run.cfg.epochs, state["world_size"] != dist.world_size)
        run.record.resumed_under(state)
        run.partial_losses = found.train_state.get(f"partial_losses.{dist.rank}") if progress.start_step else None
        log.info("resuming from %s: epoch %d, step %d", found.path, progress.start_epoch, progress.start_step)
        if dist.is_main and progress.stopper.best_epoch == state["epoch"] and state["step"] is None:
            ensure_best_weights(run.model, run.run_dir / "best.safetensors", run.cfg, progress.stopper.best_epoch,
                                progress.best_valid)
        return state["grad_scaler"]

    @contextlib.contextmanager
    def saved_if_stopped(self, epoch: int, n_steps: int, losses: torch.Tensor, seconds: float):
        """An epoch's evaluation, which a signal stops at once in a single process (``interrupt``): the epoch's
        steps are then saved as a checkpoint after its last step, from which a resume evaluates them. Under
        torchrun the ranks agree on a stop at steps alone (the evaluation finishes first)."""
        run = self.run
        if run.dist.enabled:
            yield
            return
        try:
            with run.stop.raising(EvaluationStopped):
                yield
        except EvaluationStopped:
            path = self.save(epoch, n_steps, losses.cpu(), seconds)
            raise run.interrupted(f"during the evaluation of epoch {epoch}, after its {n_steps} steps", path) from None

    def save(self, epoch: int, step: int | None = None, losses: torch.Tensor | None = None,
             seconds: float = 0.0) -> Path:
        """Collective: every rank adds its RNG streams (and partial-epoch losses); rank 0 writes, and a
        failed write is every rank's error."""
        run = self.run
        name = checkpoint.checkpoint_name(epoch, step)
        if name == self.last_written:  # a stop request at a step --checkpoint-every has just saved (or during it)
            return self.root / name
        rng, tensors = runstate.capture_rng(run.dist, run.device)
        if losses is not None:
            for rank, part in enumerate(gather_same(losses, run.dist)):
                tensors[f"partial_losses.{rank}"] = part
        error = ""
        if run.dist.is_main:
            optimizer, optimizer_tensors = runstate.optimizer_to_files(run.optimizer)
            record = run.record
            state = {
                "format": checkpoint.FORMAT, **run.progress.state(epoch, step, seconds),
                "rng": rng, "optimizer": optimizer,
                "grad_scaler": runstate.scaler_state(run.step.scaler), "world_size": run.dist.world_size,
                "device": device_name(run.device), "config": run.cfg.to_dict(), "versions": record.versions,
                "saved_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commits": record.commits,
                "world_sizes": record.world_sizes, "devices": record.devices, **record.memory.report(),
                "working_dir": os.getcwd(),  # what the config's relative data paths are relative to
                "data_content": record.data_content(),  # and what the data held, wherever it is on a resume
            }
            try:
                write_checkpoint(self.root, name, trainable_state(run.model),
                                 {**tensors, **optimizer_tensors}, state, self.kept_while_training)
            except UserError as err:
                error = str(err)
        error = broadcast_text(error, run.dist)
        if error:
            raise TrainingError(error)
        self.last_written = name
        return self.root / name

    def due(self, steps: int, n_steps: int) -> bool:
        """--checkpoint-every N: a checkpoint after these ``steps`` of an epoch of ``n_steps`` (its last step's
        is the epoch's own)."""
        every = self.run.cfg.checkpoint_every
        return every > 0 and steps % every == 0 and steps < n_steps

    def save_within(self, epoch: int, step: int, losses: torch.Tensor, offset: float, bar: Bar) -> float:
        """--checkpoint-every's checkpoint after ``step`` steps of ``epoch``, whose training time is the clock's
        reading plus ``offset``. Returns the seconds it took (the device synchronised first), which the epoch's
        progress ``bar`` leaves out of its speed too (``console.Bar.pause``)."""
        sync(self.run.device)
        began = time.perf_counter()
        self.save(epoch, step, losses.cpu(), began + offset)
        took = time.perf_counter() - began
        bar.pause(took)
        return took

    @property
    def kept_while_training(self) -> int:
        """--keep-checkpoints, but one for 0 (none once finished: ``finished``)."""
        return max(self.run.cfg.keep_checkpoints, 1)

    def check_space(self, trainable: int) -> None:
        """Warn at the start when the disk holding the run's folder has less free space than the checkpoints still
        to be kept there (12 bytes a trainable parameter: fp32 weights and Adam's two moments) and the best
        weights: a full disk stops the run at an epoch's end, hours into it on a GPU (its last checkpoint intact)."""
        each = 12 * trainable
        need = each * max(1, self.kept_while_training + 1 - len(checkpoint.checkpoints(self.root)))
        need += 0 if (self.run.run_dir / BEST).is_file() else 4 * trainable
        if need > (free := shutil.disk_usage(self.run.run_dir).free):
            log.warning("the disk holding %s has %s free; this run's checkpoints need about %s more (%s each, "
                        "--keep-checkpoints %d, and best.safetensors): free some space, or a full disk stops the "
                        "run at an epoch's end", self.run.run_dir, shown_bytes(free), shown_bytes(need),
                        shown_bytes(each), self.run.cfg.keep_checkpoints)

    def finished(self) -> None:
        """Once results.json says finished: the checkpoints pruned as the last write prunes them, and with
        --keep-checkpoints 0 all of them (``checkpoint_writing.prune_finished``)."""
        if self.run.dist.is_main:
            prune_finished(self.root, self.run.cfg.keep_checkpoints, self.run.cfg.to_dict())

    def existing(self) -> bool:
        return bool(checkpoint.checkpoints(self.root))

    def last_good(self) -> str:
        """The newest complete checkpoint, for messages: where a failed run can be taken up again."""
        done = [p for p in checkpoint.checkpoints(self.root) if (p / checkpoint.MANIFEST).is_file()]
        return str(done[0]) if done else "none yet"


def refuse_lost_best_weights(folder: Path, found: checkpoint.Checkpoint) -> None:
    """A resume from ``found``, a checkpoint that is not the run's best epoch, needs the best weights on
    disk (``runfolder.best_weights_problem``): nothing would write them again, and the run would end
    naming a best epoch whose weights are gone (and prune the checkpoint that still holds them)."""
    state = found.state
    best = state["early_stopping"]["best_epoch"]
    if best < 0 or (state["step"] is None and state["epoch"] == best):
        return  # no best epoch yet, or ``ensure_best_weights`` writes them from this checkpoint
    if (why := best_weights_problem(folder)) is None:
        return
    problem, remedy = why
    raise TrainingError(f"{problem}, and {found.path}, which the run would resume from, is not its best epoch "
                        f"({best}), so nothing would write them again: "
                        f"{checkpoint.move_newer_out(folder / CHECKPOINTS, best)}{remedy}restore {BEST} from a copy, "
                        "or use another --run-name to train again")
