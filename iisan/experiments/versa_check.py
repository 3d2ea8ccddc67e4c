"""IISAN-Versa on a GPU, one short prepared run (the `device` tool): a tiny bf16 decoder-LLM text tower
with a ViT of another width and depth on small synthetic data.

1. the cache built on the GPU (LLM loaded in its own bf16, autocast in bf16, stored fp16) against the
   same cache built in fp32 on the CPU;
2. a GPU build interrupted after two chunks and resumed gives the same bytes as an uninterrupted one;
3. cached Versa trains on the GPU (the trainer's default step: CUDA graphs) with finite loss.

``scripts/versa_gpu_check.py`` runs it and writes ``versa_gpu.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from ..bounds import not_utf8
from ..config import Config
from ..data.cache import cache_file
from ..data.image_build import build_image_lmdb
from ..data.interactions import read_items
from ..data.synthetic import generate
from ..devices import resolve_device
from ..errors import OutputError
from ..files import expect_folders, write_json_atomic
from ..model.caching import build_cache_from_config
from ..model.feeds import LiveStates
from ..model.tiny import write_decoder, write_vit
from ..train.trainer import train


def versa_gpu_check(out: Path, work: Path, device: str = "cuda", quick: bool = False) -> dict:
    """The three checks above; ``device='cpu'`` is a dry run of the check itself, ``quick`` one eager
    training epoch (little device time)."""
    out, work = Path(out), Path(work)
    expect_folders(out=out, work=work)
    if (spelt := not_utf8(str(work))) is not None:  # what is written there is opened by safetensors and LMDB
        raise OutputError(f"--work {spelt} is not valid UTF-8, which safetensors and LMDB cannot open: rename it, "
                          "or give another")
    resolved = resolve_device(device)  # a device this machine lacks: one line, before any work
    out.mkdir(parents=True, exist_ok=True)
    dev = device
    report: dict = {"device": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    paths = generate(work / "data", num_users=600, num_items=300, num_topics=12, seed=0, image_size=64)
    items = read_items(paths["items"])
    text = write_decoder(work / "llama-fp32", "llama", items.titles, hidden=128, layers=8, heads=4)
    half = work / "llama-bf16"  # LLM checkpoints ship in bf16
    AutoModel.from_pretrained(text, trust_remote_code=False).to(torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(text, trust_remote_code=False).save_pretrained(half)
    image = write_vit(work / "vit", hidden=96, layers=4, heads=4, image_size=64, patch_size=16)
    lmdb = work / "images.lmdb"
    build_image_lmdb(paths["images"], lmdb, items.ids, size=64, progress=False, overwrite=True)  # its own work folder
    base = Config(users=str(paths["users"]), items=str(paths["items"]), images=str(lmdb),
                  text_model=str(half), image_model=str(image), encode_batch_size=64, num_workers=2,
                  progress=False,
                  out_dir=str(work / "runs"), epochs=2, lr=1e-3, lr_adapter_text=1e-3, lr_adapter_image=1e-3)

    def tables(cache_dir):
        result = {}
        for m in ("text", "image"):
            with safe_open(str(cache_file(cache_dir, m)), "pt") as fh:
                result[m] = fh.get_tensor("states").float()
        return result

    # 1. GPU (bf16 LLM, fp16 store) vs CPU fp32
    start = time.perf_counter()
    build_cache_from_config(base.replace(device="cpu", cache_dir=str(work / "cpu")), dtype="float32")
    report["cpu_cache_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    build_cache_from_config(base.replace(device=dev, cache_dir=str(work / "gpu")), dtype="float16")
    report["gpu_cache_seconds"] = time.perf_counter() - start
    cpu, gpu = tables(work / "cpu"), tables(work / "gpu")
    for m in ("text", "image"):
        err = (gpu[m] - cpu[m]).norm(dim=-1) / cpu[m].norm(dim=-1).clamp_min(1e-6)
        report[f"{m}_relative_error_max"] = float(err[1:].max())
        report[f"{m}_relative_error_mean"] = float(err[1:].mean())

    # 2. interrupted + resumed == uninterrupted, on the GPU
    original, calls = LiveStates.forward, {"n": 0}

    def crashing(self, items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated interruption")
        return original(self, items)

    LiveStates.forward = crashing
    resumed = base.replace(device=dev, cache_dir=str(work / "resumed"))
    try:
        build_cache_from_config(resumed, dtype="float16")
    except RuntimeError as err:
        report["interrupted"] = str(err)
    finally:  # whatever else failed, later builds in this process run the real forward
        LiveStates.forward = original
    build_cache_from_config(resumed, dtype="float16")
    report["resumed_bytes_equal"] = all(cache_file(work / "resumed", m).read_bytes() ==
                                        cache_file(work / "gpu", m).read_bytes() for m in ("text", "image"))

    # 3. cached Versa training on the GPU (default: CUDA-graph step), and eager for comparison
    for compile_mode in ("off",) if quick else ("auto", "off"):
        results = train(base.replace(device=dev, cache_dir=str(work / "gpu"), compile=compile_mode,
                                     run_name=f"versa-{compile_mode}", epochs=1 if quick else 2))
        report[f"train_{compile_mode}"] = {
            "losses": [e["loss"] for e in results["epochs"]], "test": results["test"],
            "train_seconds_per_epoch": results["timing"]["train_seconds_per_epoch"],
            "trainable": results["parameters"]["trainable"], "peak_memory": results["peak_memory"]}
    write_json_atomic(out / "versa_gpu.json", report)
    return report
