"""One trainer for every method and both feeds: ``train(cfg)`` runs a ``Run``, fresh or resumed, to its results.

Per epoch: training steps (timed alone, device synchronised, their memory peak apart; a checkpoint every N of them
with --checkpoint-every N), validation over every user (and the test split when validation HR@10 improves), a
checkpoint, then, when it improved, the best weights (``best.safetensors``): a kill between the two is repaired on
resume. The run's folder (``runfolder``) also holds what people read while it runs: train.log, metrics.jsonl and
results.json with its status (``records``). Training stops once HR@10 has not improved for more than ``patience``
epochs (authors: ``count > 10``). Everything an uninterrupted run carries from epoch to epoch is in the checkpoint
(weights, optimiser, scaler, RNG streams, early stopping, best metrics, the epoch history), so a resumed run
computes the same numbers as one that was never stopped. Under torchrun every rank runs the loop on its shard of
users; only rank 0 writes files and logs below warnings."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..config import Config
from ..console import progress_bar
from ..data.batches import TrainBatch, TrainBatches, epoch_batches
from ..data.epochs import epoch_order, steps_per_epoch
from ..data.run_data import check_trainable, describe_data, load_data
from ..devices import device_name, out_of_memory, sync
from ..digests import known_fingerprint
from ..distributed import Dist, any_rank, mean_over_ranks
from ..errors import ConfigError, InUse, RunInterrupted, RunInUse, TrainingError, UserError
from ..evaluate import evaluate_model, shared_item_table
from ..files import write_json_atomic
from ..methods import METHOD_NAMES, side_network
from ..metric_names import SELECTED_BY
from ..model.build import check_run_inputs, count_parameters, run_parameter_line
from . import checkpoint, runfolder, runnames, runstate
from .decisions import decide, everywhere
from .interrupt import StopRequests
from .nonfinite import after_nonfinite, batch_states, ends_training, nonfinite_loss, nonfinite_scores
from .optim import trained_by_rate
from .parts import build_training
from .plan import cache_precision, describe_step
from .progress import EarlyStopping, Progress
from .records import ParameterCount, RunRecord, epoch_line
from .resuming import RunCheckpoints
from .runfolder import RESULTS, agreed_results, log_summary, reusable_results
from .same_inputs import cache_record, encoder_record, refuse_other_data_on_ranks
from .step import as_in_a_fresh_process, deterministic_kernels, make_train_step, out_of_memory_message
from .weights import save_weights

log = logging.getLogger(__name__)

STOP_POLL_STEPS = 10  # under torchrun, ranks agree on a stop request every this many steps (one all-reduce)
# the losses so far are looked at every this many steps (one wait on the device): one that ends training
FINITE_POLL_STEPS = 10  # (``nonfinite.ends_training``) ends the epoch there, near the step, as the authors' check


class Run:
    def __init__(self, cfg: Config, dist: Dist, device: torch.device, stop: StopRequests):
        self.cfg, self.dist, self.device, self.stop = cfg, dist, device, stop
        self.lock = None  # rank 0 locks the run folder (``runfolder.lock_run_folder``) until ``close``
        self.record: RunRecord | None = None  # train.log, metrics.jsonl, results.json (``records``)
        self.started = False  # set up: data, model, the checkpoint it resumes from
        self.clock = time.perf_counter()  # this attempt's wall time, said as it ends
        self.finished_before: dict | None = None  # finished by another process while this one waited
        self.log_level = logging.getLogger("iisan").level  # put back by ``close`` (other ranks speak less)
        try:
            self.setup()
        except BaseException as err:
            self.fail(err)
            self.close()
            raise

    def fail(self, err: BaseException) -> None:
        """results.json says how the run ended (failed or interrupted) and why; so does train.log."""
        if self.record is not None:  # None: the folder was never ours (e.g. in use by another process)
            self.record.ended(self.progress, err, started=self.started)

    def close(self) -> None:
        if self.record is not None:
            self.record.close()
        logging.getLogger("iisan").setLevel(self.log_level)
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        step = getattr(self, "step", None)  # (set only when setup got that far)
        if getattr(step, "compiled", None) is not None:
            step.compiled = None  # a torch.compile'd step refers to itself: let the model and optimizer go now
        if getattr(self, "pixels", None) is not None:  # its reader threads end now, not when a traceback goes
            self.pixels.close()
        # Let the DDP wrapper go before the process group is left (``distributed.teardown``): a wrapper alive
        # then destroys the group later, in its destructor, which holds the GIL while gloo's threads wait for it.
        self.step = self.ddp = self.model = self.optimizer = None

    def setup(self) -> None:
        cfg, dist, device = self.cfg, self.dist, self.device
        if not dist.is_main:
            logging.getLogger("iisan").setLevel(logging.WARNING)
        self.progress = Progress(EarlyStopping(cfg.patience))
        self.partial_losses: torch.Tensor | None = None  # losses of the steps already done in the epoch
        refuse_other_data_on_ranks(cfg, dist)  # (collective) rank 0's copy of the data names the run folder:
        self.run_dir = Path(decide(lambda: runnames.run_dir(cfg), dist, str)[1])  # a rank's may be elsewhere
        self.checkpoints = RunCheckpoints(self)  # choosing, restoring, writing (``resuming``)
        # a run that trained in its folder before goes on under the names it had (``log_unchecked_encoder``)
        trained = (self.run_dir / "config.json").is_file()
        everywhere(lambda: check_run_inputs(cfg, trained), dist)  # a missing file: an error before a run folder
        if cfg.resume and not self.checkpoints.existing():  # nor is a folder made to resume nothing
            raise ConfigError(f"--resume: no checkpoint in {self.checkpoints.root}")
        decide(self.lock_folder, dist)
        # another process may have finished this very run between ``train``'s look and this lock
        if (done := agreed_results(cfg, dist, again=True, folder=self.run_dir)) is not None:
            self.finished_before = done
            return
        self.record = RunRecord(cfg, self.run_dir, device, dist.world_size, dist.is_main)
        self.record.start_log()
        # Rank 0 verifies the checkpoints; every rank then reads the one it chose (shared filesystem). Before
        # the data and the model: a checkpoint of another config is refused before minutes of loading.
        found, chosen = decide(self.checkpoints.choose, dist, lambda found: "" if found is None else str(found.path))
        data = self.data = load_data(cfg)
        check_trainable(data, cfg)
        self.record.items_fingerprint, self.record.kept_items = data.catalog.fingerprint, data.kept_items
        self.record.users_fingerprint, self.record.cache = known_fingerprint(cfg.users), cache_record(cfg)
        self.record.encoders = encoder_record(cfg) if dist.is_main else {}  # rank 0 writes results.json
        log.info("%s", describe_data(data, cfg))
        parts = build_training(cfg, data, device, dist.world_size, built=lambda model: log.info(
            "%s: %s", METHOD_NAMES[cfg.method], run_parameter_line(cfg, model)), trained=trained)
        self.model, self.pixels, self.optimizer = parts.model, parts.pixels, parts.optimizer
        self.collate = parts.collate  # the batch layout of every epoch
        self.plan = parts.plan  # precision, compiled or not, the batch layout
        self.record.parameters = ParameterCount(*count_parameters(self.model), trained_by_rate(self.optimizer))
        scaler_state = None
        if chosen:
            with checkpoint.restoring(chosen):  # intact, but maybe not what this version can restore
                scaler_state = self.checkpoints.restore(found if dist.is_main else checkpoint.read(Path(chosen)))
        elif dist.rank > 0:
            torch.manual_seed(cfg.seed + dist.rank)  # each rank its own dropout masks
        del found  # its tensors are now in the model and the optimiser
        # find_unused_parameters for the baselines alone (the authors set it for BitFit): IISAN uses all (tested)
        self.ddp = distributed.wrap(self.model, dist, device, find_unused=not side_network(cfg.method))
        self.step = make_train_step(self.ddp, self.optimizer, self.plan.amp, device, self.plan.compiled)
        runstate.restore_scaler(self.step.scaler, scaler_state)
        self.record.step = describe_step(self.step, self.model, self.plan)
        self.on_main(self.first_files)
        self.started = self.stop.armed = True  # from here a signal is honoured at a step's end, with a checkpoint
        log.info("run folder %s (device %s, amp %s, compiled %s%s%s)", self.run_dir, device_name(device),
                 self.record.step["amp"], self.record.step["compiled"], cache_precision(self.record.step),
                 f", {dist.world_size} processes, batch {cfg.batch_size} per process" if dist.enabled else "")
        if self.plan.compiled == "inductor":  # else the first step and an epoch's last say nothing for minutes
            log.info("torch.compile compiles the step for each new batch shape (the first, an epoch's smaller last "
                     "batch): a minute or more each, once per run")

    def lock_folder(self) -> None:  # rank 0 decides for everyone (``decisions.decide``)
        try:
            self.lock = runfolder.lock_run_folder(self.run_dir)
        except InUse as err:
            raise RunInUse(str(err)) from None
        except UserError as err:  # not a run folder, or not writable
            raise TrainingError(str(err)) from None

    def on_main(self, write: Callable[..., object], *args) -> None:
        """A write rank 0 alone does (config.json, metrics.jsonl, results.json, best weights): under torchrun its
        failure (a full disk) is every rank's error in the same words (``decisions.decide``), not a lost peer."""
        decide(lambda: write(*args), self.dist)

    def first_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints.check_space(self.record.parameters.trainable)
        write_json_atomic(self.run_dir / "config.json", self.cfg.to_dict())
        self.record.start_metrics(self.progress.epochs)

    def interrupted(self, where: str, path: Path) -> RunInterrupted:
        named = "" if self.cfg.run_name else \
            f" (--run-name {self.run_dir.name} names that folder from another command)"  # (unless it did)
        return RunInterrupted(f"{self.stop.signal or 'stop request'} {where}; checkpoint saved in {path}",
                              f"To resume, run the same command again; it goes on in {self.run_dir.name}{named}",
                              self.stop.signal or "SIGINT")

    # ------------------------------------------------------------------------------------------ the loop
    def stop_now(self, step: int, n_steps: int) -> bool:
        if step + 1 >= n_steps:
            return False  # the epoch is done; the end-of-epoch checkpoint follows
        if not self.dist.enabled:
            return self.stop.requested
        return (step + 1) % STOP_POLL_STEPS == 0 and any_rank(self.stop.requested, self.dist)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's users of ``epoch``, in the order its steps take them."""
        dist = self.dist
        return epoch_order(len(self.collate.sequences), self.cfg.order_seed, epoch, dist.rank, dist.world_size)

    def check_finite(self, losses: torch.Tensor, epoch: int, n_steps: int) -> str:
        """'' when training goes on after these losses, else why it ends (``nonfinite.after_nonfinite``)."""
        def host_batch(step: int) -> TrainBatch:  # the step's batch, rebuilt as the loop collated it
            users = TrainBatches(self.order(epoch), self.cfg.batch_size, self.collate, step).user_batches()[0]
            return self.collate(users)

        def states(step: int) -> list[str]:
            cache_dir = self.cfg.cache_dir if self.cfg.cached else None
            return batch_states(self.model, lambda: host_batch(step), self.device, self.data.item_ids, cache_dir)

        problem = nonfinite_loss(losses, epoch, self.progress.global_step, n_steps, self.optimizer, self.model,
                                 states, self.run_dir, self.checkpoints.last_good, self.plan.amp)
        nan = bool(torch.isnan(losses).any())
        return after_nonfinite(problem, nan, self.cfg.nonfinite, self.progress.stopper.best_epoch) if problem else ""

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, float, int]:
        cfg, dist, device, progress = self.cfg, self.dist, self.device, self.progress
        start_step, progress.start_step = (progress.start_step, 0) if epoch == progress.start_epoch else (0, 0)
        n_steps = steps_per_epoch(len(self.collate.sequences), cfg.batch_size, dist.world_size,
                                  padded=cfg.order_seed is None)
        n_steps = min(n_steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n_steps
        if epoch == progress.start_epoch:  # the first epoch this process steps in (``run``'s warm_up): the next
            self.warm_epoch = epoch + (start_step >= n_steps)  # when resumed after every step (stopped evaluating)
        losses = torch.zeros(n_steps, device=device)
        seconds = progress.partial_seconds if start_step else 0.0
        if start_step:
            losses[:start_step] = self.partial_losses.to(device)
        self.ddp.train()
        loader = epoch_batches(self.order(epoch), cfg.batch_size, self.collate, start_step)
        sync(device)
        start = time.perf_counter()
        bar = progress_bar(loader, n_steps, start_step, f"epoch {epoch}", "steps", cfg.progress and dist.is_main,
                           status=lambda done: f"loss {losses[:done].mean().item():.4f}")  # this rank's steps
        done = n_steps  # fewer when a loss ends training within the epoch
        for i, batch in enumerate(bar, start=start_step):
            if i >= n_steps:
                break
            try:
                losses[i] = self.step(batch.to(device))
            except RuntimeError as err:  # torch.OutOfMemoryError is one, and so is MPS's saying the same
                if not out_of_memory(err):
                    raise
                raise TrainingError(out_of_memory_message(err, cfg.batch_size, device)) from None
            due = self.checkpoints.due(i + 1, n_steps)  # --checkpoint-every (not of losses that end training)
            if ((i + 1) % FINITE_POLL_STEPS == 0 or due) and i + 1 < n_steps and \
                    any_rank(ends_training(losses[: i + 1], cfg.nonfinite), dist):
                bar.close()
                done = i + 1
                break
            if due:  # (the time it takes to write is no training time, nor in the bar's speed)
                start += self.checkpoints.save_within(epoch, i + 1, losses[: i + 1], seconds - start, bar)
            if self.stop_now(i, n_steps):  # (saved just now when due: the request may have come while it was)
                bar.close()
                self.check_finite(mean_over_ranks(losses[: i + 1], dist).cpu(), epoch, n_steps)
                path = self.checkpoints.save(epoch, i + 1, losses[: i + 1].cpu(), seconds + time.perf_counter() - start)
                raise self.interrupted(f"during epoch {epoch} after step {i + 1} of {n_steps}", path)
        sync(device)
        seconds += time.perf_counter() - start
        return mean_over_ranks(losses[:done], dist).cpu(), seconds, n_steps

    def run(self) -> dict:
        cfg, progress, stopper = self.cfg, self.progress, self.progress.stopper
        for epoch in range(progress.start_epoch, cfg.epochs):
            # every finished epoch on disk while the next one trains (the end writes "finished")
            self.on_main(self.record.write, self.record.results(progress, "running"))
            if stopper.should_stop:  # a resumed run that had already stopped early
                break
            self.record.memory.enter("training")  # memory peaks by phase (``memory.PHASES``)
            losses, train_seconds, n_steps = self.train_epoch(epoch)
            self.record.step = describe_step(self.step, self.model, self.plan)
            progress.stopped = self.check_finite(losses, epoch, n_steps)
            if progress.stopped:
                break
            self.record.memory.enter("evaluation")  # (the validation, and the test when it improves)
            start = time.perf_counter()
            with self.checkpoints.saved_if_stopped(epoch, n_steps, losses, train_seconds):  # (a signal ends it)
                table = shared_item_table(self.model, self.data.num_items, cfg, self.pixels, self.device, self.dist)
                valid = evaluate_model(self.model, self.data, "valid", cfg, self.device, table=table, dist=self.dist)
                test = evaluate_model(self.model, self.data, "test", cfg, self.device, table=table,
                                      dist=self.dist) if stopper.improves(valid[SELECTED_BY]) else None
            progress.global_step += n_steps
            if problem := nonfinite_scores(valid, epoch, self.model, self.run_dir, self.checkpoints.last_good,
                                           self.plan.amp):
                # as a NaN loss: --nonfinite fail stops the run, authors ends training at the best epoch so far
                progress.stopped = after_nonfinite(problem, True, cfg.nonfinite, stopper.best_epoch)
                break
            if improved := stopper.update(epoch, valid[SELECTED_BY]):
                progress.best_valid, progress.best_test = valid, test
            eval_seconds = time.perf_counter() - start
            self.record.memory.enter("")
            record = {"epoch": epoch, "loss": float(losses.mean()), "train_seconds": train_seconds,
                      "eval_seconds": eval_seconds, "steps": n_steps, "valid": valid,
                      "ended_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                      "warm_up": epoch == self.warm_epoch}  # this process's first steps: they paid warm-up costs
            if improved:
                record["test"] = progress.best_test
            progress.epochs.append(record)
            self.on_main(self.record.epoch, record)  # on disk before the epoch is reported
            log.info("%s", epoch_line(record, stopper.bad_epochs))
            # The checkpoint first, then the best weights: a kill in between is repaired on resume.
            path = self.checkpoints.save(epoch)
            if improved:
                self.on_main(save_weights, self.model, self.run_dir / "best.safetensors", cfg,
                             {"epoch": epoch, "valid": valid})
            if stopper.should_stop:
                log.info("early stop: valid %s has not improved for %d epoch(s)", SELECTED_BY, stopper.bad_epochs)
                break
            if epoch + 1 < cfg.epochs and any_rank(self.stop.requested, self.dist):
                raise self.interrupted(f"after epoch {epoch}", path)
        return self.results()

    def results(self) -> dict:
        results = self.record.results(self.progress, "finished")
        self.on_main(self.record.write, results)
        self.checkpoints.finished()  # (--keep-checkpoints 0: none kept, now that results.json says finished)
        log.info("finished (%s) after %d epoch(s); this attempt took %.0f s", results["ended"],
                 len(results["epochs"]), time.perf_counter() - self.clock)
        log_summary(results, self.run_dir / RESULTS)
        return results


def train(cfg: Config, reuse: bool = True) -> dict:
    """Train, validate every epoch, test at the best-validation epoch. Returns the results dict.

    Checkpoints every epoch and resumes from the run folder's newest intact one (``checkpoint.py``);
    Ctrl-C saves and raises ``RunInterrupted``. Under torchrun: data-parallel (``distributed.py``). A run
    folder whose run finished with this very config is not trained again: its results are returned
    (``reuse`` False: the caller has just asked ``reusable_results`` itself; under torchrun, rank 0 for all:
    ``agreed_results``). Python's, NumPy's and torch's global random streams are seeded with ``cfg.seed`` while it
    runs and the caller's put back after it; the ``iisan`` logger logs at INFO while it runs."""
    if reuse and not distributed.launched() and (done := reusable_results(cfg)) is not None:
        return done
    dist, device, created = distributed.setup(cfg.device)
    try:
        if reuse and dist.enabled and (done := agreed_results(cfg, dist)) is not None:
            return done
        with (deterministic_kernels(cfg.deterministic), as_in_a_fresh_process(cfg.seed),
              StopRequests(escalate=not dist.enabled, armed=False) as stop):
            run = Run(cfg, dist, device, stop)
            try:
                results = run.finished_before or run.run()
                if not run.finished_before and stop.requested:  # in train.log too, before it is closed
                    log.warning("%s during the last epoch: the run finished all the same", stop.signal)
            except BaseException as err:
                run.fail(err)
                raise
            finally:
                run.close()
        # a signal during the last epoch: the run finished, and the caller stops (a sweep before its next point)
        if not run.finished_before and any_rank(stop.requested, dist):
            raise RunInterrupted(f"{stop.signal or 'stop request'} during the last epoch, which ended the run: it "
                                 f"is finished ({run.run_dir / RESULTS})", "", stop.signal or "SIGINT", results)
        return results
    finally:
        if created:
            error = sys.exc_info()[1]  # the failure in flight, if any
            distributed.teardown(finished=error is None, error=error)
