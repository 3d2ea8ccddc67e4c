"""The same guarantees on a GPU: checkpoints with CUDA RNG and fp16 GradScaler state, exact resume
under deterministic algorithms, and torchrun with NCCL (one process per GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iisan.model.caching import build_cache_from_config
from iisan.train.trainer import train
from tests.test_distributed import check_launch, launch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
FAST = {k: 3e-3 for k in ("lr", "lr_image", "lr_text", "lr_adapter_image", "lr_adapter_text")}


def test_fp16_cuda_run_resumes_exactly(tiny_config):
    cfg = tiny_config(device="cuda", amp="fp16", compile="off", epochs=3, patience=20, deterministic=True,
                      **FAST)
    build_cache_from_config(cfg, dtype="float32")
    full = train(cfg.replace(run_name="full"))
    train(cfg.replace(run_name="part", epochs=2))
    resumed = train(cfg.replace(run_name="part"))
    state = json.loads((Path(resumed["run_dir"]) / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0 and resumed["resumed_from"] == ["epoch-0001"]
    assert not torch.are_deterministic_algorithms_enabled()  # train() leaves the global switch as it was
    assert (resumed["valid"], resumed["test"], [e["loss"] for e in resumed["epochs"]]) == \
        (full["valid"], full["test"], [e["loss"] for e in full["epochs"]])


@pytest.mark.parametrize("compile", ["off", "cudagraph"])
def test_torchrun_with_nccl(tiny_config, tmp_path, compile):
    cfg = tiny_config(device="cuda", compile=compile, epochs=3, patience=20, deterministic=True, **FAST)
    build_cache_from_config(cfg, dtype="float32")
    out, log = launch(cfg, 1, tmp_path)
    assert out["backend"] == "nccl"
    check_launch(cfg, out, log, 1, torch.device("cuda"))
