"""GPU checks (skipped without CUDA): the CUDA-graph step trains exactly like the eager one, every
setting trains in bf16, cached and live feeds agree on the device, the trainer runs end to end, and
steps never make the host wait for the device."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from iisan.data.run_data import load_data
from iisan.efficiency.rows import TABLE_METHODS
from iisan.model.build import build_model
from iisan.train.optim import make_optimizer
from iisan.train.plan import batch_layout
from iisan.train.step import make_train_step
from iisan.train.trainer import train

from ._batches import first_epoch
from .conftest import BASELINES, cached_and_live_tables

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")



@pytest.fixture()
def no_tf32():
    """fp32 matmuls and convolutions for exact comparisons, put back afterwards (the switches are global;
    pytest's monkeypatch cannot undo torch's computed attributes)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

def run_steps(cfg, compiled, steps=6):
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, CUDA)
    optimizer = make_optimizer(model, cfg, CUDA, capturable=compiled == "cudagraph")
    step = make_train_step(model, optimizer, None, CUDA, compiled)
    model.train()
    losses = []
    for batch in first_epoch(data.train_sequences(), 0, "all", pixels):  # same slots both ways
        losses.append(step(batch.to(CUDA)).item())
        if len(losses) == steps:
            break
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_cudagraph_step_trains_like_the_eager_step(tiny_config, tiny_cache, no_tf32):
    cfg = tiny_config(cache_dir=tiny_cache, device="cuda", drop_rate=0.0, amp="none")
    eager_losses, eager_params = run_steps(cfg, "off")
    graph_losses, graph_params = run_steps(cfg, "cudagraph")
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    assert eager_losses[-1] != eager_losses[0]
    for name, p in eager_params.items():
        torch.testing.assert_close(graph_params[name], p, rtol=1e-3, atol=1e-4)


def test_cudagraph_step_draws_the_eager_steps_dropout_masks(tiny_config, tiny_cache, no_tf32):
    """Dropout on: the capture's warm-up draws are put back, and each replay draws from the device's stream
    what the eager step would, so a run that captures again after resuming matches one that never stopped."""
    cfg = tiny_config(cache_dir=tiny_cache, device="cuda", drop_rate=0.1, amp="none")
    eager_losses, _ = run_steps(cfg, "off")
    graph_losses, _ = run_steps(cfg, "cudagraph")
    assert graph_losses == pytest.approx(eager_losses, rel=1e-4)
    assert run_steps(cfg.replace(drop_rate=0.0), "off")[0] != pytest.approx(eager_losses, rel=1e-4)  # masks matter


@pytest.mark.parametrize("overrides", [{"method": m} for m in BASELINES] +
                         [{"method": "iisan", "feed": f} for f in ("live", "cached")])
def test_every_setting_trains_in_bf16(tiny_config, tiny_cache, overrides):
    cfg = tiny_config(cache_dir=tiny_cache, device="cuda", amp="bf16", **overrides)
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, CUDA)
    step = make_train_step(model, make_optimizer(model, cfg, CUDA), torch.bfloat16, CUDA, "off")
    model.train()
    for i, batch in enumerate(first_epoch(data.train_sequences(), 0, pixels=pixels)):
        assert torch.isfinite(step(batch.to(CUDA)))
        if i == 2:
            break


def test_cached_and_live_feeds_agree_on_the_gpu(tiny_config, tiny_cache, no_tf32):
    a, b, _ = cached_and_live_tables(tiny_config(cache_dir=tiny_cache, device="cuda", amp="none"), CUDA)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_live_evaluation_runs_the_encoders_in_fp32_whatever_the_training_precision(tiny_config, tiny_cache, no_tf32):
    """bf16 training leaves evaluation exact: item_table's live encoders run without autocast (authors)."""
    a, b, _ = cached_and_live_tables(tiny_config(cache_dir=tiny_cache, device="cuda", amp="bf16"), CUDA)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_trainer_end_to_end_with_cuda_graphs(tiny_config, tiny_cache):
    results = train(tiny_config(cache_dir=tiny_cache, device="cuda", epochs=2))
    assert results["step"]["compiled"] == "cudagraph" and results["step"]["amp"] == "bfloat16"
    assert all(math.isfinite(e["loss"]) for e in results["epochs"])
    assert results["peak_memory"]["max_allocated_gib"] > 0
    from iisan.experiments.trained import evaluate, load_run

    again = evaluate(load_run(results["run_dir"], "cuda"), "test")
    assert again == pytest.approx(results["test"], abs=1e-6)  # the reported numbers are the best weights'


def test_batches_are_pinned_so_their_copies_do_not_wait_for_the_device(tiny_config):
    cfg = tiny_config(method="iisan", feed="live", device="cuda")
    data = load_data(cfg)
    _, pixels = build_model(cfg, data, CUDA)
    batch = next(iter(first_epoch(data.train_sequences(), 0, pixels=pixels)))
    host = [batch.seq, batch.inverse, batch.items.ids, batch.items.real, batch.items.pixels]
    assert all(t.is_pinned() for t in host)
    moved = batch.to(CUDA)
    assert moved.items.real.device.type == "cuda" and torch.equal(moved.items.real.cpu(), batch.items.real)


@pytest.mark.parametrize("setting", list(TABLE_METHODS))
def test_steps_issue_no_synchronising_cuda_calls(setting, tiny_config, tiny_cache):
    """The GPU side of test_methods' host-stall test: after a first step, CUDA's sync debug mode sees no
    call that makes the host wait (transformers' read-back of the text padding mask included: BERT-family
    towers get their mask ready-made)."""
    cfg = tiny_config(cache_dir=tiny_cache, device="cuda", amp="bf16", **TABLE_METHODS[setting])
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, CUDA)
    model.train()
    step = make_train_step(model, make_optimizer(model, cfg, CUDA), torch.bfloat16, CUDA, "off")
    dedup, buckets = batch_layout(cfg, "off", model)  # the trainer's batches: static shapes for live steps
    loader = first_epoch(data.train_sequences(), 0, dedup, pixels, buckets=buckets)
    first, *batches = [batch.to(CUDA) for batch, _ in zip(loader, range(3))]
    step(first)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                step(batch)
            stepped = len(caught)
            torch.ones(1, device=CUDA).item()  # a sync on purpose: seen, or this test would check nothing
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught[:stepped] if "synchronizing" in str(w.message)]
    assert syncs == [] and any("synchronizing" in str(w.message) for w in caught[stepped:])


def test_patch_embedding_matmul_matches_the_conv_in_bf16(tiny):
    from iisan.model.backbones import load_image_encoder

    conv = load_image_encoder(tiny["image_model"], (0, 1, 2, 3), patch_embedding="conv").model.to(CUDA)
    matmul = load_image_encoder(tiny["image_model"], (0, 1, 2, 3)).model.to(CUDA)
    size = conv.config.image_size
    pixels = torch.randn(8, 3, size, size, device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = conv(pixel_values=pixels).last_hidden_state, matmul(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["iisan", "fft"])
def test_static_shapes_change_no_loss_on_the_gpu(tiny_config, method, no_tf32):
    """The CPU test's GPU twin (fp32, no TF32): padded, masked rows and cut titles leave the loss as it was."""
    from iisan.train.plan import shape_buckets

    cfg = tiny_config(method=method, feed="live", device="cuda", amp="none")
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, CUDA)
    model.eval()
    sequences, buckets = data.train_sequences(), shape_buckets(cfg, model)
    pairs = zip(first_epoch(sequences, 0, pixels=pixels), first_epoch(sequences, 0, pixels=pixels, buckets=buckets))
    with torch.no_grad():
        for (plain, static), _ in zip(pairs, range(3)):
            assert len(static.items.ids) >= len(plain.items.ids) and static.items.encode_all
            assert model(static.to(CUDA)).item() == pytest.approx(model(plain.to(CUDA)).item(), rel=1e-5)
