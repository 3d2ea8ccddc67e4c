"""Method ``id``: SASRec over learned item-ID embeddings, trained and evaluated like every other method,
with no encoder, cache or images."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from iisan.cli.main import main
from iisan.config import Config
from iisan.data.run_data import load_data
from iisan.errors import ConfigError
from iisan.model.build import build_model
from iisan.model.id_embedding import ItemIDEncoder
from iisan.model.item_encoder import ItemEncoder
from iisan.train.optim import make_optimizer, optimizer_groups
from iisan.train.step import make_train_step

from ._batches import first_epoch

SASREC = 100_224  # the authors' SASRec at 64-d, 2 blocks (authors_code: User_Encoder)


def _id_config(tiny, tmp_path, **overrides) -> Config:
    # no encoder, cache or image store exists at these paths: the method must not read them
    values = dict(method="id", users=tiny["users"], items=tiny["items"], text_model=str(tmp_path / "none"),
                  image_model=str(tmp_path / "none"), images="", cache_dir="", device="cpu", num_workers=0,
                  progress=False, out_dir=str(tmp_path / "runs"), run_name="id", batch_size=16, epochs=2)
    values.update(overrides)
    return Config(**values)


def test_id_model_is_a_table_and_sasrec_and_only_they_train(tiny, tmp_path):
    cfg = _id_config(tiny, tmp_path)
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    assert pixels is None and isinstance(model.item_encoder, ItemIDEncoder)
    assert isinstance(model.item_encoder, ItemEncoder)  # nothing to cut, no cache
    assert model.item_encoder.title_lengths() is None and model.cache_dtypes() == {}
    table = model.item_encoder.embedding.weight
    assert table.shape == (data.num_items + 1, 64) and table[0].abs().sum() == 0
    assert sum(p.numel() for p in model.parameters()) == (data.num_items + 1) * 64 + SASREC
    assert [g["name"] for g in optimizer_groups(model, cfg)] == ["recsys"]  # the table trains at lr
    before = table.detach().clone()
    step = make_train_step(model, make_optimizer(model, cfg, torch.device("cpu")), None, torch.device("cpu"))
    model.train()
    seen = set()
    for i, batch in enumerate(first_epoch(data.train_sequences(), 0)):
        assert torch.isfinite(step(batch))
        seen.update(batch.items.ids.tolist())
        if i == 3:
            break
    moved = (table.detach() != before).any(1)
    assert not moved[0] and table[0].abs().sum() == 0  # padding never trains
    assert moved[sorted(seen - {0})].all()  # every item of the batches moved (in-batch negatives included)


def test_run_sasrec_id_script_trains_on_the_demo_data(tiny, tmp_path):
    path = Path(__file__).resolve().parents[1] / "Code_Cached" / "scripts" / "run_SASRec_ID.py"
    spec = importlib.util.spec_from_file_location("run_SASRec_ID", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from iisan.experiments.sweep import run_script

    argv = ["--users", tiny["users"], "--items", tiny["items"], "--epochs", "2", "--batch-size", "16",
            "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--no-progress", "--num-workers", "0"]
    (results,) = run_script({"method": "id"}, script.SWEEP, argv, script.__doc__)  # = run_method("id", ...)
    assert results["method"] == "SASRec-ID" and len(results["epochs"]) == 2
    assert results["config"]["method"] == "id" and results["config"]["lr"] == 2e-4  # the paper's recsys lr
    assert all(math.isfinite(e["loss"]) for e in results["epochs"])
    from iisan.experiments.trained import evaluate, load_run

    again = evaluate(load_run(results["run_dir"], "cpu"), "test")
    assert again == pytest.approx(results["test"], abs=1e-9)  # the reported numbers are the best weights'


def test_params_for_id_counts_the_table_and_needs_the_data(tiny, tmp_path, capsys):
    data = load_data(_id_config(tiny, tmp_path))
    main(["params", "--method", "id", "--users", tiny["users"], "--items", tiny["items"]])
    assert f"trainable params: {(data.num_items + 1) * 64 + SASREC:,} ||" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="method id needs the data set"):
        build_model(_id_config(tiny, tmp_path), None, torch.device("cpu"))


def test_a_left_padded_history_reads_nothing_of_the_padding(tiny, tmp_path):
    """Padding slots are masked as keys (the user encoder reads only real items) and never targets: the loss
    of a batch with left padding is the same whatever the padding row holds (a mask shifted by one slot let
    the slot before each first item be read)."""
    cfg = _id_config(tiny, tmp_path)
    data = load_data(cfg)
    torch.manual_seed(0)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    model.eval()
    batch = next(iter(first_epoch(data.train_sequences(), 0)))
    assert (batch.seq[:, 0] == 0).any() and (batch.seq[:, -1] != 0).all()  # some users are left-padded
    with torch.no_grad():
        before = model.calculate_loss(batch)
        model.item_encoder.embedding.weight[0].normal_(std=5.0)
        after = model.calculate_loss(batch)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_a_step_is_forward_backward_update_and_fresh_gradients(tiny, tmp_path):
    """Two steps give the weights of two hand-written steps (loss, backward, Adam, gradients cleared):
    the second step's update uses its own gradients, not the sum of both batches'."""
    import copy

    cfg = _id_config(tiny, tmp_path)
    data = load_data(cfg)
    cpu = torch.device("cpu")
    model, _ = build_model(cfg, data, cpu)
    reference = copy.deepcopy(model)
    step = make_train_step(model, make_optimizer(model, cfg, cpu), None, cpu)
    optimizer = make_optimizer(reference, cfg, cpu)
    model.train(), reference.train()
    batches = iter(first_epoch(data.train_sequences(), 0))
    for seed, batch in enumerate((next(batches), next(batches))):
        torch.manual_seed(seed)  # the same dropout masks in both
        loss = step(batch)
        assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step
        torch.manual_seed(seed)
        expected = reference(batch)
        expected.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for (name, trained), by_hand in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(trained, by_hand, atol=1e-6), name
