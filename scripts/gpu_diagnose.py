"""Where a live-backbone training step spends its time on this device: plain measurements beside iisan's.

    python scripts/gpu_diagnose.py --out $OUT/diagnose.json                     # a GPU, BERT-base + ViT-B/16
    python scripts/gpu_diagnose.py --size tiny --data demo --device cpu \\
        --fft-items 16 --frozen-items 32 --cache-batch 32 --out /tmp/diagnose.json   # a dry run on a CPU

Sections, each timed after warm-up with device synchronisation, each written to --out as it finishes:

- ``device``: versions, attention back ends and a bf16 GEMM's throughput (calibrates the card).
- Each timed row also records its model FLOPs (matmuls, convolutions, attention; ``count_flops``) and
  the TFLOP/s it sustained: set beside the GEMM's throughput, it says how well a step uses the card.
- ``plain``: a deliberately plain implementation of DESIGN.md's reference settings on this card, from
  transformers models built from their default configs and inputs already on the device (no data
  pipeline, no iisan code): the FFT step, the frozen forward of the uncached step and the cache
  build's forward, each at several item counts; then variants of the frozen forward (bf16 weights,
  eager attention, hidden states returned, cuDNN autotuning) and the ViT patch embedding alone.
- ``iisan``: the benchmark's own FFT and uncached IISAN setups (``iisan.bench.training_setup``), split
  into the batch pipeline alone, the item encoder's forward alone, the step on batches already on the
  device, and the step fed by the pipeline (what the benchmark times).

Comparing ``plain`` with ``iisan`` at the same item count says whether a gap to the reference comes
from the card and library versions, from iisan's encoder wrappers, or from its input pipeline.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from iisan.bench import count_flops, error_line, step_flops, sync  # noqa: E402
from iisan.runinfo import device_name, git_commit, versions, write_json_atomic  # noqa: E402
from iisan.train import peak_memory  # noqa: E402

log = logging.getLogger("diagnose")

SCIENTIFIC_USERS, SCIENTIFIC_ITEMS, TITLE_TOKENS = 12076, 20314, 30


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Mean seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def gpu_profile(run, device: torch.device, steps: int = 3, top: int = 8) -> dict:
    """Over ``steps`` calls of ``run``: the share of wall time the GPU spends in kernels (near 1: the
    kernels themselves are slow; well below: the host or the input pipeline keeps the GPU waiting) and
    the costliest kernels. Empty on a CPU."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    try:
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            wall = time.perf_counter() - start
        kernels = sorted(((e.key, e.self_device_time_total) for e in prof.key_averages()
                          if e.self_device_time_total > 0), key=lambda k: -k[1])
    except Exception as err:  # the profiler is a help here, never a reason to lose the row
        return {"profile_error": error_line(err)}
    busy = sum(t for _, t in kernels) / 1e6  # microseconds -> seconds
    return {"profiled_steps": steps, "wall_seconds_per_step": wall / steps, "kernel_seconds_per_step": busy / steps,
            "gpu_busy": busy / wall if wall else None,
            "top_kernels": [{"name": name[:140], "ms_per_step": t / 1e3 / steps} for name, t in kernels[:top]]}


def peak_gib(device: torch.device) -> float | None:
    return peak_memory(device).get("max_allocated_gib")  # GPU only: a CPU process's peak is not this run's


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------------
# device


def device_facts(device: torch.device) -> dict:
    facts = {"device": device_name(device), "versions": versions(), "git_commit": git_commit(),
             "torch_threads": torch.get_num_threads()}
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


def plain_models(size: str, device: torch.device, attn: str = "sdpa", dtype=torch.float32):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    if size == "base":  # the default configs are BERT-base and ViT-B/16 at 224 px
        text_cfg, image_cfg = BertConfig(attn_implementation=attn), ViTConfig(attn_implementation=attn)
    else:
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     attn_implementation=attn)
        text_cfg, image_cfg = BertConfig(**small), ViTConfig(**small, image_size=224, patch_size=32)
    with device:  # initialised where they run: random init of 200 M parameters on a CPU takes seconds
        text = BertModel(text_cfg, add_pooling_layer=False).to(dtype)
        image = ViTModel(image_cfg, add_pooling_layer=False).to(dtype)
    return text, image


def plain_inputs(n: int, device: torch.device, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 224, 224, generator=g).to(device)
    tokens = torch.randint(1000, vocab, (n, TITLE_TOKENS), generator=g).to(device)
    lengths = torch.randint(8, TITLE_TOKENS + 1, (n, 1), generator=g).to(device)
    mask = (torch.arange(TITLE_TOKENS, device=device) < lengths).long()  # titles of 8..30 tokens
    return pixels, tokens, mask


def plain_fft_step(size: str, n: int, device: torch.device, amp, warmup: int, reps: int) -> dict:
    """Both towers trained end to end: final CLS -> GELU heads -> com_dense, in-batch softmax, fused Adam."""
    text, image = plain_models(size, device)
    width_t, width_i = text.config.hidden_size, image.config.hidden_size
    heads = nn.ModuleList([nn.Linear(width_i, 64), nn.Linear(width_t, 64), nn.Linear(128, 64)]).to(device)
    modules = nn.ModuleList([text, image, heads]).train()
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-5, fused=True)
    pixels, tokens, mask = plain_inputs(n, device, text.config.vocab_size)
    target = torch.arange(n, device=device)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            cls_i = image(pixel_values=pixels).last_hidden_state[:, 0]
            cls_t = text(input_ids=tokens, attention_mask=mask).last_hidden_state[:, 0]
            item = heads[2](torch.cat([nn.functional.gelu(heads[0](cls_i)), nn.functional.gelu(heads[1](cls_t))], -1))
            loss = nn.functional.cross_entropy((item @ item.T).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset(device)
    flops = count_flops(step)  # also a warm-up step
    seconds = timed(step, device, warmup, reps)
    return {"items": n, "seconds_per_step": seconds, "peak_allocated_gib": peak_gib(device),
            "flops_per_step": flops, "tflops_per_second": flops / seconds / 1e12,
            "profile": gpu_profile(step, device)}


def plain_frozen_forward(size: str, n: int, device: torch.device, amp, warmup: int, reps: int,
                         attn: str = "sdpa", weights=torch.float32, hidden_states: bool = False,
                         cudnn_benchmark: bool = False) -> dict:
    """Both frozen towers, eval mode, no autograd graph: the live feed's forward."""
    text, image = plain_models(size, device, attn, weights)
    text.eval(), image.eval()
    pixels, tokens, mask = plain_inputs(n, device, text.config.vocab_size)
    pixels = pixels.to(weights)
    use_amp = amp is not None and weights == torch.float32

    @torch.no_grad()
    def forward():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=use_amp):
            image(pixel_values=pixels, output_hidden_states=hidden_states)
            text(input_ids=tokens, attention_mask=mask, output_hidden_states=hidden_states)

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        reset(device)
        flops = count_flops(forward)
        seconds = timed(forward, device, warmup, reps)
    finally:
        torch.backends.cudnn.benchmark = previous
    return {"items": n, "attn": attn, "weights": str(weights).replace("torch.", ""), "autocast": use_amp,
            "hidden_states": hidden_states, "cudnn_benchmark": cudnn_benchmark, "seconds_per_step": seconds,
            "flops_per_step": flops, "tflops_per_second": flops / seconds / 1e12,
            "peak_allocated_gib": peak_gib(device)}


def plain_patch_embedding(size: str, n: int, device: torch.device, amp, warmup: int, reps: int) -> dict:
    """The ViT patch embedding alone (a stride-16 conv with 3 input channels): forward, and forward plus
    the weight gradient (FFT), on contiguous (NCHW) pixels and on channels-last ones (what a permute of
    HWC pixels gives); the same map as iisan's ``PatchProjection`` (one matmul over patches, the
    default) and as unfold + matmul. A poor cuDNN choice for this conv shows here."""
    from iisan.backbones import PatchProjection

    _, image = plain_models(size, device)
    conv = image.embeddings.patch_embeddings.projection
    projection = PatchProjection(conv)
    nchw = plain_inputs(n, device, 2000)[0]
    layouts = {"nchw": nchw, "channels_last": nchw.contiguous(memory_format=torch.channels_last)}
    p = conv.kernel_size[0]
    out = {"items": n}

    def forward(pixels, module=conv):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return module(pixels)

    runs = [(f"conv_{name}", pixels, conv) for name, pixels in layouts.items()] + [("matmul_nchw", nchw, projection)]
    for name, pixels, module in runs:
        with torch.no_grad():
            out[f"{name}_seconds"] = timed(lambda x=pixels, m=module: forward(x, m), device, warmup, reps)

        def train_step(x=pixels, m=module):
            forward(x, m).float().sum().backward()
            conv.weight.grad = conv.bias.grad = None

        out[f"{name}_fwd_bwd_seconds"] = timed(train_step, device, warmup, reps)

    weight = conv.weight.reshape(conv.out_channels, -1)

    @torch.no_grad()
    def as_matmul():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            patches = nn.functional.unfold(nchw, p, stride=p).transpose(1, 2)  # (n, patches, 3*p*p)
            return patches @ weight.T + conv.bias

    out["unfold_matmul_seconds"] = timed(as_matmul, device, warmup, reps)
    return out


def plain_section(args, device, amp, report) -> None:
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


def iisan_rows(args, label: str) -> dict:
    """The benchmark's setup of ``label``, timed piece by piece."""
    from benchmark_efficiency import base_config, method_config, prepare

    from iisan.bench import training_setup

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


def linear_output_dtypes(model: nn.Module, run) -> dict[str, int]:
    """How many Linear outputs of one ``run()`` came out in each dtype: a matmul left in fp32 under
    autocast (10x slower on a GPU's tensor cores) shows here."""
    seen: dict[str, int] = {}

    def hook(module, inputs, output):
        key = str(output.dtype).replace("torch.", "")
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def iisan_section(args, device, report) -> None:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--size", choices=("base", "tiny"), default="base", help="encoders: BERT-base + ViT-B/16")
    parser.add_argument("--data", choices=("scientific", "demo"), default="scientific",
                        help="synthetic data for the iisan section")
    parser.add_argument("--device", default="auto")
    # Distinct non-padding items per batch on the benchmark's Scientific-shaped data: 139 of the 352
    # slots of 32 users, 276 of the 704 slots of 64 users (mean over epoch 0, docs/performance.md).
    parser.add_argument("--fft-items", type=ints, default=[352, 139],
                        help="items per plain FFT step (352: every slot of 32 users; 139: the distinct ones)")
    parser.add_argument("--frozen-items", type=ints, default=[352, 704, 276],
                        help="items per plain frozen forward (704: every slot of 64 users; 276: the distinct "
                             "non-padding ones; 352: DESIGN.md's 'about half'); the first also runs the variants")
    parser.add_argument("--cache-batch", type=int, default=512)
    parser.add_argument("--iisan", default="FFT,IISAN (uncached)", help="comma list of benchmark labels ('' skips)")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--work", default="/tmp/iisan-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "diagnose.json")
    args = parser.parse_args(argv)
    args.iisan = [x.strip() for x in args.iisan.split(",") if x.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "warmup": args.warmup, "reps": args.reps, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["device"] = device_facts(device)
    log.info("device: %s", report["device"])
    write_json_atomic(args.out, report)
    if not args.skip_plain:
        plain_section(args, device, amp, report)
    iisan_section(args, device, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
