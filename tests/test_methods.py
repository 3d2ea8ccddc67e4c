"""Every method of METHOD_TABLE (IISAN in both feeds) on tiny models: shapes, finiteness, which parameters
move, identity at start, checkpoint round trip; cached and uncached feeds give the same loss; bad targets
and OOM messages."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iisan.config import Config
from iisan.data.run_data import load_data
from iisan.errors import TargetError, TrainingError
from iisan.methods import METHOD_DEFAULTS, METHOD_NAMES, METHOD_TABLE, METHODS
from iisan.model.baselines import APPLY, apply_method
from iisan.model.build import build_model
from iisan.model.item_encoder import ItemEncoder, LrGroup
from iisan.model.peft_methods import added_parameters, apply_adapters, apply_lora
from iisan.train.optim import LR_OF_GROUP, make_optimizer, optimizer_groups
from iisan.train.step import make_train_step
from iisan.train.weights import load_weights, save_weights

from ._batches import first_epoch

# Every method of METHOD_TABLE that encodes items, IISAN in both feeds (SASRec-ID: test_id_method.py). Taken
# from the table, not from the benchmark's settings: a method added there is tested here without joining the
# paper's efficiency table (whose TPME it would change).
SETTINGS = {name: {"method": name} for name, method in METHOD_TABLE.items() if method.kind == "baseline"} | {
    f"{name}-{feed}": {"method": name, "feed": feed} for name, method in METHOD_TABLE.items() if method.kind == "san"
    for feed in ("live", "cached")}


def declared_trainable(name: str, method: str) -> bool:
    """What each method is documented to train, written from the method's definition."""
    if not name.startswith("item_encoder.encoders.") and not name.startswith("item_encoder.states."):
        return True  # SASRec, heads, com_dense, SAN
    if method == "fft":
        return ".pooler." not in name
    if method == "bitfit":
        return name.endswith("bias") and ".pooler." not in name
    if method == "adapter":
        return ".adapter." in name
    if method == "lora":
        return ".lora_A." in name or ".lora_B." in name
    if method == "iisan":
        return False  # backbones frozen
    raise AssertionError(f"method {method!r} is in METHOD_TABLE: write what it trains into declared_trainable")


def test_every_method_is_a_case_of_the_trainable_parameter_test():
    """Every method of ``METHOD_TABLE`` is exercised below; the benchmark's paper settings are among them."""
    from iisan.efficiency.rows import TABLE_METHODS as PAPER

    covered = {values["method"] for values in SETTINGS.values()} | {"id"}  # id: test_id_method.py
    assert covered == set(METHODS) and all(v in SETTINGS.values() for v in PAPER.values())


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_setting_trains_only_declared_parameters_and_round_trips(setting, tiny_config, tiny_cache, tmp_path):
    cfg = tiny_config(cache_dir=tiny_cache, **SETTINGS[setting])
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    for name, p in model.named_parameters():
        assert p.requires_grad == declared_trainable(name, cfg.method), name
    assert isinstance(model.item_encoder, ItemEncoder)
    assert model.cache_dtypes() == ({"text": "float32", "image": "float32"} if cfg.cached else {})
    groups = optimizer_groups(model, cfg)
    assert all(type(g["name"]) is str for g in groups)  # plain strings in checkpoints, as before LrGroup
    assert [g["name"] for g in groups] == [k for k in model.param_groups() if k in {g["name"] for g in groups}]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    added = {id(p) for modules in getattr(model.item_encoder, "added", {}).values() for p in added_parameters(modules)}
    for name, p in model.named_parameters():  # the authors' learning-rate groups of a trained backbone
        if p.requires_grad and name.startswith("item_encoder.encoders."):
            modality = name.split(".")[2]
            backbone = "image_net" if modality == "image" else "text_encoder"
            assert group_of[id(p)] == (f"adapter_{modality}" if id(p) in added else backbone), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = make_train_step(model, make_optimizer(model, cfg, torch.device("cpu")), None, torch.device("cpu"))
    model.train()
    for i, batch in enumerate(first_epoch(data.train_sequences(), 0, pixels=pixels)):
        loss = step(batch)
        assert loss.shape == () and torch.isfinite(loss)
        if i == 2:
            break
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not move"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    # item embeddings: shape and finiteness
    model.eval()
    from iisan.data.batches import ItemBatch

    ids = torch.tensor([0, 1, 2, 3])
    items = ItemBatch(ids, pixels(ids.numpy()) if pixels is not None else None)
    with torch.no_grad():
        emb = model.item_encoder(items)
    assert emb.shape == (4, 64) and torch.isfinite(emb).all()
    # checkpoint round trip into a fresh model
    save_weights(model, tmp_path / "w.safetensors", cfg)
    torch.manual_seed(1)
    fresh, _ = build_model(cfg, data, torch.device("cpu"))
    load_weights(fresh, tmp_path / "w.safetensors")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.item_encoder(items), emb)


def test_the_method_table_gives_the_names_and_defaults_every_module_reads():
    assert METHODS == ("iisan", "fft", "adapter", "lora", "bitfit", "id")
    assert METHOD_NAMES == {"iisan": "IISAN", "fft": "FFT", "adapter": "Adapter", "lora": "LoRA", "bitfit": "BitFit",
                            "id": "SASRec-ID"}
    assert list(METHOD_DEFAULTS) == list(METHODS)
    assert METHOD_DEFAULTS["iisan"] == {"batch_size": 64, "lr": 2e-4, "lr_image": 1e-4, "lr_text": 5e-5,
                                        "lr_adapter_image": 1e-4, "lr_adapter_text": 1e-4}
    assert {m: d["batch_size"] for m, d in METHOD_DEFAULTS.items()} == {
        "iisan": 64, "fft": 32, "adapter": 32, "lora": 32, "bitfit": 32, "id": 64}
    assert all(m.kind in ("san", "baseline", "id") and name == m.name for name, m in METHOD_TABLE.items())
    assert Config.__dataclass_fields__["method"].metadata["choices"] == METHODS


def test_every_baseline_and_nothing_else_has_an_apply_function():
    assert set(APPLY) == {name for name, m in METHOD_TABLE.items() if m.kind == "baseline"}
    for name, m in METHOD_TABLE.items():
        if m.kind != "baseline":
            with pytest.raises(ValueError, match=f"^{name} is not a baseline$"):
                apply_method(None, Config(method=name), "text")


def test_what_a_side_network_gets_is_asked_of_its_kind_not_of_iisans_name():
    """A second side-network method (a METHOD_TABLE row of kind san) gets what IISAN gets (a cache, modalities,
    DDP without the unused-parameter search, its modality in messages): no module compares a method with
    'iisan' by name. (Entry scripts and presets may name it: they run IISAN itself.)"""
    import ast

    from iisan.methods import side_network

    assert [m for m in METHODS if side_network(m)] == ["iisan"] and not side_network("no-such-method")
    by_name = []
    for path in sorted((Path(__file__).parents[1] / "iisan").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and "method" in (text := ast.unparse(node)) and "'iisan'" in text:
                by_name.append(f"{path.name}:{node.lineno}: {text}")
    assert by_name == []


def test_lr_groups_are_the_authors_names_each_set_by_one_config_key():
    assert [str(g) for g in LrGroup] == ["recsys", "image_net", "text_encoder", "adapter_image", "adapter_text"]
    assert LrGroup.RECSYS == "recsys" and f"{LrGroup.IMAGE}" == "image_net" and {"text_encoder": 1}[LrGroup.TEXT]
    assert LR_OF_GROUP == {"recsys": "lr", "image_net": "lr_image", "text_encoder": "lr_text",
                           "adapter_image": "lr_adapter_image", "adapter_text": "lr_adapter_text"}
    assert all(key in Config.__dataclass_fields__ for key in LR_OF_GROUP.values())


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_adapters_and_lora_start_as_the_identity(method, tiny):
    from iisan.model.backbones import load_image_encoder, load_text_encoder
    from iisan.model.inputs import tokenize_titles

    text = load_text_encoder(tiny["text_model"], (0, 1, 2))
    image = load_image_encoder(tiny["image_model"], (0, 1, 2, 3))
    ids, mask = tokenize_titles(text.tokenizer, ["blue lamp", "red chair and table"], 10)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_text = text.final_cls(input_ids=ids, attention_mask=mask)
        ref_image = image.final_cls(pixel_values=pixels)
    for encoder in (text, image):
        if method == "adapter":
            added = apply_adapters(encoder.model, 8, ["attention_output", "ffn_out"], init="identity")
        else:
            added = apply_lora(encoder.model, 4, 1.0, ["query", "value"])
        assert len(added) == 2 * encoder.depth
    with torch.no_grad():
        torch.testing.assert_close(text.final_cls(input_ids=ids, attention_mask=mask), ref_text)
        torch.testing.assert_close(image.final_cls(pixel_values=pixels), ref_image)


def test_lora_wraps_the_pretrained_weights_of_query_and_value(tiny):
    from iisan.model.backbones import load_image_encoder

    image = load_image_encoder(tiny["image_model"], (0, 1, 2, 3))
    q_name = [n for n, m in image.model.named_modules() if isinstance(m, torch.nn.Linear)][0]
    weight = image.model.get_submodule(q_name).weight.detach().clone()
    apply_lora(image.model, 4, 1.0, ["query", "value"])
    wrapped = image.model.get_submodule(q_name)
    assert torch.equal(wrapped.base_layer.weight, weight) and not wrapped.base_layer.weight.requires_grad
    assert wrapped.scaling["default"] == pytest.approx(1.0 / 4)
    layers = [m for m in image.model.modules() if hasattr(m, "lora_dropout")]  # no dropout on LoRA's input
    assert layers and all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)


def test_a_houlsby_adapter_adds_up_of_relu_of_down():
    from iisan.model.peft_methods import HoulsbyAdapter

    torch.manual_seed(0)
    adapter = HoulsbyAdapter(6, 3)
    with torch.no_grad():  # weights large enough that the ReLU cuts some pre-activations
        for p in adapter.parameters():
            p.normal_(std=1.0)
    y = torch.randn(4, 6)
    assert (adapter.down_proj(y) < 0).any()
    torch.testing.assert_close(adapter(y), y + adapter.up_proj(torch.relu(adapter.down_proj(y))))


def test_the_two_towers_random_lora_bases_come_from_two_seeds(tiny, monkeypatch):
    """--lora-random-base: text and image each draw their fresh Q/V from their own seed (run seed + 1 and
    run seed), so two towers of one width never get the same random weights."""
    from iisan.config import Config
    from iisan.model import baselines

    seeds = {}
    monkeypatch.setattr(baselines, "apply_lora", lambda *args, **kwargs: seeds.setdefault(args[4], args[6]) and [])
    cfg = Config(method="lora", lora_random_base=True, seed=5)
    for modality in ("text", "image"):
        baselines._apply_lora(torch.nn.Linear(2, 2), cfg, modality)
    assert seeds == {"text encoder": 6, "image encoder": 5}


def test_target_that_matches_nothing_lists_existing_modules(tiny):
    from iisan.model.backbones import load_text_encoder

    text = load_text_encoder(tiny["text_model"], (0, 1, 2))
    with pytest.raises(TargetError, match=r"target 'qkv' matches no module in the text encoder \(BertModel\); "
                                          r"roles: query, .*; Linear/Conv1D modules: dense, key, query, value"):
        apply_lora(text.model, 4, 1.0, ["qkv"], "text encoder")
    # a module-name suffix is accepted as well as a role
    assert len(apply_adapters(text.model, 4, ["value"])) == 2


def test_cached_and_uncached_feeds_give_the_same_loss(tiny_config, tiny_cache):
    cfg = tiny_config(cache_dir=tiny_cache)
    data = load_data(cfg)
    torch.manual_seed(0)
    cached, _ = build_model(cfg, data, torch.device("cpu"))
    live, pixels = build_model(cfg.replace(feed="live"), data, torch.device("cpu"))
    live.load_state_dict(cached.state_dict(), strict=False)
    cached.eval()
    live.eval()
    batch_cached = next(iter(first_epoch(data.train_sequences(), 3)))
    batch_live = next(iter(first_epoch(data.train_sequences(), 3, pixels=pixels)))
    with torch.no_grad():
        a, b = cached.calculate_loss(batch_cached), live.calculate_loss(batch_live)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_missing_image_in_lmdb_is_encoded_from_a_flagged_blank_and_counted(tiny_config, tiny, tmp_path, caplog):
    import logging

    from iisan.data.image_build import build_image_lmdb
    from iisan.data.interactions import read_items

    ids = read_items(tiny["items"]).ids
    partial = tmp_path / "partial.lmdb"
    build_image_lmdb(tiny["image_dir"], partial, ids[5:], size=64, progress=False)  # first five absent
    cfg = tiny_config(feed="live", images=str(partial))
    data = load_data(cfg)
    with caplog.at_level(logging.WARNING):
        model, pixels = build_model(cfg, data, torch.device("cpu"))
    absent = sum(i in ids[:5] for i in data.item_ids)
    assert f"{partial}: {absent} items have no image; they are encoded from a blank image" in caplog.text  # (no
    # "and 0 were stored as blanks")
    row = data.item_ids.index(next(i for i in data.item_ids if i in ids[:5]))
    assert (pixels([row]) == 0).all()


def test_an_lmdb_holding_none_of_the_items_is_refused_in_one_line(tiny_config, tiny, tmp_path):
    import shutil

    from iisan.data.image_build import build_image_lmdb
    from iisan.errors import ConfigError

    other = tmp_path / "other-images"
    other.mkdir()
    for n in range(3):  # another data set's images: ids this items file lacks
        shutil.copy(Path(tiny["image_dir"]) / "I0000000.jpg", other / f"X{n:07d}.jpg")
    build_image_lmdb(other, tmp_path / "other.lmdb", size=64, progress=False)
    cfg = tiny_config(feed="live", images=str(tmp_path / "other.lmdb"))
    with pytest.raises(ConfigError, match=rf"^images={tmp_path}/other.lmdb holds none of the \d+ items of "
                                          rf"{tiny['items']} \(e\.g\. I\d+\): give this data's LMDB"):
        build_model(cfg, load_data(cfg), torch.device("cpu"))


def test_out_of_memory_is_reported_with_batch_size_and_memory(tiny_config, tiny_cache, monkeypatch):
    import iisan.train.trainer as trainer

    def exploding_step(*args, **kwargs):
        def step(batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has ...")
        step.scaler, step.mode = None, "off"  # what make_train_step promises beside the call
        return step

    monkeypatch.setattr(trainer, "make_train_step", exploding_step)
    with pytest.raises(TrainingError, match=r"batch_size=16 does not fit on .*: the step needed 3.50 GiB"):
        trainer.train(tiny_config(cache_dir=tiny_cache))


@pytest.mark.parametrize("error, answered", [
    (RuntimeError("MPS backend out of memory (MPS allocated: 17.98 GB, other allocations: 2.1 MB, max allowed: "
                  "18.13 GB). Tried to allocate 256.00 MB on private pool."), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x3 and 4x5)"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False)])
def test_apple_mps_out_of_memory_is_answered_as_cudas_and_other_runtime_errors_pass(error, answered, tiny_config,
                                                                                     tiny_cache, monkeypatch):
    """MPS says it is out of memory as a plain RuntimeError, which went out as a traceback without the batch
    size hint that CUDA's torch.OutOfMemoryError gets."""
    import iisan.train.trainer as trainer

    def exploding_step(*args, **kwargs):
        def step(batch):
            raise error
        step.scaler, step.mode = None, "off"
        return step

    monkeypatch.setattr(trainer, "make_train_step", exploding_step)
    with pytest.raises(TrainingError if answered else RuntimeError) as raised:
        trainer.train(tiny_config(cache_dir=tiny_cache))
    if answered:
        assert re.fullmatch(r"batch_size=16 does not fit on CPU \(.*\): the step needed 256.00 MB on top of 0.00 GiB "
                            r"already allocated \(device has 0.0 GiB\); lower --batch-size", str(raised.value))
    else:
        assert raised.value is error


def test_apple_mps_is_named_waited_for_and_tagged_as_itself(monkeypatch):
    """An MPS run was recorded as a CPU's (results.json, train.log, benchmark rows), its benchmark file named as
    a CPU's, and its steps timed without waiting for the GPU's queue (their dispatch alone)."""
    from iisan.devices import device_name, sync
    from iisan.efficiency.benchmark import device_tag

    waited = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waited.append("mps"))
    sync(torch.device("mps"))
    sync(torch.device("cpu"))
    assert waited == ["mps"]
    name = device_name(torch.device("mps"))
    assert re.fullmatch(r"Apple MPS \(\w+, \d+ cores\)", name), name
    assert (device_tag(name), device_tag(device_name("cpu")), device_tag("NVIDIA H100 80GB HBM3")) == \
        ("mps", "cpu", "h100")


def test_device_auto_on_a_mac_says_once_that_mps_is_there_and_runs_on_the_cpu(monkeypatch, caplog):
    """--device auto on a Mac ran on the CPU without a word of the GPU beside it."""
    from iisan.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with caplog.at_level("INFO", logger="iisan.devices"):
        assert resolve_device("auto") == resolve_device("auto") == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == [
        "--device auto runs on the CPU; this Mac's GPU is there too: --device mps uses it (Apple MPS, not among the "
        "devices IISAN's tests run on)"]


def test_the_out_of_memory_line_on_apple_mps_gives_its_memory(monkeypatch):
    from iisan.train.step import out_of_memory_message

    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 18 * 2**30)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 3 * 2**29)
    line = out_of_memory_message(RuntimeError("MPS backend out of memory (...). Tried to allocate 64.00 MB on "
                                              "private pool."), 512, torch.device("mps"))
    assert re.fullmatch(r"batch_size=512 does not fit on Apple MPS \(.+, \d+ cores\): the step needed 64.00 MB on "
                        r"top of 1.50 GiB already allocated \(device has 18.0 GiB\); lower --batch-size", line)


@pytest.mark.parametrize("setting", ["fft", "iisan-live"])
def test_live_step_finds_real_items_on_the_host(setting, tiny_config, monkeypatch):
    """Batches carry the positions of their non-padding items, so a step never asks the device for
    them (``torch.nonzero`` on a GPU waits for the device, every step); the result is the same."""
    from iisan.data.batches import ItemBatch

    cfg = tiny_config(**SETTINGS[setting])
    data = load_data(cfg)
    torch.manual_seed(0)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    model.eval()  # no dropout: the two forwards below must match exactly
    batch = next(iter(first_epoch(data.train_sequences(), 0, pixels=pixels)))
    ids = batch.items.ids
    assert batch.items.real.tolist() == [i for i, item in enumerate(ids.tolist()) if item != 0]
    with torch.no_grad():
        looked_up = model.item_encoder(ItemBatch(ids, batch.items.pixels))  # real found by torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: pytest.fail("torch.nonzero called in the step"))
    with torch.no_grad():
        given = model.item_encoder(batch.items)
    assert torch.equal(given, looked_up)
    model.train()
    step = make_train_step(model, make_optimizer(model, cfg, torch.device("cpu")), None, torch.device("cpu"))
    assert torch.isfinite(step(batch))


class HostStalls(TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device: reading a value back
    (``.item()``, ``bool()``), data-dependent output sizes (``nonzero``, boolean masks, ``unique``) and
    tensors made from Python data (copied to the device from pageable memory, which waits for all
    queued work). On a CPU nothing waits, but the same ops run, so they can be caught here.

    transformers' own read-back, whether a text batch has any padding (``padding_mask.all()`` in
    ``masking_utils``, to drop the mask for flash attention), is gone too: BERT-family towers get their
    mask ready-made (``BackboneEncoder.model_inputs``)."""

    NAMES = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
             "lift_fresh", "lift_fresh_copy", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        boolean_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in self.NAMES or boolean_index:
            where = [f"{frame.filename}:{frame.lineno}" for frame in traceback.extract_stack()[-6:-1]]
            self.seen.append(f"{func} at {where[-1]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("static_shapes", [True, False])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_steps_never_make_the_host_wait_for_the_device(setting, static_shapes, tiny_config, tiny_cache):
    """After a first step (which may set things up), a training step of every setting, with static shapes
    and without, runs none of the ops that stall the host on a GPU, so the host queues the next work while
    the device computes. The batches are the trainer's (``batch_layout``)."""
    from iisan.train.plan import batch_layout

    cfg = tiny_config(cache_dir=tiny_cache, static_shapes=static_shapes, **SETTINGS[setting])
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    model.train()
    step = make_train_step(model, make_optimizer(model, cfg, torch.device("cpu")), None, torch.device("cpu"))
    dedup, buckets = batch_layout(cfg, "off", model)
    assert (buckets is not None) == (static_shapes and SETTINGS[setting].get("feed") != "cached")
    loader = first_epoch(data.train_sequences(), 0, dedup, pixels, buckets)
    first, *batches = [batch for batch, _ in zip(loader, range(3))]
    step(first)
    with HostStalls() as stalls:
        for batch in batches:
            step(batch)
    assert stalls.seen == []
