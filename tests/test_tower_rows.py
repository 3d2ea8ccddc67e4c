"""Towers by their own rows: where a batch has a row per slot (the baselines' BERT drops out, so each slot
draws its own mask), a tower that drops nothing out (the ViT) runs on each distinct item once. The rows by
hand; the same loss and gradients as every tower per slot, in training mode, dropout included; the pixels
read once per distinct item; which towers the plan picks; what results.json and the benchmark record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iisan.data.batches import CollateTrain, TrainBatch, without_padding_rows
from iisan.data.run_data import load_data
from iisan.data.shapes import ShapeBuckets
from iisan.model.build import build_model
from iisan.train.plan import per_item_towers, plan_step, shape_buckets
from iisan.train.trainer import train

CPU = torch.device("cpu")


def test_rows_by_hand():
    """Slots 30, 40, 30 / 50, 60, 70, 40 / 10, 20: a row per slot that holds an item and padding once (row 0);
    the distinct items once each, padding first, each row pointing at its item's distinct row; with static
    shapes each list padded to its own bucket, the padding rows pointing at item 0."""
    sequences = np.array([[0, 0, 30, 40, 30], [0, 50, 60, 70, 40], [0, 0, 0, 10, 20]])
    batch = CollateTrain(sequences, "slots", per_item=("image",))([0, 1, 2])
    items = batch.items
    assert items.ids.tolist() == [0, 30, 40, 30, 50, 60, 70, 40, 10, 20]
    assert items.distinct.ids.tolist() == [0, 10, 20, 30, 40, 50, 60, 70]
    assert items.to_distinct.tolist() == [0, 3, 4, 3, 5, 6, 7, 4, 1, 2]
    assert items.distinct.ids[items.to_distinct].tolist() == items.ids.tolist()
    assert items.tower("image") == (items.distinct, items.to_distinct) and items.tower("text") == (items, None)
    static = CollateTrain(sequences, "slots", buckets=ShapeBuckets(), per_item=("image",))([0, 1, 2]).items
    assert len(static.ids) == 16 and len(static.distinct.ids) == 16 and static.encode_all
    assert static.distinct.encode_all and static.to_distinct[10:].tolist() == [0] * 6
    assert static.distinct.ids[static.to_distinct].tolist() == static.ids.tolist()
    cut = without_padding_rows(TrainBatch(batch.seq, static, batch.inverse)).items
    assert cut.ids.tolist() == items.ids.tolist() and cut.distinct.ids.tolist() == items.distinct.ids.tolist()
    back = TrainBatch.from_tensors(*TrainBatch(batch.seq, static, batch.inverse).tensors()).items
    assert back.per_item == ("image",) and torch.equal(back.distinct.ids, static.distinct.ids)
    assert torch.equal(back.to_distinct, static.to_distinct) and back.distinct.title_columns == static.title_columns
    with pytest.raises(ValueError, match="towers by distinct item .* need the 'slots' encoding, not 'items'"):
        CollateTrain(sequences, "items", per_item=("image",))


def test_a_tower_by_item_gives_the_same_gradients_run_after_run():
    """Each slot takes its item's output by index_select, whose backward sums a repeated item's rows in one
    order: same inputs, the same gradient bit for bit, also on two threads and a 768-wide tower (indexing
    with out[index] summed them in an order that varied from run to run there)."""
    from iisan.model.inputs import EncodedItems

    class Table(EncodedItems):
        def inputs(self, name, items, rows):
            return {"ids": items.ids if rows is None else items.ids[rows]}

    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(400, 768))
    tower = Table({"image": torch.nn.Identity()}, None, None)
    rng = np.random.default_rng(0)
    sequences = np.concatenate([np.zeros((32, 2), np.int64), rng.integers(1, 60, (32, 9))], axis=1)
    items = CollateTrain(sequences, "slots", per_item=("image",))(list(range(32))).items
    weights = torch.randn(len(items.ids), 768)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(12):
            table.grad = None
            out = tower.encode("image", items, lambda encoder, inputs: table[inputs["ids"]], (768,))
            (out * weights).sum().backward()
            grads.append(table.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


class CountedPixels:
    """A PixelSource that counts the images it is asked for."""

    def __init__(self, source):
        self.source, self.asked = source, 0

    def __call__(self, ids):
        self.asked += len(ids)
        return self.source(ids)


@pytest.mark.parametrize("method,static", [("fft", False), ("fft", True), ("lora", True), ("bitfit", False)])
def test_the_vit_by_item_changes_no_loss_and_no_gradient_in_training(tiny_config, method, static):
    """A baseline's batches with both towers per slot and with the ViT per distinct item, in training mode
    with the same seed: BERT draws the same dropout masks (its rows are the same), the ViT draws none, so the
    loss and every gradient are the same; the ViT's rows and the images read shrink to the distinct items."""
    cfg = tiny_config(method=method, static_shapes=static)
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, CPU)
    model.train()
    assert per_item_towers("slots", model) == ("image",)
    buckets = shape_buckets(cfg, model)
    sequences, users = data.train_sequences(), list(range(16))
    per_slot, by_item = CountedPixels(pixels), CountedPixels(pixels)
    slot_batch = CollateTrain(sequences, "slots", per_slot, buckets)(users)
    item_batch = CollateTrain(sequences, "slots", by_item, buckets, ("image",))(users)
    assert by_item.asked == len(item_batch.items.distinct.ids) < per_slot.asked == len(slot_batch.items.ids)
    results = []
    for batch in (slot_batch, item_batch):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (item_loss, item_grads) = results
    assert item_loss == pytest.approx(loss, rel=1e-6)
    assert item_grads.keys() == grads.keys() and any("image" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(item_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_plan_takes_the_towers_that_drop_nothing_out(tiny_config):
    """FFT (BERT drops out, the tiny ViT does not): the ViT by item; text alone: no tower by item; uncached
    IISAN with the authors' BERT dropout: its frozen ViT by item; each distinct item once everywhere
    ('items') or every slot ('all'): none."""
    fft = tiny_config(method="fft")
    model, _ = build_model(fft, load_data(fft), CPU)
    plan = plan_step(fft, CPU, model)
    assert (plan.encoding, plan.per_item) == ("slots", ("image",))
    assert per_item_towers("items", model) == () and per_item_towers("all", model) == ()
    text = tiny_config(method="fft", towers="text")
    assert plan_step(text, CPU, build_model(text, load_data(text), CPU)[0]).per_item == ()
    iisan = tiny_config(feed="live", text_encoder_dropout=True)
    assert plan_step(iisan, CPU, build_model(iisan, load_data(iisan), CPU)[0]).per_item == ("image",)


def test_a_run_records_its_towers_by_item_and_trains_as_before(tiny_config, monkeypatch):
    """results.json's step names the towers that ran by item; a run with them trains to the same losses as
    one with every tower per slot (only the ViT's rows differ)."""
    from iisan.train import plan

    cfg = tiny_config(method="fft", epochs=1, max_steps_per_epoch=3)
    by_item = train(cfg.replace(run_name="by-item"))
    assert by_item["step"]["item_encoding"] == "slots" and by_item["step"]["towers_by_item"] == ["image"]
    assert by_item["step"]["encoder_dropout"] == ["text"]  # what a method comparison reads beside the parameters
    monkeypatch.setattr(plan, "per_item_towers", lambda encoding, model: ())
    per_slot = train(cfg.replace(run_name="per-slot"))
    assert per_slot["step"]["item_encoding"] == "slots" and "towers_by_item" not in per_slot["step"]
    assert by_item["epochs"][0]["loss"] == pytest.approx(per_slot["epochs"][0]["loss"], rel=1e-5)


def test_a_run_records_which_towers_drew_dropout_masks(tiny_config, tiny_cache):
    """IISAN's frozen towers draw none, cached or live, unless --text-encoder-dropout (the authors' BERT);
    FFT trains BERT with its dropout (the tiny ViT, as ViT-B/16, has none)."""
    runs = {"cached": tiny_config(cache_dir=tiny_cache), "live": tiny_config(feed="live"),
            "live-dropout": tiny_config(feed="live", text_encoder_dropout=True), "fft-text": tiny_config(
                method="fft", towers="text", modality="intra")}
    said = {name: train(cfg.replace(run_name=name, epochs=1, max_steps_per_epoch=1))["step"]["encoder_dropout"]
            for name, cfg in runs.items()}
    assert said == {"cached": [], "live": [], "live-dropout": ["text"], "fft-text": ["text"]}


def test_the_benchmark_counts_both_row_lists_and_says_what_they_are(tiny_config, monkeypatch, tmp_path):
    """An FFT row: items and rows per step for the towers per slot and for the ViT per item, FLOPs below those
    of every tower per slot, and the table and its notes say which is which."""
    from iisan.efficiency.bench import measure_training, training_setup
    from iisan.efficiency.figures import training_line
    from iisan.efficiency.report_notes import layout_notes
    from iisan.train import plan

    cfg = tiny_config(method="fft", batch_size=16, static_shapes=False)
    out = measure_training(cfg, warmup=1, steps=2)
    hosts = [b for b, _ in zip(training_setup(cfg).host_batches(), range(3))][1:]  # the two timed batches
    assert out["encodes"] == "every slot with an item; image: distinct items" and out["towers_by_item"] == ["image"]
    assert out["items_per_step"] == pytest.approx(np.mean([int((b.seq != 0).sum()) for b in hosts]))
    distinct = [len(np.unique(b.seq.numpy())) - 1 for b in hosts]  # the padding item is no item
    assert out["distinct_items_per_step"] == pytest.approx(np.mean(distinct))
    assert out["distinct_items_per_step"] < out["items_per_step"]
    assert out["distinct_rows_per_step"] == pytest.approx(np.mean(distinct))  # no static shapes: no padding rows
    assert out["distinct_padding_overhead_items"] == 0
    line = training_line({"label": "FFT", **out}, gpu=False, columns=15)
    assert f"| {out['items_per_step']:.0f} / {np.mean(distinct):.0f} |" in line and "(by item: rows +0 %) |" in line
    # a hand-edited JSON with one count of the pair: one line naming the other, not a KeyError
    import json

    from iisan.efficiency.report_checks import read_benchmark
    from iisan.errors import DataError

    from .test_bench_outputs import benchmark_payload

    payload = benchmark_payload()
    payload["rows"][0]["distinct_items_per_step"] = 110.0
    (path := tmp_path / "b.json").write_text(json.dumps(payload))
    with pytest.raises(DataError, match=r"rows\[0\] \(\w+\)\.distinct_rows_per_step is missing beside "
                                        "distinct_items_per_step"):
        read_benchmark(path)
    (said,) = [n for n in layout_notes([{"label": "FFT", **out}]) if n.startswith("Encodes")]
    assert "the image tower drops nothing out, so it runs on each distinct item once" in said
    monkeypatch.setattr(plan, "per_item_towers", lambda encoding, model: ())
    per_slot = measure_training(cfg, warmup=1, steps=2)
    assert per_slot["encodes"] == "every slot with an item" and "towers_by_item" not in per_slot
    assert out["flops_per_step"] < per_slot["flops_per_step"]


def test_stochastic_depth_counts_as_dropping_out():
    """DINOv2 with drop_path_rate > 0 draws a DropPath mask per row (its drop_prob, neither a Dropout nor a
    float named dropout): such a tower keeps a row per slot; at its published rate of 0 it has none."""
    from transformers import Dinov2Config, Dinov2Model

    from iisan.train.plan import drops_out

    def tower(rate: float):
        model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=20, image_size=28, patch_size=14, drop_path_rate=rate))
        return model.train()

    assert any(drops_out(m) for m in tower(0.2).modules())
    assert not any(drops_out(m) for m in tower(0.0).modules())
    assert not any(drops_out(m) for m in tower(0.2).eval().modules())
