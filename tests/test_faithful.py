"""Every place this repository differs from the authors' code is a flag: each test switches one and
shows the behaviour change (the table in the README lists them with their defaults)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

from iisan.data.cache import cache_file, read_metadata
from iisan.data.run_data import load_data
from iisan.devices import amp_dtype
from iisan.errors import CacheError, ConfigError
from iisan.model.backbones import load_text_encoder
from iisan.model.build import build_model, layers_for
from iisan.model.caching import build_cache_from_config, cache_precision
from iisan.model.inputs import tokenize_for_pooling
from iisan.model.layer_rules import group_layers
from iisan.model.peft_methods import HoulsbyAdapter
from iisan.model.san import IntraSAN
from iisan.train.optim import make_optimizer
from iisan.train.plan import StepPlan, plan_step, use_compile
from iisan.train.step import make_train_step

from ._batches import first_epoch

ROOT = Path(__file__).resolve().parents[1]
TITLES = ["", "Red Lamp with a big shade", "blue chair", "Green table, small and round  "]


def _versa_script():
    path = ROOT / "Code_Cached" / "scripts" / "run_IISAN_Versa.py"
    spec = importlib.util.spec_from_file_location("run_IISAN_Versa_faithful", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- 1. Versa LLM pooling ---------------------------------------------------------------------------


def test_authors_llm_inputs_keep_case_pad_with_zero_and_mask_nothing(towers):
    enc = load_text_encoder(towers["llama48x6"], group_layers(6, 6), pooling="authors")
    ids, mask = tokenize_for_pooling(enc.tokenizer, TITLES, 40, "authors")
    ours, our_mask = tokenize_for_pooling(enc.tokenizer, TITLES, 40, "mean")
    assert mask.min() == 1  # no attention mask: every position is attended and averaged
    expected = enc.tokenizer("Red Lamp with a big shade", add_special_tokens=True)["input_ids"]  # as written
    assert ids[1, : len(expected)].tolist() == expected and ids[1, len(expected):].eq(0).all()  # pad id 0
    lower = enc.tokenizer("red lamp with a big shade", add_special_tokens=True)["input_ids"]
    assert expected != lower and ours[1, : int(our_mask[1].sum())].tolist() == lower  # ours: lower-cased
    trailing = enc.tokenizer("Green table, small and round", add_special_tokens=True)["input_ids"]
    assert ids[3, : len(trailing)].tolist() == trailing  # the authors' line strip drops trailing blanks


def test_authors_pooling_changes_when_padding_is_appended_and_ours_does_not(towers):
    for pooling, changes in (("authors", True), ("mean", False)):
        enc = load_text_encoder(towers["llama48x6"], group_layers(6, 6), pooling=pooling)
        # every title fits in 40 (the tokenizer is per letter); 48 adds 8 more padding tokens
        short = tokenize_for_pooling(enc.tokenizer, TITLES, 40, pooling)
        long = tokenize_for_pooling(enc.tokenizer, TITLES, 48, pooling)
        with torch.no_grad():
            a = enc.layer_states(input_ids=short[0], attention_mask=short[1])[1:]
            b = enc.layer_states(input_ids=long[0], attention_mask=long[1])[1:]
        assert (not torch.allclose(a, b, atol=1e-4)) == changes, pooling
        if pooling == "authors":  # the mean over all 40 positions of each selected hidden state
            with torch.no_grad():
                hidden = enc.model(input_ids=short[0], output_hidden_states=True).hidden_states
            torch.testing.assert_close(a[:, -1], hidden[enc.layers[-1]][1:].mean(1))


def test_a_cache_of_another_pooling_is_refused(tiny_config, towers, tmp_path):
    cfg = tiny_config(towers="text", text_model=towers["llama48x6"], cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg)  # auto: masked mean for a decoder
    assert read_metadata(cache_file(cfg.cache_dir, "text"))["pooling"] == "mean"
    with pytest.raises(CacheError, match=r"pooling mean \(config asks for authors\)"):
        build_model(cfg.replace(text_pooling="authors"), load_data(cfg), torch.device("cpu"))


# --- 2. precision -------------------------------------------------------------------------------------


def test_cache_precision_defaults_to_the_authors_fp32_and_half_is_a_flag():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert cache_precision("auto", {fp32}, cuda) == (fp32, None)  # authors: fp32 encoders, no autocast
    assert cache_precision("float16", {fp32}, cuda) == (fp16, fp16)  # --cache-dtype float16: autocast
    assert cache_precision("auto", {bf16}, cuda) == (bf16, bf16)  # an LLM loaded in bf16 keeps its type
    assert cache_precision("float16", {fp32}, cpu) == (fp16, None)  # exact fp32 math on a CPU, then rounded


def test_cache_dtype_flag_sets_the_stored_precision_and_a_mismatch_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(towers="text", cache_dir=str(tmp_path / "c"), cache_dtype="float16")
    build_cache_from_config(cfg)
    assert read_metadata(cache_file(cfg.cache_dir, "text"))["dtype"] == "float16"
    data = load_data(cfg)
    for asked in ("float16", "auto"):  # the same precision is accepted; auto takes what is stored
        model, _ = build_model(cfg.replace(cache_dtype=asked), data, torch.device("cpu"))
        assert model.item_encoder.states.dtypes() == {"text": "float16"}
    with pytest.raises(CacheError, match=r"dtype float16 \(config asks for float32\)"):
        build_model(cfg.replace(cache_dtype="float32"), data, torch.device("cpu"))


def test_amp_fp16_trains_with_a_grad_scaler_and_bf16_without(tiny_config, tiny_cache):
    cfg = tiny_config(cache_dir=tiny_cache)
    model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"))
    cuda = torch.device("cuda")
    assert amp_dtype("fp16", cuda) == torch.float16 and amp_dtype("auto", cuda) == torch.bfloat16
    assert amp_dtype("fp16", torch.device("cpu")) is None  # CPU runs stay fp32
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    with warnings.catch_warnings():  # without CUDA, GradScaler warns that it disables itself
        warnings.simplefilter("ignore", UserWarning)
        fp16 = make_train_step(model, optimizer, torch.float16, cuda)
    assert isinstance(fp16.scaler, torch.amp.GradScaler)
    assert make_train_step(model, optimizer, torch.bfloat16, cuda).scaler is None
    # fp16 loss scaling syncs with the host, so the authors' precision runs eager, never as a CUDA graph
    assert use_compile(cfg.replace(amp="fp16"), cuda) == "off"
    assert use_compile(cfg, cuda) == "cudagraph"
    # the trainer and the benchmark plan steps alike; compile=auto stays eager under torchrun
    assert plan_step(cfg, cuda, model) == StepPlan(torch.bfloat16, "cudagraph", "all", None)
    assert plan_step(cfg, cuda, model, processes=2) == StepPlan(torch.bfloat16, "off", "items", None)
    assert plan_step(cfg.replace(compile="cudagraph"), cuda, model, processes=2).compiled == "cudagraph"
    assert plan_step(cfg, torch.device("cpu"), model) == StepPlan(None, "off", "items", None)


# --- 3. Houlsby adapters ------------------------------------------------------------------------------


def test_adapter_init_flag_switches_between_the_authors_and_the_identity(tiny_config):
    cfg = tiny_config(method="adapter")
    data = load_data(cfg)
    for init in ("authors", "identity"):
        torch.manual_seed(0)
        model, _ = build_model(cfg.replace(adapter_init=init), data, torch.device("cpu"))
        adapters = [m for m in model.modules() if isinstance(m, HoulsbyAdapter)]
        assert adapters
        up = torch.cat([a.up_proj.weight.flatten() for a in adapters])
        down = torch.cat([a.down_proj.weight.flatten() for a in adapters])
        assert down.std().item() == pytest.approx(0.01, rel=0.1)
        if init == "authors":
            assert up.std().item() == pytest.approx(0.01, rel=0.1)  # the authors' N(0, 0.01^2)
        else:
            assert up.abs().max() == 0  # the identity at start
    assert HoulsbyAdapter(768, 64).up_proj.weight.std().item() == pytest.approx(0.01, rel=0.05)


# --- 4. Versa presets ----------------------------------------------------------------------------------


def test_versa_presets_follow_the_authors_scripts_and_flags_switch_back():
    from iisan.experiments.sweep import parse_script_args

    versa = _versa_script()

    def parse(argv):
        (point,), _ = parse_script_args(versa.defaults_for(argv), versa.SWEEP, argv,
                                        extra_arguments=versa.extra_arguments)
        return point.config

    cfg = parse(["--preset", "llama3-8b+vit-base"])
    assert cfg.text_layers == (0, 2, 8, 14, 20, 26, 32)  # authors' blocks 1,7,...,31, +1, with state 0
    assert cfg.text_pooling == "authors"
    assert group_layers(32, 6) == (0, 5, 11, 16, 21, 27, 32)  # what --layer-rule groups would read
    assert parse(["--preset", "llama3-8b+vit-base", "--text-layers", "0,5,11,16,21,27,32"]).text_layers == \
        group_layers(32, 6)
    assert parse(["--preset", "llama3-70b+vit-base", "--text-pooling", "mean"]).text_pooling == "mean"
    assert parse(["--preset", "microlens", "--dataset", "MicroLens"]).san_heads == "versa"  # width -> 64 -> 64
    assert parse(["--preset", "microlens", "--dataset", "MicroLens", "--san-heads", "iisan"]).san_heads == "iisan"


def test_automatic_layers_follow_the_authors_lists_at_every_depth(tiny_config):
    """--layer-rule stride (the default) picks the authors' hidden states for each depth their scripts
    list (the comments of Code_Cached_Asym/script/run_IISAN_*.py; for 24 layers, the last of the three
    lists their BERT-large script offers); --layer-rule groups picks the last of equal runs, which agrees
    on 12 and 24 layers only."""
    from iisan.model.build import layers_for
    from iisan.model.layer_rules import stride_layers

    authors = {12: (0, 2, 4, 6, 8, 10, 12), 24: (0, 4, 8, 12, 16, 20, 24), 28: (0, 3, 8, 13, 18, 23, 28),
               32: (0, 2, 8, 14, 20, 26, 32), 48: (0, 3, 12, 21, 30, 39, 48), 80: (0, 5, 20, 35, 50, 65, 80)}
    cfg = tiny_config()
    assert cfg.layer_rule == "stride"
    for depth, layers in authors.items():
        assert stride_layers(depth, 6) == layers_for(cfg, "text", depth) == layers, depth
        assert (layers_for(cfg.replace(layer_rule="groups"), "image", depth) == layers) is (depth in (12, 24))
    assert layers_for(cfg.replace(layer_groups=3), "text", 32) == (0, 2, 17, 32)
    assert stride_layers(4, 6) == (0, 1, 2, 3, 4) and stride_layers(5, 1) == (0, 5)
    assert stride_layers(12, 6, include_embedding=False) == (2, 4, 6, 8, 10, 12)


# --- 5. the ablation without the embedding state ------------------------------------------------------


def test_without_the_embedding_state_the_chain_starts_from_it_or_from_zeros(tiny_config):
    cfg = tiny_config(include_embedding_state=False)
    assert layers_for(cfg, "text", 12) == (0, 2, 4, 6, 8, 10, 12)  # state 0 read: it starts the chain
    assert layers_for(cfg.replace(intra_start="zeros"), "text", 12) == (2, 4, 6, 8, 10, 12)
    assert layers_for(tiny_config(), "text", 12) == (0, 2, 4, 6, 8, 10, 12)  # default: state 0 feeds a block

    torch.manual_seed(0)
    states = torch.randn(5, 7, 16)  # (items, states, width); state 0 = the embedding output
    seeded = IntraSAN(16, 7, 4, seeded=True)
    assert len(seeded.blocks) == 6 and seeded.gate_logits.shape == (6,)  # authors: 6 blocks, 6 gates
    with torch.no_grad():
        for block in seeded.blocks:
            block.up_proj.weight.normal_()  # far from the identity, so the start state matters
        s = states[:, 0]  # the authors' remove_first branch: hidden_states_last = hidden_states[0]
        for k, block in enumerate(seeded.blocks):
            s = block(0.5 * states[:, k + 1] + 0.5 * s)  # gates start at sigmoid(0) = 0.5
        torch.testing.assert_close(seeded(states), s)
        zeros = IntraSAN(16, 6, 4)
        zeros.load_state_dict(seeded.state_dict())
        assert not torch.allclose(zeros(states[:, 1:]), s)  # from zeros: another function of the same states


def test_explicit_layers_are_read_as_listed_and_only_a_seeded_chain_starts_from_the_first(tiny_config, tiny_cache):
    """``--text-layers 1,2`` prepends no state 0 (the flags' help says so): each state listed feeds a block, but
    with --no-include-embedding-state (intra_start embedding) the first listed starts the chain instead."""
    data = load_data(tiny_config())
    base = tiny_config(cache_dir=tiny_cache, towers="text", modality="intra", text_layers=(1, 2))
    blocks = {}
    for name, changes in {"default": {}, "zeros": {"include_embedding_state": False, "intra_start": "zeros"},
                          "seeded": {"include_embedding_state": False}}.items():
        cfg = base.replace(**changes)
        assert layers_for(cfg, "text", 2) == (1, 2)
        tower = build_model(cfg, data, torch.device("cpu"))[0].item_encoder.tower
        blocks[name] = (len(tower.intra["text"].blocks), tower.intra["text"].seeded)
    assert blocks == {"default": (2, False), "zeros": (2, False), "seeded": (1, True)}


def test_seeded_chains_keep_the_authors_block_counts(tiny_config, tiny_cache):
    data = load_data(tiny_config())
    seeded = tiny_config(include_embedding_state=False, cache_dir=tiny_cache)
    model, _ = build_model(seeded, data, torch.device("cpu"))
    tower = model.item_encoder.tower
    depth = len(layers_for(seeded, "text", 2))  # the tiny BERT: states 0, 1, 2 all read
    assert depth == 3
    assert [len(tower.intra[m].blocks) for m in ("text", "image")] == [2, len(layers_for(seeded, "image", 3)) - 1]
    assert len(tower.inter.blocks) == min(len(tower.intra["text"].blocks), len(tower.intra["image"].blocks))
    with pytest.raises(ConfigError, match="at least two states"):
        build_model(seeded.replace(feed="live", text_layers=(2,), image_layers=(3,)), data, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_fp16_scales_the_loss_and_the_default_cache_is_exact_fp32(tiny_config, tiny_cache, tmp_path):
    from iisan.data.cache import CacheExpectation, load_cache

    cuda = torch.device("cuda")
    cfg = tiny_config(cache_dir=tiny_cache, amp="fp16")
    data = load_data(cfg)
    model, _ = build_model(cfg, data, cuda)
    step = make_train_step(model, make_optimizer(model, cfg, cuda), amp_dtype(cfg.amp, cuda), cuda)
    assert step.scaler is not None and step.scaler.is_enabled()
    model.train()
    for i, batch in enumerate(first_epoch(data.train_sequences(), 0)):
        assert torch.isfinite(step(batch.to(cuda)))
        if i == 3:
            break
    assert step.scaler.get_scale() > 1  # the loss was scaled (65536 at start, halved on overflow)
    # the default cache on a GPU: fp32 encoders, no autocast, fp32 storage: the CPU's fp32 cache to 1e-5
    gpu = cfg.replace(device="cuda", cache_dir=str(tmp_path / "gpu"))
    build_cache_from_config(gpu)
    for m in ("text", "image"):
        a, meta = load_cache(cache_file(gpu.cache_dir, m), CacheExpectation(), data.item_ids)
        b, _ = load_cache(cache_file(tiny_cache, m), CacheExpectation(), data.item_ids)
        assert meta["dtype"] == "float32"
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
