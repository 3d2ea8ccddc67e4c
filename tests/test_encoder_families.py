"""Encoders beyond BERT and ViT, as a researcher plugs them in: DistilBERT under the Adapter baseline (its
attention-probability dropout is not a branch's output dropout), CLIP's causal text tower (mean pooling,
not its first token), the architecture check of ``iisan params``, and one seed giving cached and live
IISAN the same starting weights (loading encoders leaves the random stream as it was)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

from iisan.data.run_data import load_data
from iisan.errors import EncoderError
from iisan.model.backbones import architecture, load_text_encoder
from iisan.model.build import build_model, load_encoders
from iisan.model.peft_methods import apply_adapters, moved_dropouts, resolve_targets

from .conftest import six_groups


def saved(model, folder, tokenizer_from=None):
    if tokenizer_from is not None:
        shutil.copytree(tokenizer_from, folder)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    model.save_pretrained(folder)
    return str(folder)


def test_distilbert_adapters_keep_its_attention_dropout_and_train(tiny):
    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                             max_position_embeddings=32))
    outputs = resolve_targets(model, ["attention_output", "ffn_out"], flag="--lora-targets")
    # out_lin has no dropout after it (its sibling drops attention probabilities); lin2's FFN dropout moves
    assert moved_dropouts(model, outputs) == {f"transformer.layer.{i}.ffn.lin2": f"transformer.layer.{i}.ffn.dropout"
                                              for i in range(2)}
    apply_adapters(model, 8, ["attention_output", "ffn_out"])
    assert isinstance(model.transformer.layer[0].attention.dropout, torch.nn.Dropout)
    model.train()
    hidden = model(input_ids=torch.randint(0, 100, (3, 7))).last_hidden_state  # failed: Identity has no .p
    hidden.sum().backward()
    assert hidden.shape == (3, 7, 32)


def test_clip_text_tower_pools_the_mean_and_its_first_token_is_warned(towers, tmp_path, caplog):
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=64, eos_token_id=0, bos_token_id=0,
                            pad_token_id=1)
    folder = saved(CLIPTextModel(config), tmp_path / "cliptext", tokenizer_from=towers["llama48x6"])
    layers = six_groups(folder, "text")
    assert load_text_encoder(folder, layers).pooling == "mean"  # causal: the first token sees only itself
    with caplog.at_level(logging.WARNING, logger="iisan"):
        assert load_text_encoder(folder, layers, pooling="cls").pooling == "cls"
    assert any("looks like a causal decoder" in r.getMessage() for r in caplog.records)


def test_params_refuses_an_architecture_loading_refuses(tmp_path):
    roberta = saved(RobertaModel(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32)), tmp_path / "roberta")
    with pytest.raises(EncoderError, match=r"image encoder '.*roberta' is a 'roberta' model, which IISAN cannot "
                                           r"use as the image tower; supported: clip, clip_vision_model, deit"):
        architecture(roberta, "image")
    assert architecture(roberta, "text").config.model_type == "roberta"


def test_loading_encoders_leaves_the_random_stream_as_it_was(tiny_config, tiny_cache):
    cfg = tiny_config(cache_dir=tiny_cache)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_encoders(cfg)
    assert torch.equal(torch.rand(3), expected)
    data = load_data(cfg)
    weights = {}
    for feed in ("cached", "live"):
        torch.manual_seed(7)
        model, _ = build_model(cfg.replace(feed=feed), data, torch.device("cpu"))
        weights[feed] = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert weights["cached"].keys() == weights["live"].keys()
    for name, value in weights["cached"].items():  # the same trained weights at the start, for one seed
        assert torch.equal(value, weights["live"][name]), name


def test_module_name_targets_reach_a_grouped_query_llm_block(towers):
    """Qwen2's blocks under grouped-query attention have no BERT/ViT shape (k/v narrower than q): roles
    cannot be found there, but the module names the help offers as targets still work. With as many key
    and value heads as queries, its gated MLP alone leaves the attention roles to be found."""
    from transformers import AutoConfig, AutoModel

    from iisan.errors import TargetError
    from iisan.model.peft_methods import apply_lora

    def qwen():
        config = AutoConfig.from_pretrained(towers["qwen2_40x3"])
        config.num_key_value_heads = 1  # of 2 query heads
        torch.manual_seed(0)
        return AutoModel.from_config(config)

    with pytest.raises(TargetError, match="cannot tell attention and FFN projections apart"):
        resolve_targets(qwen(), ["query"], flag="--lora-targets")
    full = AutoModel.from_pretrained(towers["qwen2_40x3"])
    assert [n.split(".")[-1] for n in resolve_targets(full, ["query", "value", "ffn_out"], flag="--lora-targets")] == \
        ["q_proj"] * 3 + ["v_proj"] * 3 + ["down_proj"] * 3
    lora = qwen()
    apply_lora(lora, 4, 8, ["q_proj", "v_proj"])
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * 2 * 3 and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in trained)
    adapted = qwen()
    adapters = apply_adapters(adapted, 8, ["o_proj", "down_proj"])
    assert len(adapters) == 2 * 3
    adapted(input_ids=torch.randint(3, 300, (2, 5))).last_hidden_state.sum().backward()
    assert all(p.grad is not None for a in adapters for p in a.parameters())


def test_gpt2_conv1d_projections_take_lora_and_adapters_by_name(towers):
    """GPT-2 writes its projections as Conv1D (a Linear's weight transposed) and fuses query, key and value
    into c_attn: its modules are targets by name; LoRA starts as the identity and trains only A and B; roles,
    adapters after a dropout found by role, and the authors' random LoRA base are one-line errors."""
    from transformers import AutoModel

    from iisan.errors import TargetError
    from iisan.model.peft_methods import added_parameters, apply_lora

    def gpt2():
        torch.manual_seed(0)
        return AutoModel.from_pretrained(towers["gpt2_24x4"]).eval()

    tokens = torch.randint(3, 200, (2, 6))
    plain = gpt2()(input_ids=tokens).last_hidden_state
    lora = gpt2()
    layers = apply_lora(lora, 4, 8, ["c_attn"])
    assert len(layers) == 4 and {n for n, p in lora.named_parameters() if p.requires_grad} == {
        n for n, _ in lora.named_parameters() if ".c_attn.lora_" in n}
    assert len(added_parameters(layers)) == 2 * 4  # A and B of each block, not the Conv1D's weight or bias
    torch.testing.assert_close(lora(input_ids=tokens).last_hidden_state, plain)  # B = 0: the identity
    for layer in layers:  # with B moved, the update has the shape of the transposed Conv1D weight
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    lora(input_ids=tokens).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in added_parameters(layers))
    adapted = gpt2()
    adapters = apply_adapters(adapted, 8, ["attn.c_proj", "mlp.c_proj"], position="before_dropout")
    assert len(adapters) == 2 * 4 and adapters[0].up_proj.out_features == 24
    adapted(input_ids=tokens).last_hidden_state.sum().backward()
    assert all(p.grad is not None for a in adapters for p in a.parameters())
    with pytest.raises(TargetError, match=r"apart in h\.0 \(h\.0\.attn\.c_attn, .*modules by name instead of by role"):
        resolve_targets(gpt2(), ["query"], flag="--lora-targets")
    with pytest.raises(TargetError, match=r"by name instead of by role \(--lora-targets with some of its "
                                          r"Linear/Conv1D modules: c_attn, c_fc, c_proj; text:/image: prefixes for "
                                          r"one tower\)$"):
        apply_lora(gpt2(), 4, 8, ["query"])
    with pytest.raises(TargetError, match=r"by role \(--adapter-targets with some of its"):
        apply_adapters(gpt2(), 8, ["query"], position="before_dropout")
    with pytest.raises(TargetError, match="use --adapter-position before_dropout"):
        apply_adapters(gpt2(), 8, ["attn.c_proj", "mlp.c_proj"])
    with pytest.raises(TargetError, match="replaces Linear layers.* h.0.attn.c_attn is a Conv1D"):
        apply_lora(gpt2(), 4, 8, ["c_attn"], random_base=True)


def test_targets_after_a_tower_prefix_reach_that_tower_only(towers, tiny_config):
    """``text:c_attn,image:query,image:value``: GPT-2's fused projection in the text tower, the ViT's
    query and value by role in the image tower; a prefix that is not a tower, or a list that leaves a
    tower without targets, is an error naming the entry."""
    from iisan.errors import TargetError
    from iisan.model.baselines import tower_targets

    assert tower_targets("query, text:c_attn,image:fc2", "text", "lora_targets") == ["query", "c_attn"]
    assert tower_targets("query, text:c_attn,image:fc2", "image", "lora_targets") == ["query", "fc2"]
    with pytest.raises(TargetError, match="entry 'txt:c_attn': expected a role or module name"):
        tower_targets("txt:c_attn", "text", "lora_targets")
    with pytest.raises(TargetError, match="'text:c_attn' names nothing for the image tower"):
        tower_targets("text:c_attn", "image", "lora_targets")
    cfg = tiny_config(method="lora", feed="live", text_model=towers["gpt2_24x4"],
                      lora_targets="text:c_attn,image:query,image:value")
    model, _ = build_model(cfg, load_data(cfg), torch.device("cpu"))
    trained = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.item_encoder.encoders.named_parameters()
               if p.requires_grad}
    assert trained == {"c_attn", "q_proj", "v_proj"}  # transformers 5's ViT names its query q_proj


def test_roles_follow_the_projections_names_where_registration_order_does_not(towers):
    """CLIP registers k_proj, v_proj, q_proj, out_proj: roles by order put LoRA's default query,value on
    k_proj and q_proj. By their names they land where the roles say; ALBERT, whose one shared layer has no
    block list, takes role names that are its modules' names, and an after-dropout adapter says what works."""
    from transformers import AlbertConfig, AlbertModel, AutoModel

    from iisan.errors import TargetError
    from iisan.model.families import one_tower

    clip = one_tower(AutoModel.from_pretrained(towers["clip24x3"]), "image")
    named = resolve_targets(clip, ["query", "key", "value", "attention_output"], flag="--lora-targets")
    assert [n.split(".")[-1] for n in named[::3]] == ["q_proj", "k_proj", "v_proj", "out_proj"]  # block 0 of 3
    assert named[0].startswith("encoder.layers.0.") and len(named) == 4 * 3
    albert = AlbertModel(AlbertConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64))
    named = resolve_targets(albert, ["query", "value"], flag="--lora-targets")
    assert [n.split(".")[-1] for n in named] == ["query", "value"]
    with pytest.raises(TargetError, match=r"no list of 2 transformer blocks found; --adapter-position after_dropout "
                                          r"needs them .*: use --adapter-position before_dropout$"):
        apply_adapters(albert, 8, ["attention.dense", "ffn_output"])
    assert len(apply_adapters(albert, 8, ["attention.dense", "ffn_output"], position="before_dropout")) == 2


def test_bitfit_on_a_tower_without_biases_says_that_none_of_its_weights_trains(towers, caplog):
    """LLaMA's blocks hold no bias: BitFit leaves the whole tower frozen, which a warning says (the run
    still trains its heads and SASRec); BERT's biases train, without a word."""
    from iisan.config import Config
    from iisan.model.backbones import load_text_encoder
    from iisan.model.baselines import apply_method

    llama = load_text_encoder(towers["llama48x6"], (0, 6))
    with caplog.at_level("WARNING"):
        apply_method(llama, Config(method="bitfit"), "text")
    assert not any(p.requires_grad for p in llama.model.parameters())
    assert "bitfit: the text tower (llama) has no biases, so none of its weights trains" in caplog.text
    caplog.clear()
    bert = load_text_encoder(towers["bert32x2"], (0, 2))
    apply_method(bert, Config(method="bitfit"), "text")
    assert any(p.requires_grad for p in bert.model.parameters()) and "no biases" not in caplog.text


def test_bitfit_trains_the_biases_deberta_keeps_beside_its_fused_projection():
    """DeBERTa (v1) projects query, key and value by one bias-free ``in_proj`` and keeps the query and value
    biases as parameters of their own (``q_bias``, ``v_bias``): they stayed frozen without a word."""
    from transformers import DebertaConfig, DebertaModel

    from iisan.model.peft_methods import apply_bitfit

    model = DebertaModel(DebertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=32))
    apply_bitfit(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"encoder.layer.{i}.attention.self.{b}" for i in range(2) for b in ("q_bias", "v_bias")} <= trained
    assert all(n.endswith("bias") for n in trained) and "encoder.layer.0.attention.self.in_proj.weight" not in trained
    expected = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[2].endswith("bias"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected  # every bias, no weight


def test_adapter_targets_that_name_one_module_twice_wrap_it_once(towers):
    """``output.dense`` also ends ``attention.output.dense``: overlapping targets wrapped that module twice
    and the second wrap raised AttributeError (a traceback); LoRA took the same names already."""
    from iisan.model.backbones import load_text_encoder

    bert = load_text_encoder(towers["bert32x2"], (0, 2))
    names = resolve_targets(bert.model, ["attention_output", "ffn_out", "output.dense"], flag="--lora-targets")
    assert names == [f"encoder.layer.{i}.{m}" for m in ("attention.output.dense", "output.dense") for i in range(2)]
    assert len(apply_adapters(bert.model, 8, ["attention_output", "ffn_out", "output.dense"])) == 4


def test_fft_trains_every_weight_a_step_reads_and_no_unused_mask_token(towers):
    """DINOv2 keeps a mask_token for masked-image pretraining, which no step uses: FFT and BitFit leave it
    frozen (it would count as trainable and never get a gradient); every other weight trains under FFT."""
    from iisan.model.backbones import load_image_encoder
    from iisan.model.peft_methods import apply_fft

    enc = load_image_encoder(towers["dinov2_32x5"], (0, 5))
    apply_fft(enc.model)
    frozen = [n for n, p in enc.model.named_parameters() if not p.requires_grad]
    assert frozen == ["embeddings.mask_token"]
    enc.model.train()
    enc.final_cls(pixel_values=torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for n, p in enc.model.named_parameters() if p.requires_grad)
