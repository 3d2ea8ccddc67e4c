"""IISAN-Versa encoders: decoder LLMs and other vision transformers through AutoModel, pooling by hand,
padding invariance, precision, and one-line errors for encoders that cannot feed a SAN."""

from __future__ import annotations

import pytest
import torch

from iisan.cli.main import main
from iisan.errors import EncoderError
from iisan.model.backbones import BackboneEncoder, load_image_encoder, load_text_encoder, resolve_encoder_dtype
from iisan.model.inputs import pixels_to_input, tokenize_titles
from iisan.model.layer_rules import group_layers

from .conftest import BASELINES, six_groups

TITLES = ["", "Red lamp with a big shade", "blue chair", "Green table, small and round", "x"]


def _hidden(enc, ids, mask):
    with torch.no_grad():
        return enc.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("name,depth,width", [("llama48x6", 6, 48), ("qwen2_40x3", 3, 40),
                                              ("gpt2_24x4", 4, 24)])
def test_decoder_llm_pools_the_masked_mean_by_default(towers, name, depth, width):
    enc = load_text_encoder(towers[name], group_layers(depth, 6))
    assert (enc.depth, enc.width, enc.pooling) == (depth, width, "mean")
    assert enc.tokenizer.pad_token is not None and enc.tokenizer.padding_side == "right"  # GPT-2 ships no pad
    assert enc.layers == group_layers(depth, 6) and enc.dtype == torch.float32
    ids, mask = tokenize_titles(enc.tokenizer, TITLES, 16)
    assert mask[0].sum() == 0 and mask[1:].sum(1).min() > 0  # row 0 is the padding item
    with torch.no_grad():
        states = enc.layer_states(input_ids=ids, attention_mask=mask)  # (5, depth + 1, width)
    hidden = _hidden(enc, ids, mask)
    for row in range(1, len(TITLES)):
        n = int(mask[row].sum())  # right padding: real tokens are the first n
        for j, layer in enumerate(enc.layers):
            torch.testing.assert_close(states[row, j], hidden[layer][row, :n].mean(0))
    assert states[0].abs().sum() == 0  # no real token: zeros, not the padding's states


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("name", ["llama48x6", "qwen2_40x3", "gpt2_24x4"])
def test_decoder_pooled_state_ignores_appended_padding(towers, name, pooling):
    enc = load_text_encoder(towers[name], six_groups(towers[name], "text"), pooling=pooling)
    short = tokenize_titles(enc.tokenizer, TITLES, 32)
    long = tokenize_titles(enc.tokenizer, TITLES, 64)  # the same titles with 32 more padding tokens
    assert short[1].sum(1).max() < 32  # nothing truncated
    assert torch.equal(short[0], long[0][:, :32]) and long[1][:, 32:].sum() == 0
    with torch.no_grad():
        a = enc.layer_states(input_ids=short[0], attention_mask=short[1])
        b = enc.layer_states(input_ids=long[0], attention_mask=long[1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if pooling == "last":
        hidden = _hidden(enc, *short)
        n = int(short[1][2].sum())
        torch.testing.assert_close(a[2, -1], hidden[enc.layers[-1]][2, n - 1])
    # the authors' draft averaged over every position, padding included: that does move
    hidden_a, hidden_b = _hidden(enc, *short)[-1], _hidden(enc, *long)[-1]
    assert (hidden_a[1:].mean(1) - hidden_b[1:].mean(1)).abs().max() > 1e-3


@pytest.mark.parametrize("name,family,depth,width", [("vit24x3", "vit", 3, 24), ("deit40x4", "deit", 4, 40),
                                                     ("dinov2_32x5", "dinov2", 5, 32),
                                                     ("dinoreg16x2", "dinov2_with_registers", 2, 16),
                                                     ("clip24x3", "clip_vision_model", 3, 24)])
def test_image_towers_give_the_cls_of_each_selected_layer(towers, name, family, depth, width):
    enc = load_image_encoder(towers[name], group_layers(depth, 6))
    assert (enc.model.config.model_type, enc.depth, enc.width) == (family, depth, width)
    assert enc.norm["size"] == 32  # the crop side for DeiT/DINOv2/CLIP processors, not their resize side
    pixels = pixels_to_input(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8), enc.norm)
    with torch.no_grad():
        states = enc.layer_states(pixel_values=pixels)
        hidden = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert states.shape == (2, len(enc.layers), width) and len(hidden) == depth + 1
    for j, layer in enumerate(enc.layers):
        torch.testing.assert_close(states[:, j], hidden[layer][:, 0])


def test_group_layer_dropping_feeds_seven_blocks_from_any_depth():
    assert group_layers(32, 6) == (0, 5, 11, 16, 21, 27, 32)  # LLaMA-7B/8B
    assert group_layers(80, 6) == (0, 13, 27, 40, 53, 67, 80)  # LLaMA-3-70B
    assert group_layers(12, 6) == (0, 2, 4, 6, 8, 10, 12)  # ViT-B: IISAN's list


def test_half_checkpoints_load_in_fp32_on_cpu_and_in_their_own_precision_on_gpu(towers, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    half = tmp_path / "llama-bf16"
    AutoModel.from_pretrained(towers["llama48x6"]).to(torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(towers["llama48x6"]).save_pretrained(half)
    layers = six_groups(str(half), "text")
    assert load_text_encoder(str(half), layers).dtype == torch.float32  # transformers 5 alone would keep bf16
    assert resolve_encoder_dtype("auto", str(half), "text", torch.device("cpu")) == torch.float32
    assert resolve_encoder_dtype("auto", str(half), "text", torch.device("cuda")) == torch.bfloat16
    assert resolve_encoder_dtype("auto", towers["vit24x3"], "image", torch.device("cuda")) == torch.float32
    assert resolve_encoder_dtype("float16", towers["vit24x3"], "image", torch.device("cpu")) == torch.float16


class _NoHiddenStates(torch.nn.Module):
    """An encoder that ignores ``output_hidden_states`` (returns only its last state)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.embed(input_ids))


def test_encoder_without_hidden_states_is_one_line():
    from transformers import BertConfig

    model = _NoHiddenStates(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2))
    enc = BackboneEncoder(model, "text", (0, 2), "mean", name="no-states")
    with pytest.raises(EncoderError, match=r"^no-states returns no hidden states") as info:
        enc.layer_states(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3))
    assert "\n" not in str(info.value)


class _ProjectedLastState(_NoHiddenStates):
    """A tower whose last state is projected to another width (OPT-350m's word_embed_proj_dim)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        states = [self.embed(input_ids)] * self.config.num_hidden_layers
        return BaseModelOutput(last_hidden_state=states[-1][..., :4], hidden_states=(*states, states[-1][..., :4]))


class _ShortenedStates(_NoHiddenStates):
    """A tower that halves its sequence between blocks (Funnel Transformer)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        states = [self.embed(input_ids)[:, : input_ids.shape[1] // 2 ** k] for k in range(3)]
        return BaseModelOutput(last_hidden_state=states[-1], hidden_states=tuple(states))


@pytest.mark.parametrize("tower, name, said", [
    (_ProjectedLastState, "projected", r"hidden state 2 is 4 wide, not the config's 8; a SAN reads every state at one "
                                       r"width"),
    (_ShortenedStates, "funnel", r"hidden state 1 has 2 positions, state 0 4; every state is pooled over the same "
                                 r"positions"),
])
def test_states_of_another_width_or_length_are_one_line_not_a_stacking_or_pooling_traceback(tower, name, said):
    from transformers import BertConfig

    enc = BackboneEncoder(tower(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2)), "text", (0, 2),
                          "mean", name=name)
    with pytest.raises(EncoderError, match=f"^{name}: {said}"):
        enc.layer_states(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 4))


def test_encoder_without_hidden_states_from_the_command_line(tiny, tmp_path, capsys, request):
    """Through AutoModel and ``iisan cache``, as a user would meet it: an architecture IISAN does not list
    is refused before its weights are read; built directly, its missing states are one line too."""
    import shutil

    from transformers import AutoConfig, AutoModel, BertConfig, PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput

    class NoStatesConfig(BertConfig):
        model_type = "iisan_test_nostates"

    class NoStatesModel(PreTrainedModel):
        config_class = NoStatesConfig
        base_model_prefix = "nostates"

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, **kwargs):  # ignores output_hidden_states
            return BaseModelOutput(last_hidden_state=self.embed(input_ids))

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    # transformers' registry is global: registered here, removed again at the end of the test
    AutoConfig.register("iisan_test_nostates", NoStatesConfig)
    AutoModel.register(NoStatesConfig, NoStatesModel)
    request.addfinalizer(lambda: (CONFIG_MAPPING._extra_content.pop("iisan_test_nostates", None),
                                  MODEL_MAPPING._extra_content.pop(NoStatesConfig, None)))
    folder = tmp_path / "nostates"
    shutil.copytree(tiny["text_model"], folder)
    NoStatesModel(NoStatesConfig(vocab_size=500, hidden_size=8, num_hidden_layers=2)).save_pretrained(folder)
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--cache-dir", str(tmp_path / "c"),
              "--text-model", str(folder), "--towers", "text", "--modality", "intra", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any library warnings
    assert info.value.code == 2
    assert err.startswith(f"iisan: error: text encoder '{folder}' is a 'iisan_test_nostates' model, which IISAN "
                          "cannot use as the text tower; supported: albert, bert, ")
    model = AutoModel.from_pretrained(folder, trust_remote_code=False)
    encoder = BackboneEncoder(model, "text", (0, 1), name=str(folder))
    with pytest.raises(EncoderError, match=f"^{folder} returns no hidden states"):
        encoder.layer_states(input_ids=torch.ones(1, 3, dtype=torch.long))


def test_layer_list_beyond_an_encoders_depth_from_the_command_line(tiny, towers, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["cache", "--users", tiny["users"], "--items", tiny["items"], "--images", tiny["images"],
              "--cache-dir", str(tmp_path / "c"), "--text-model", towers["llama48x6"], "--image-model",
              towers["vit24x3"], "--image-layers", "0,2,4", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0
    assert err == f"iisan: error: image ({towers['vit24x3']}) layers [0, 2, 4] do not fit an encoder with " \
                  "3 layers (valid hidden-state indices are 0..3)"


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma", "gemma2", "phi3"])
def test_every_listed_decoder_family_gives_per_layer_states(towers, tmp_path, family):
    """The supported list is a claim: each decoder family it names (beyond the llama, qwen2 and gpt2 used
    above) loads through AutoModel and gives finite pooled states, tiny and random."""
    import shutil

    from transformers import AutoConfig, AutoModel

    from iisan.model.families import TEXT_DECODERS

    assert family in TEXT_DECODERS
    folder = tmp_path / family
    shutil.copytree(towers["llama48x6"], folder)  # its BPE tokenizer
    (folder / "model.safetensors").unlink()
    config = AutoConfig.for_model(family, vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=64,
                                  pad_token_id=1, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    encoder = load_text_encoder(str(folder), six_groups(str(folder), "text"))
    tokens, mask = tokenize_titles(encoder.tokenizer, ["a red lamp", "blue"], 8)
    with torch.no_grad():
        states = encoder.layer_states(input_ids=tokens, attention_mask=mask)
    assert states.shape == (2, 3, 32) and torch.isfinite(states).all() and encoder.pooling == "mean"
    hidden = _hidden(encoder, tokens, mask)
    for row in range(2):  # the masked mean of each layer's real tokens, as for llama, qwen2 and gpt2
        n = int(mask[row].sum())
        for j, layer in enumerate(encoder.layers):
            torch.testing.assert_close(states[row, j], hidden[layer][row, :n].mean(0))


def test_a_tower_with_registers_caches_what_it_runs_live_and_takes_lora_by_role(towers, tiny_config, tmp_path):
    """DINOv2 with registers puts 4 learned tokens between its CLS and the patches: the cache holds the
    live states (the CLS at position 0 of every selected layer), and LoRA finds query and value by role."""
    from iisan.model.backbones import load_image_encoder
    from iisan.model.caching import build_cache_from_config
    from iisan.model.peft_methods import resolve_targets

    from .conftest import cached_and_live_tables

    cfg = tiny_config(towers="image", modality="intra", image_model=towers["dinoreg16x2"],
                      cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg, dtype="float32")
    cached, live, _ = cached_and_live_tables(cfg, torch.device("cpu"))
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)
    tower = load_image_encoder(towers["dinoreg16x2"], (0, 2)).model
    named = resolve_targets(tower, ["query", "value"], flag="--lora-targets")
    assert [n.split(".")[-1] for n in named] == ["q_proj"] * 2 + ["v_proj"] * 2


def test_siglip_pools_the_mean_of_its_patches_and_caches_what_it_runs_live(towers, tiny_config, tmp_path):
    """SigLIP has no CLS token: each selected layer pools the mean over its patches, and the baselines'
    heads read the mean of its final, LayerNormed states (as transformers' SiglipForImageClassification
    pools them); its attention-pooling head, which nothing reads, is dropped as ViT's pooler is. The cache
    holds the live states, and LoRA finds query and value by role."""
    from iisan.data.cache import cache_file, read_metadata
    from iisan.model.caching import build_cache_from_config
    from iisan.model.peft_methods import resolve_targets

    from .conftest import cached_and_live_tables

    enc = load_image_encoder(towers["siglip24x3"], (0, 1, 3))
    assert (enc.model.config.model_type, enc.depth, enc.width, enc.pooling) == ("siglip_vision_model", 3, 24, "mean")
    assert enc.norm == {"mean": [0.5] * 3, "std": [0.5] * 3, "size": 32, "rule": "processor"}
    assert not [n for n, _ in enc.model.named_parameters() if n.startswith("head.")]
    pixels = pixels_to_input(torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8), enc.norm)
    with torch.no_grad():
        states = enc.layer_states(pixel_values=pixels)
        hidden = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        final = enc.final_cls(pixel_values=pixels)
    assert len(hidden) == 4 and hidden[0].shape == (2, 16, 24)  # 4 x 4 patches of 8 pixels, no CLS
    for j, layer in enumerate(enc.layers):
        torch.testing.assert_close(states[:, j], hidden[layer].mean(1))
    torch.testing.assert_close(final, enc.model.post_layernorm(hidden[3]).mean(1))
    named = resolve_targets(enc.model, ["query", "value"], flag="--lora-targets")
    assert [n.split(".")[-1] for n in named] == ["q_proj"] * 3 + ["v_proj"] * 3

    cfg = tiny_config(towers="image", modality="intra", image_model=towers["siglip24x3"],
                      cache_dir=str(tmp_path / "c"))
    build_cache_from_config(cfg, dtype="float32")
    assert read_metadata(cache_file(tmp_path / "c", "image"))["pooling"] == "mean"
    cached, live, _ = cached_and_live_tables(cfg, torch.device("cpu"))
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)


def test_a_whole_siglip_model_gives_its_vision_tower_and_is_no_text_tower(towers, tmp_path):
    """A SigLIP checkpoint of both towers (what the Hub's google/siglip-* hold) is an image tower by its
    vision model; its text tower (trained on titles padded to 64 tokens, pooled at the last) is refused."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from iisan.model.backbones import read_spec

    vision = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    folder = tmp_path / "siglip-both"
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    spec = read_spec(str(folder), "image")
    assert (spec.model_type, spec.depth, spec.width) == ("siglip_vision_model", 3, 24)
    enc = load_image_encoder(str(folder), (0, 3))
    assert type(enc.model).__name__ == "SiglipVisionModel" and enc.pooling == "mean"
    with pytest.raises(EncoderError, match=r"is a 'siglip' model, which IISAN cannot use as the text tower"):
        read_spec(str(folder), "text")


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_trains_a_siglip_tower(tiny_config, towers, method):
    """Each baseline finds its targets in SigLIP's blocks (CLIP's names) and trains what it declares: FFT
    every tower weight (its dropped head not among them), BitFit every bias, Adapter and LoRA their own."""
    from iisan.train.trainer import train

    cfg = tiny_config(method=method, towers="image", image_model=towers["siglip24x3"], run_name=method, epochs=1,
                      smoke=True)
    results = train(cfg)
    assert results["status"] == "finished"
    by_rate = results["parameters"]["by_rate"]
    tower = dict(load_image_encoder(towers["siglip24x3"], (0, 3)).model.named_parameters())
    expected = {"fft": sum(p.numel() for p in tower.values()),
                "bitfit": sum(p.numel() for n, p in tower.items() if n.endswith(".bias"))}
    if method in expected:
        assert by_rate == {"lr": by_rate["lr"], "lr_image": expected[method]}
    else:  # the backbone frozen, the method's own modules trained
        assert set(by_rate) == {"lr", "lr_adapter_image"} and by_rate["lr_adapter_image"] > 0
