"""The diagnosis of iisan's own live training step (``diagnose`` runs ``iisan_rows`` once per benchmark
label, each in a fresh process, so that no shape has been met before it starts):

- ``shapes``: per-step host and device seconds and allocator activity of the same model on batches
  whose shapes are fresh (an item count not met before), already seen, fixed (one batch repeated) and
  bucketed (static shapes; first pass, then seen): what first-use costs add and what buckets remove.
- ``enqueue``: on batches already on the device and already seen, the host's time to queue a step
  (no wait between steps) beside the device's step period: host-bound or device-bound.
- the batch pipeline alone (reading pixels, collating, copying), the encoders' forward alone, the step
  on device-resident batches, with the pipeline running in a background thread, and fed by the pipeline
  (what the benchmark times); the GPU's busy fraction and top kernels; the allocator inside a timed
  window; the dtypes of the Linear outputs; FLOPs per step.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..devices import sync
from ..model.recommender import IISANItemEncoder
from ..train.plan import shape_buckets
from .bench import TrainingSetup, training_setup
from .benchmark import base_config, method_config, prepare
from .flops import StepFlops
from .timing import (
    StepClock,
    allocator_activity,
    allocator_counts,
    gpu_profile,
    linear_output_dtypes,
    peak_gib,
    reset,
    summary,
    timed,
    timed_each,
)


def rows_of(batch) -> tuple[int, int | None]:
    """A batch's shape as its encoders meet it: its rows, and the rows of the towers that run by distinct
    item (``ItemBatch.distinct``; None when none does). Two batches with the same pair run the same shapes
    (their title columns aside)."""
    distinct = batch.items.distinct
    return len(batch.items.ids), None if distinct is None else len(distinct.ids)


def phase(setup: TrainingSetup, batches: list) -> dict:
    """Each batch's step timed alone (``timed_each``), with the allocator's activity over the phase."""
    before = allocator_counts(setup.device)
    queue = iter(batches)
    row = timed_each(lambda: setup.step(next(queue)), setup.device, len(batches))
    row["allocator"] = allocator_activity(before, allocator_counts(setup.device))
    shapes = [rows_of(b) for b in batches]
    row["rows"] = [rows for rows, _ in shapes]
    if any(by_item is not None for _, by_item in shapes):
        row["rows_by_item"] = [by_item for _, by_item in shapes]
    return row


def shape_phases(setup: TrainingSetup, reps: int) -> tuple[dict, dict]:
    """Fresh, seen, fixed and bucketed shapes, in that order, on the same users' batches: the i-th
    plain and the i-th bucketed batch of one epoch hold the same users. Fresh shapes are looked for over
    one epoch's full batches: up to ``reps`` of them; the second dict says how many were wanted and found
    (an epoch may hold fewer distinct item counts), and every phase has that many steps. A shape is fresh
    when its pair of row counts (``rows_of``) is: a batch whose slots repeat a count met before is still
    fresh to a tower that runs by distinct item when that count is new."""
    buckets = setup.buckets or shape_buckets(setup.cfg.replace(static_shapes=True), setup.model)
    per_epoch = max(1, len(setup.collate.sequences) // setup.cfg.batch_size)  # full batches (host_batches')
    pairs = itertools.islice(zip(setup.host_batches(buckets=None), setup.host_batches(buckets=buckets)), per_epoch)
    fixed, _ = next(pairs)
    seen_sizes, fresh, bucketed = {rows_of(fixed)}, [], []
    for plain, padded in pairs:  # batches whose item counts differ from each other and from the fixed one
        if (shape := rows_of(plain)) not in seen_sizes:
            seen_sizes.add(shape)
            fresh.append(plain.to(setup.device))
            bucketed.append(padded.to(setup.device))
        if len(fresh) == reps:
            break
    found = {"wanted": reps, "found": len(fresh), "batches_searched": per_epoch}
    fixed = fixed.to(setup.device)
    out = {"warmup_fixed": phase(setup, [fixed, fixed])}  # one-time costs: handles, first kernels
    if fresh:
        out["fresh"] = phase(setup, fresh)
        out["seen"] = phase(setup, fresh)
    out["fixed"] = phase(setup, [fixed] * (len(fresh) or reps))
    if fresh:
        out["bucketed_first"] = phase(setup, bucketed)
        out["bucketed_seen"] = phase(setup, bucketed)
    return out, found


def enqueue(setup: TrainingSetup, batches: list) -> dict:
    """The host's seconds to queue each step (the call returning, no wait in between) beside the device's
    step periods (``StepClock``), over batches already on the device, run once before (shapes seen)."""
    for batch in batches:
        setup.step(batch)
    clock, host = StepClock(setup.device), []
    sync(setup.device)
    clock.mark()
    for batch in batches:
        start = time.perf_counter()
        setup.step(batch)
        host.append(time.perf_counter() - start)
        clock.mark()
    return {"host_seconds": summary(host), "device_step_seconds": summary(clock.durations())}


def with_background_pipeline(setup: TrainingSetup, run, device: torch.device, warmup: int, reps: int) -> float:
    """``timed(run)`` while another thread keeps drawing batches from the pipeline (reading pixels,
    collating, copying): what the pipeline's host work costs a step that overlaps it."""
    stop = threading.Event()

    def consume():
        for _ in setup.full_batches():
            if stop.is_set():
                return

    thread = threading.Thread(target=consume, daemon=True, name="iisan-diagnose-pipeline")
    thread.start()
    try:
        return timed(run, device, warmup, reps)
    finally:
        stop.set()
        thread.join()


def iisan_rows(args, label: str) -> dict:
    """The benchmark's setup of ``label`` (``args``: ``options.DiagnosisOptions``), timed piece by piece."""
    work = Path(args.work)
    base = base_config(prepare(work, args.data, args.size), work, args.data, args.size, device=args.device,
                       num_workers=args.workers)
    setup = training_setup(method_config(base, label))
    device, model, amp = setup.device, setup.model, setup.amp
    row = {"label": label, "batch_size": setup.cfg.batch_size, "amp": str(amp), "compiled": setup.compiled,
           "static_shapes": setup.buckets is not None}
    row["shapes"], row["fresh_shapes"] = shape_phases(setup, args.shape_reps)
    stream = setup.full_batches()
    row["pipeline_seconds_per_batch"] = timed(lambda: next(stream), device, args.warmup, args.reps)
    batches = [next(stream) for _ in range(max(args.reps, args.warmup))]
    row["items_per_batch"] = float(np.mean([len(b.items.real) for b in batches]))
    shapes = [rows_of(b) for b in batches]
    row["rows_per_batch"] = float(np.mean([rows for rows, _ in shapes]))
    row["most_common_rows"] = Counter(rows for rows, _ in shapes).most_common(1)[0][0]
    if shapes[0][1] is not None:  # towers by distinct item (every batch of a setup, or none): their own rows
        row["towers_by_item"] = list(batches[0].items.per_item)
        row["rows_by_item_per_batch"] = float(np.mean([by_item for _, by_item in shapes]))
    row["title_columns"] = sorted({b.items.title_columns or setup.cfg.title_tokens for b in batches})
    on_device = itertools.cycle(batches)
    row["enqueue"] = enqueue(setup, batches)
    encoder = model.item_encoder
    forward_of = encoder.states if isinstance(encoder, IISANItemEncoder) else encoder  # IISAN: the frozen feed

    @torch.no_grad()
    def encode():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            forward_of(next(on_device).items)

    row["encoder_forward_seconds"] = timed(encode, device, args.warmup, args.reps)
    row["linear_output_dtypes"] = linear_output_dtypes(model, lambda: setup.step(batches[0]))
    flops = StepFlops(setup)  # once per batch shape (device batches: ``to`` leaves them where they are)
    row["flops_per_step"] = float(np.mean([flops(b) for b in batches]))
    reset(device)
    before = allocator_counts(device)
    row["step_on_device_seconds"] = timed(lambda: setup.step(next(on_device)), device, args.warmup, args.reps)
    row["allocator_step_on_device"] = allocator_activity(before, allocator_counts(device))
    row["step_on_device_tflops_per_second"] = row["flops_per_step"] / row["step_on_device_seconds"] / 1e12
    row["step_on_device_with_background_pipeline_seconds"] = with_background_pipeline(
        setup, lambda: setup.step(next(on_device)), device, args.warmup, args.reps)
    before = allocator_counts(device)
    row["step_with_pipeline_seconds"] = timed(lambda: setup.step(next(stream)), device, args.warmup, args.reps)
    row["allocator_step_with_pipeline"] = allocator_activity(before, allocator_counts(device))
    row["profile_step_with_pipeline"] = gpu_profile(lambda: setup.step(next(stream)), device)
    row["profile_step_on_device"] = gpu_profile(lambda: setup.step(next(on_device)), device)
    row["profile_encoder_forward"] = gpu_profile(encode, device)
    row["peak_allocated_gib"] = peak_gib(device)
    row["steps_per_epoch"] = math.ceil(setup.data.num_users / setup.cfg.batch_size)
    row["epoch_seconds"] = row["step_with_pipeline_seconds"] * row["steps_per_epoch"]
    return row

