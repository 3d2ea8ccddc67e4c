"""IISAN-Versa on a GPU, one short prepared run (the `device` tool): a tiny bf16 decoder-LLM text tower
with a ViT of another width and depth on small synthetic data.

1. the cache built on the GPU (LLM loaded in its own bf16, autocast in bf16, stored fp16) against the
   same cache built in fp32 on the CPU;
2. a GPU build interrupted after two chunks and resumed gives the same bytes as an uninterrupted one;
3. cached Versa trains on the GPU (the trainer's default step: CUDA graphs) with finite loss.

``scripts/versa_gpu_check.py`` runs it and writes ``versa_gpu.json`` after each stage (a failure keeps what
the stages before it found, and its own error). ``checks`` says what passed: the GPU cache within
``MAX_RELATIVE_ERROR`` of the fp32 one, the interruption simulated, its finished chunks kept and reused
(``chunks_kept``) and the resumed bytes equal, every loss
finite (a non-finite loss stops training with an error, which fails the check too), and on a GPU the
default step a CUDA graph (a failed capture trains eagerly, and would pass unseen; ``quick`` trains
eagerly only and checks none); ``passed`` is all of them. The caches and runs go in a folder of their own per check
(``work/checks/<device>-<time>``), so a rerun or a GPU run after a CPU dry run builds and trains afresh.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from ..bounds import not_utf8
from ..claims import expect_folders
from ..config import Config
from ..data.cache import cache_file
from ..data.cache_build import SIDECAR
from ..data.image_build import build_image_lmdb
from ..data.interactions import read_items
from ..data.synthetic import generate
from ..devices import resolve_device
from ..errors import OutputError
from ..files import write_json_atomic
from ..model.caching import build_cache_from_config
from ..model.feeds import LiveStates
from ..model.tiny import write_decoder, write_vit
from ..train.trainer import train

MAX_RELATIVE_ERROR = 0.05  # per item, GPU (bf16 LLM, fp16 store) against fp32; a simulation gave about 0.009


def versa_gpu_check(out: Path, work: Path, device: str = "cuda", quick: bool = False) -> dict:
    """The three checks above; ``device='cpu'`` is a dry run of the check itself, ``quick`` one eager
    training epoch (little device time). The report is written after each stage, and with the error of a
    stage that failed before it is raised again."""
    out, work = Path(out), Path(work)
    expect_folders(out=out, work=work)
    if (spelt := not_utf8(str(work))) is not None:  # what is written there is opened by safetensors and LMDB
        raise OutputError(f"--work {spelt} is not valid UTF-8, which safetensors and LMDB cannot open: rename it, "
                          "or give another")
    resolved = resolve_device(device)  # a device this machine lacks: one line, before any work
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    try:
        stages(report, out, work, device, resolved, quick)
    except BaseException as err:
        report["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        report["checks"] = checks(report, resolved)
        report["passed"] = bool(report["checks"]) and all(report["checks"].values()) and "error" not in report
        write_json_atomic(out / "versa_gpu.json", report)
    return report


def checks(report: dict, device: torch.device) -> dict[str, bool]:
    """What passed, from what the stages recorded (a stage that did not run adds nothing)."""
    found = {}
    if "text_relative_error_max" in report:
        found["caches_close"] = all(report[f"{m}_relative_error_max"] < MAX_RELATIVE_ERROR for m in ("text", "image"))
    if "resumed_bytes_equal" in report:
        found["interruption_simulated"] = report.get("interrupted") == "simulated interruption"
        kept = report.get("chunks_kept", 0)  # a resume that encoded every chunk again would pass the bytes check
        found["chunks_reused"] = kept > 0 and report.get("chunks_encoded_on_resume") == report.get("chunks", 0) - kept
        found["resumed_bytes_equal"] = report["resumed_bytes_equal"]
    runs = {k: v for k, v in report.items() if k.startswith("train_")}
    if runs:
        found["losses_finite"] = all(math.isfinite(x) for run in runs.values() for x in run["losses"])
    if "train_auto" in report and device.type == "cuda":
        found["cuda_graph_step"] = report["train_auto"]["step"].get("compiled") == "cudagraph"
    return found


def encodes(build, interrupt_at: int | None = None) -> int:
    """How many chunks ``build()`` encoded (calls of the live feed's forward); with ``interrupt_at``, that
    call raises a RuntimeError('simulated interruption') instead, as a crash mid-build would."""
    original, calls = LiveStates.forward, []

    def counted(self, items):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise RuntimeError("simulated interruption")
        return original(self, items)

    LiveStates.forward = counted
    try:
        build()
    finally:
        LiveStates.forward = original
    return len(calls)


def stages(report: dict, out: Path, work: Path, dev: str, resolved: torch.device, quick: bool) -> None:
    paths = generate(work / "data", num_users=600, num_items=300, num_topics=12, seed=0, image_size=64)
    items = read_items(paths["items"])
    text = write_decoder(work / "llama-fp32", "llama", items.titles, hidden=128, layers=8, heads=4)
    half = work / "llama-bf16"  # LLM checkpoints ship in bf16
    AutoModel.from_pretrained(text, trust_remote_code=False).to(torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(text, trust_remote_code=False).save_pretrained(half)
    image = write_vit(work / "vit", hidden=96, layers=4, heads=4, image_size=64, patch_size=16)
    lmdb = work / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb, items.ids, size=64, progress=False, overwrite=True)  # its own work folder
    stamp = work / "checks" / f"{resolved.type}-{time.strftime('%Y%m%d-%H%M%S')}"  # this check's caches and runs
    here = next(p for n in range(1000) if not (p := stamp.with_name(stamp.name + (f"-{n}" if n else ""))).exists())
    report["folder"] = str(here)
    base = Config(users=str(paths["users"]), items=str(paths["items"]), images=str(lmdb),
                  text_model=str(half), image_model=str(image), encode_batch_size=64, num_workers=2,
                  progress=False,
                  out_dir=str(here / "runs"), epochs=2, lr=1e-3, lr_adapter_text=1e-3, lr_adapter_image=1e-3)

    def tables(cache_dir):
        result = {}
        for m in ("text", "image"):
            with safe_open(str(cache_file(cache_dir, m)), "pt") as fh:
                result[m] = fh.get_tensor("states").float()
                report.setdefault("cache_precision", {}).setdefault(Path(cache_dir).name, {})[m] = {
                    k: fh.metadata().get(k) for k in ("encoder_dtype", "dtype")}
        return result

    # 1. GPU (bf16 LLM, fp16 store) vs CPU fp32
    start = time.perf_counter()
    build_cache_from_config(base.replace(device="cpu", cache_dir=str(here / "cpu")), dtype="float32")
    report["cpu_cache_seconds"] = time.perf_counter() - start  # encoders' loading and first use included
    start = time.perf_counter()
    report["chunks"] = encodes(lambda: build_cache_from_config(base.replace(device=dev, cache_dir=str(here / "gpu")),
                                                               dtype="float16"))
    report["gpu_cache_seconds"] = time.perf_counter() - start
    cpu, gpu = tables(here / "cpu"), tables(here / "gpu")
    for m in ("text", "image"):
        err = (gpu[m] - cpu[m]).norm(dim=-1) / cpu[m].norm(dim=-1).clamp_min(1e-6)
        report[f"{m}_relative_error_max"] = float(err[1:].max())
        report[f"{m}_relative_error_mean"] = float(err[1:].mean())
    write_json_atomic(out / "versa_gpu.json", report)

    # 2. interrupted + resumed == uninterrupted, on the GPU
    resumed = base.replace(device=dev, cache_dir=str(here / "resumed"))
    try:
        encodes(lambda: build_cache_from_config(resumed, dtype="float16"), interrupt_at=3)
    except RuntimeError as err:
        report["interrupted"] = str(err)
    report["chunks_kept"] = len(list((here / "resumed" / SIDECAR).glob("chunk-*.safetensors")))  # to resume from
    report["chunks_encoded_on_resume"] = encodes(lambda: build_cache_from_config(resumed, dtype="float16"))
    report["resumed_bytes_equal"] = all(cache_file(here / "resumed", m).read_bytes() ==
                                        cache_file(here / "gpu", m).read_bytes() for m in ("text", "image"))
    write_json_atomic(out / "versa_gpu.json", report)

    # 3. cached Versa training on the GPU (default: CUDA-graph step), and eager for comparison
    for compile_mode in ("off",) if quick else ("auto", "off"):
        results = train(base.replace(device=dev, cache_dir=str(here / "gpu"), compile=compile_mode,
                                     run_name=f"versa-{compile_mode}", epochs=1 if quick else 2))
        report[f"train_{compile_mode}"] = {
            "losses": [e["loss"] for e in results["epochs"]], "test": results["test"], "step": results["step"],
            "train_seconds_per_epoch": results["timing"]["train_seconds_per_epoch"],
            "trainable": results["parameters"]["trainable"], "peak_memory": results["peak_memory"],
            "peak_memory_by_phase": results["peak_memory_by_phase"]}
        write_json_atomic(out / "versa_gpu.json", report)
