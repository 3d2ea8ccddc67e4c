"""Where a live-backbone training step spends its time on this device: plain measurements beside iisan's.

Sections, each timed after warm-up with device synchronisation, each written to --out as it finishes:

- ``device``: versions, attention back ends and a bf16 GEMM's throughput (calibrates the card).
- ``iisan``: the benchmark's own setups (FFT and uncached IISAN by default), each in a fresh process
  (``diagnose_steps.iisan_rows``): fresh vs already-seen vs fixed vs bucketed shapes with the
  allocator's activity in each; the host's time to queue a step beside the device's step period; the
  batch pipeline alone and running in the background; the encoders' forward alone; the step on
  device-resident batches and fed by the pipeline (what the benchmark times); GPU busy fraction and top
  kernels.
- ``plain``: a deliberately plain implementation of the reference settings (docs/performance.md) on this
  card, from transformers models built from their default configs and inputs already on the device (no
  data pipeline, no iisan code): the FFT step, the frozen forward of the uncached step and the cache build's
  forward, at the item counts iisan's steps ran (their most common bucket size) and at the reference's
  (every slot); then variants of the frozen forward (bf16 weights, eager attention, hidden states
  returned, cuDNN autotuning) and the ViT patch embedding alone.
- Each timed row also records its model FLOPs (matmuls, convolutions, attention; ``count_flops``) and
  the TFLOP/s it sustained: set beside the GEMM's throughput, it says how well a step uses the card.

Comparing ``plain`` with ``iisan`` at the same item count says whether a gap to the reference comes
from the card and library versions, from iisan's encoder wrappers, or from its input pipeline.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..claims import claim_output
from ..data.datasets import DATASETS
from ..devices import resolve_device
from ..errors import error_line, parse_json
from ..files import write_json_atomic
from ..isolate import in_fresh_process
from ..provenance import provenance
from .diagnose_steps import iisan_rows
from .options import DiagnosisOptions
from .plain_reference import plain_fft_step, plain_frozen_forward, plain_patch_embedding
from .timing import reset, timed

log = logging.getLogger(__name__)

SCIENTIFIC = DATASETS["Scientific"].source.stats  # its users and items size the epochs below
SCIENTIFIC_USERS, SCIENTIFIC_ITEMS = SCIENTIFIC.users, SCIENTIFIC.items


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

    fft_items, frozen_items = same_counts(args, report)
    for n in fft_items:
        record("fft_step", plain_fft_step, epoch["fft"], n)
    for n in frozen_items:
        record("frozen_forward", plain_frozen_forward, epoch["frozen"], n)
    record("cache_build_forward", plain_frozen_forward, epoch["cache"], args.cache_batch, hidden_states=True)
    if not frozen_items:  # no count to run the variants at (the script refuses this before any work)
        return
    n = frozen_items[0]
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, weights=torch.bfloat16)
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, attn="eager")
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, hidden_states=True)
    record("frozen_variants", plain_frozen_forward, epoch["frozen"], n, cudnn_benchmark=True)
    record("patch_embedding", plain_patch_embedding, 1, n)


def same_counts(args: DiagnosisOptions, report: dict) -> tuple[list[int], list[int]]:
    """Item counts of the plain FFT steps and frozen forwards: the most common row count of iisan's FFT
    and uncached IISAN steps (where measured), then the options' own."""
    measured = {r["label"]: r["most_common_rows"] for r in report.get("iisan", []) if "most_common_rows" in r}

    def counts(label: str, extra: list[int]) -> list[int]:
        return list(dict.fromkeys(([measured[label]] if label in measured else []) + list(extra)))

    return counts("FFT", args.fft_items), counts("IISAN (uncached)", args.frozen_items)


# --------------------------------------------------------------------------------------------------
# iisan's own setups


def iisan_section(args: DiagnosisOptions, report: dict) -> None:
    section = report.setdefault("iisan", [])
    for label in args.iisan:
        row = in_fresh_process(iisan_rows, args, label)  # a fresh process: no shape met before
        row.setdefault("label", label)
        section.append(row)
        log.info("iisan %s: %s", label, {k: v for k, v in row.items() if k not in ("traceback", "shapes")})
        write_json_atomic(args.out, report)


def is_diagnosis(path: Path) -> bool:
    """A diagnosis JSON ``run_diagnosis`` wrote: its first keys, and the device facts it records."""
    try:
        report = parse_json(Path(path).read_bytes())
    except (OSError, ValueError):
        return False
    return (isinstance(report, dict) and {"warmup", "reps", "shape_reps", "device"} <= report.keys()
            and isinstance(report["device"], dict) and "versions" in report["device"])


def run_diagnosis(args: DiagnosisOptions) -> dict:
    """Every section, each written to ``args.out`` as it finishes (a crash keeps what was measured).
    iisan's steps run first, each in its own process, so that their fresh shapes are fresh. A file at
    ``args.out`` is replaced only when it is an earlier diagnosis (``is_diagnosis``)."""
    device = resolve_device(args.device)  # a device this machine lacks: one line, before any work
    claim_output(args.out, is_diagnosis, "a diagnosis JSON IISAN wrote", "--out", overwrite=True)
    amp = torch.bfloat16 if device.type == "cuda" else None
    report = {"warmup": args.warmup, "reps": args.reps, "shape_reps": args.shape_reps,
              "device": device_facts(device)}
    log.info("device: %s", report["device"])
    write_json_atomic(args.out, report)
    iisan_section(args, report)
    if not args.skip_plain:
        plain_section(args, device, amp, report)
    log.info("wrote %s", args.out)
    return report
