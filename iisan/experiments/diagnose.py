"""Where a live-backbone training step spends its time on this device: plain measurements beside iisan's.

Sections, each timed after warm-up with device synchronisation, each written to --out as it finishes:

- ``device``: versions, attention back ends and a bf16 GEMM's throughput (calibrates the card).
- Each timed row also records its model FLOPs (matmuls, convolutions, attention; ``count_flops``) and
  the TFLOP/s it sustained: set beside the GEMM's throughput, it says how well a step uses the card.
- ``plain``: a deliberately plain implementation of the reference settings (docs/performance.md) on this card, from
  transformers models built from their default configs and inputs already on the device (no data
  pipeline, no iisan code): the FFT step, the frozen forward of the uncached step and the cache
  build's forward, each at several item counts; then variants of the frozen forward (bf16 weights,
  eager attention, hidden states returned, cuDNN autotuning) and the ViT patch embedding alone.
- ``iisan``: the benchmark's own FFT and uncached IISAN setups (``bench.training_setup``), split
  into the batch pipeline alone, the item encoder's forward alone, the step on batches already on the
  device, and the step fed by the pipeline (what the benchmark times).

Comparing ``plain`` with ``iisan`` at the same item count says whether a gap to the reference comes
from the card and library versions, from iisan's encoder wrappers, or from its input pipeline.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import write_json_atomic
from ..provenance import provenance
from .bench import error_line, training_setup
from .efficiency import base_config, method_config, prepare
from .flops import step_flops
from .plain_reference import plain_fft_step, plain_frozen_forward, plain_patch_embedding
from .timing import gpu_profile, linear_output_dtypes, peak_gib, reset, timed

log = logging.getLogger(__name__)

SCIENTIFIC_USERS, SCIENTIFIC_ITEMS = 12076, 20314


@dataclass
class DiagnosisOptions:
    """What to run. Item counts: distinct non-padding items per batch on the benchmark's Scientific-shaped
    data are 139 of the 352 slots of 32 users and 276 of the 704 slots of 64 users (mean over epoch 0,
    docs/performance.md); 352 is the reference figures' 'about half'. The first frozen count also runs the variants."""

    out: Path
    size: str = "base"
    data: str = "scientific"
    device: str = "auto"
    fft_items: list[int] = field(default_factory=lambda: [352, 139])
    frozen_items: list[int] = field(default_factory=lambda: [352, 704, 276])
    cache_batch: int = 512
    iisan: list[str] = field(default_factory=lambda: ["FFT", "IISAN (uncached)"])
    skip_plain: bool = False
    warmup: int = 3
    reps: int = 10
    workers: int = 8
    work: Path = Path("/tmp/iisan-bench")


# --------------------------------------------------------------------------------------------------
# device


def device_facts(device: torch.device) -> dict:
    facts = {**provenance(device), "torch_threads": torch.get_num_threads()}
    if device.type != "cuda":
        return facts
    facts.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 cudnn_benchmark=torch.backends.cudnn.benchmark,
                 sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                       "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                       "math": torch.backends.cuda.math_sdp_enabled()},
                 capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = timed(lambda: a @ b, device, 3, 20)
    facts["bf16_gemm_tflops"] = 2 * n**3 / seconds / 1e12
    return facts


# --------------------------------------------------------------------------------------------------
# plain reference


def plain_section(args: DiagnosisOptions, device: torch.device, amp, report: dict) -> None:
    section = report.setdefault("plain", {})
    epoch = {"fft": math.ceil(SCIENTIFIC_USERS / 32), "frozen": math.ceil(SCIENTIFIC_USERS / 64),
             "cache": math.ceil(SCIENTIFIC_ITEMS / args.cache_batch)}
    section["steps_per_epoch"] = epoch

    def record(name: str, fn, scale: int, *fn_args, **kwargs) -> None:
        try:
            row = fn(args.size, *fn_args, device, amp, args.warmup, args.reps, **kwargs)
            if "seconds_per_step" in row:
                row["epoch_seconds"] = row["seconds_per_step"] * scale
        except Exception as err:  # an OOM or a missing kernel is a finding, not a crash of the whole run
            row = {"error": error_line(err)}
        section.setdefault(name, []).append(row)
        log.info("plain %s: %s", name, row)
        write_json_atomic(args.out, report)
        reset(device)

    for n in args.fft_items:
        record("fft_step", plain_fft_step, epoch["fft"], n)
    for n in args.frozen_items:
        record("frozen_forward", plain_frozen_forward, epoch["frozen"], n)
    record("cache_build_forward", plain_frozen_forward, epoch["cache"], args.cache_batch, hidden_states=True)
    n = args.frozen_items[0]
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, weights=torch.bfloat16)
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, attn="eager")
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, hidden_states=True)
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, cudnn_benchmark=True)
    record("patch_embedding", plain_patch_embedding, 1, n)


# --------------------------------------------------------------------------------------------------
# iisan's own setups


def iisan_rows(args: DiagnosisOptions, label: str) -> dict:
    """The benchmark's setup of ``label``, timed piece by piece."""
    work = Path(args.work)
    base = base_config(prepare(work, args.data, args.size), work, args.data, args.size, device=args.device,
                       num_workers=args.workers)
    setup = training_setup(method_config(base, label))
    device, model, amp = setup.device, setup.model, setup.amp
    stream = setup.full_batches()
    row = {"label": label, "batch_size": setup.cfg.batch_size, "amp": str(amp), "compiled": setup.compiled}

    row["pipeline_seconds_per_batch"] = timed(lambda: next(stream), device, args.warmup, args.reps)
    batches = [next(stream) for _ in range(max(args.reps, args.warmup))]
    row["items_per_batch"] = sum(len(b.items.ids) for b in batches) / len(batches)
    encoder = model.item_encoder
    forward_of = encoder.states if hasattr(encoder, "states") else encoder  # IISAN: the frozen feed alone
    on_device = itertools.cycle(batches)

    @torch.no_grad()
    def encode():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            forward_of(next(on_device).items)

    row["encoder_forward_seconds"] = timed(encode, device, args.warmup, args.reps)
    row["linear_output_dtypes"] = linear_output_dtypes(model, lambda: setup.step(batches[0]))
    # the mean over the batches the on-device step cycles through: its exact work per step
    row["flops_per_step"] = sum(step_flops(setup, b) for b in batches) / len(batches)
    reset(device)
    row["step_on_device_seconds"] = timed(lambda: setup.step(next(on_device)), device, args.warmup, args.reps)
    row["step_on_device_tflops_per_second"] = row["flops_per_step"] / row["step_on_device_seconds"] / 1e12
    row["step_with_pipeline_seconds"] = timed(lambda: setup.step(next(stream)), device, args.warmup, args.reps)
    row["profile_step_with_pipeline"] = gpu_profile(lambda: setup.step(next(stream)), device)
    row["profile_encoder_forward"] = gpu_profile(encode, device)
    row["peak_allocated_gib"] = peak_gib(device)
    row["steps_per_epoch"] = math.ceil(setup.data.num_users / setup.cfg.batch_size)
    row["epoch_seconds"] = row["step_with_pipeline_seconds"] * row["steps_per_epoch"]
    return row


def iisan_section(args: DiagnosisOptions, device: torch.device, report: dict) -> None:
    section = report.setdefault("iisan", [])
    for label in args.iisan:
        try:
            row = iisan_rows(args, label)
        except Exception as err:
            row = {"label": label, "error": error_line(err)}
        section.append(row)
        log.info("iisan %s: %s", label, row)
        write_json_atomic(args.out, report)
        reset(device)


def run_diagnosis(args: DiagnosisOptions) -> dict:
    """Every section, each written to ``args.out`` as it finishes (a crash keeps what was measured)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    report = {"warmup": args.warmup, "reps": args.reps, "device": device_facts(device)}
    log.info("device: %s", report["device"])
    write_json_atomic(args.out, report)
    if not args.skip_plain:
        plain_section(args, device, amp, report)
    iisan_section(args, device, report)
    log.info("wrote %s", args.out)
    return report
