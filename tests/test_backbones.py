"""Encoders: loading errors, layer selection, pooled states from hidden states."""

from __future__ import annotations

import pytest
import torch

from iisan.errors import EncoderError
from iisan.model.backbones import BackboneEncoder, architecture, load_image_encoder, load_text_encoder
from iisan.model.inputs import tokenize_titles
from iisan.model.layer_rules import group_layers
from iisan.model.patches import PatchProjection, patches_as_matmul

from .conftest import six_groups


def test_group_layers_reproduce_the_authors_lists():
    assert group_layers(12, 6) == (0, 2, 4, 6, 8, 10, 12)
    assert group_layers(12, 6, include_embedding=False) == (2, 4, 6, 8, 10, 12)
    assert group_layers(2, 6) == (0, 1, 2)
    assert group_layers(32, 6)[-1] == 32 and len(group_layers(80, 6)) == 7


def test_missing_model_folder_is_one_line(tmp_path):
    for name in (str(tmp_path / "no-such-model"), "./pretrained_models/none", "a/b/c"):
        with pytest.raises(EncoderError, match="model folder .* does not exist") as info:
            load_text_encoder(name, (0, 1))
        assert "\n" not in str(info.value)


def test_tiny_bert_tokenizer_knows_every_title_word(tiny):
    """The written tokenizer holds the whole vocabulary: no title word becomes [UNK], and distinct
    titles stay distinct (transformers 5 drops a vocab_file, which made every word [UNK])."""
    from iisan.data.interactions import read_items

    enc = load_text_encoder(tiny["text_model"], six_groups(tiny["text_model"], "text"))
    titles = read_items(tiny["items"]).titles
    ids, mask = tokenize_titles(enc.tokenizer, titles, 30)
    assert enc.tokenizer.unk_token_id not in ids[mask.bool()].tolist()
    assert len(enc.tokenizer) == enc.model.config.vocab_size > 5
    assert len({tuple(row.tolist()) for row in ids}) == len(set(titles))


def test_layer_list_beyond_depth_is_refused(tiny):
    with pytest.raises(EncoderError, match=r"text layers \[0, 3\] do not fit an encoder with 2 layers"):
        load_text_encoder(tiny["text_model"], layers=(0, 3))


def test_pooled_states_are_the_cls_of_the_selected_hidden_states(tiny):
    enc = load_text_encoder(tiny["text_model"], layers=(0, 2))
    assert (enc.depth, enc.width, enc.pooling) == (2, 32, "cls")
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    ids, mask = tokenize_titles(enc.tokenizer, ["Red Lamp", "blue chair x"], 8)
    assert ids.shape == (2, 8) and mask[0].sum() == 4  # [CLS] red lamp [SEP]
    with torch.no_grad():
        states = enc.layer_states(input_ids=ids, attention_mask=mask)
        hidden = enc.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[:, 1], hidden[2][:, 0])
    torch.testing.assert_close(states[:, 0], hidden[0][:, 0])


def test_vit_final_cls_is_after_the_final_layernorm(tiny):
    enc = load_image_encoder(tiny["image_model"], six_groups(tiny["image_model"], "image"))
    assert enc.norm == {"mean": [0.5] * 3, "std": [0.5] * 3, "size": 32, "rule": "processor"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last_state = enc.layer_states(pixel_values=x)[:, -1]
        final = enc.final_cls(pixel_values=x)
        torch.testing.assert_close(final, enc.model.layernorm(last_state))


def test_vit_loads_without_the_pooler_nothing_reads(tiny):
    """AutoModel gives ViT a random pooler the authors' classifier checkpoint lacks; it is dropped, so
    "all params" counts the authors' ViT (and the folder's own weights)."""
    from transformers import ViTConfig, ViTModel

    bare = sum(p.numel() for p in ViTModel(ViTConfig.from_pretrained(tiny["image_model"]),
                                           add_pooling_layer=False).parameters())
    loaded = load_image_encoder(tiny["image_model"], six_groups(tiny["image_model"], "image")).model
    built = architecture(tiny["image_model"], "image")
    assert loaded.pooler is None and built.pooler is None
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in built.parameters()) == bare
    assert architecture(tiny["text_model"], "text").pooler is not None  # BERT keeps its pooler (authors')


def test_pixels_become_contiguous_normalised_nchw():
    from iisan.model.inputs import pixels_to_input

    pixels = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.5, 0.25, 0.2], "size": 8}
    x = pixels_to_input(pixels, norm)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    # channels-last strides (what a plain permute gives) would send the patch conv to NHWC kernels
    assert x.is_contiguous()
    r, g, b = 200, 100, 0
    pixels[1, 2, 5] = torch.tensor([r, g, b], dtype=torch.uint8)
    x = pixels_to_input(pixels, norm)
    assert x[1, :, 2, 5].tolist() == pytest.approx([(r / 255 - 0.5) / 0.5, (g / 255 - 0.4) / 0.25, (0 - 0.3) / 0.2])
    assert pixels_to_input(pixels, {**norm, "size": 16}).shape == (3, 3, 16, 16)  # resized to the model's side
    kept = pixels.clone()  # normalised in place in a buffer of its own: the same bits as out of place, pixels kept
    plain = pixels.permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(norm["mean"])[:, None, None], torch.tensor(norm["std"])[:, None, None]
    assert torch.equal(pixels_to_input(pixels, norm), (plain - mean) / std) and torch.equal(pixels, kept)


@pytest.mark.parametrize("side", [64, 48, 16])
def test_pixels_stored_at_another_side_are_resized_as_pil_does(side):
    """A store of another side than the tower's (every tiny live run: 64 px stored, 32 px towers) is resized
    on the fly as PIL's bilinear resize of the picture (what the authors' transforms and build-lmdb do),
    down and up, within PIL's rounding to bytes (nearest or plain bilinear resizing are 0.27 and more off)."""
    import numpy as np
    from PIL import Image

    from iisan.model.inputs import pixels_to_input

    picture = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.5, 0.25, 0.2], "size": 32}
    resized = np.asarray(Image.fromarray(picture).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
    mean, std = torch.tensor(norm["mean"])[:, None, None], torch.tensor(norm["std"])[:, None, None]
    got = pixels_to_input(torch.from_numpy(picture)[None], norm)[0] * std + mean  # back to 0..1, as PIL's
    torch.testing.assert_close(got, torch.from_numpy(resized).permute(2, 0, 1), atol=1 / 255 + 1e-4, rtol=0)


@pytest.mark.parametrize("name", ["vit24x3", "deit40x4", "dinov2_32x5", "dinoreg16x2", "clip24x3", "siglip24x3"])
def test_patch_embedding_as_a_matmul_is_the_convolution(towers, name):
    """Every image family's patch-embedding conv becomes one ``PatchProjection`` over the very same
    parameters (names unchanged), and the encoder gives the conv's states and gradients."""
    torch.manual_seed(0)  # weights a checkpoint lacks (ViT's unused pooler) are initialised at random
    conv = load_image_encoder(towers[name], six_groups(towers[name], "image"), patch_embedding="conv")
    torch.manual_seed(0)
    matmul = load_image_encoder(towers[name], six_groups(towers[name], "image"))
    swapped = [m for m in matmul.model.modules() if isinstance(m, PatchProjection)]
    assert len(swapped) == 1 and not any(isinstance(m, PatchProjection) for m in conv.model.modules())
    assert list(conv.model.state_dict()) == list(matmul.model.state_dict())
    for (n, a), b in zip(conv.model.state_dict().items(), matmul.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    size = conv.norm["size"]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(matmul.layer_states(pixel_values=pixels), conv.layer_states(pixel_values=pixels),
                               rtol=1e-5, atol=1e-5)
    grads = []
    for encoder in (conv, matmul):  # as FFT trains it: the projection weight's gradient, in fp64 (in fp32
        encoder.model.double()      # this tiny random model's gradient is of the order of its rounding)
        weight = next(p for n, p in encoder.model.named_parameters() if "patch" in n and n.endswith("weight"))
        weight.requires_grad_(True)
        encoder.final_cls(pixel_values=pixels.double()).square().sum().backward()
        grads.append(weight.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


def test_patch_projection_by_hand_and_what_it_leaves_alone():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4)
    projection = PatchProjection(conv)
    assert projection.weight is conv.weight and projection.bias is conv.bias
    x = torch.randn(2, 3, 10, 13)  # not whole patches: like the conv, the last 2 rows and 1 column drop out
    out = projection(x)
    assert out.shape == (2, 5, 2, 3)
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-6)
    # output (0, :, 1, 2) by hand: the patch at rows 4..7, columns 8..11, dotted with each filter
    by_hand = (conv.weight * x[0, :, 4:8, 8:12]).sum((1, 2, 3)) + conv.bias
    torch.testing.assert_close(out[0, :, 1, 2], by_hand, rtol=1e-5, atol=1e-6)
    no_bias = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4, bias=False)
    torch.testing.assert_close(PatchProjection(no_bias)(x), no_bias(x), rtol=1e-5, atol=1e-6)
    others = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 4, stride=2), torch.nn.Conv2d(3, 5, 4, stride=4, padding=1),
                                 torch.nn.Conv2d(4, 4, 4, stride=4, groups=2), torch.nn.Conv2d(3, 5, 3))
    assert patches_as_matmul(others) == 0 and all(type(m) is torch.nn.Conv2d for m in others)


def _tiny_text_model(family: str, attention: str):
    import transformers as tf

    sizes = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=40)
    config = {"bert": lambda: tf.BertConfig(**sizes), "roberta": lambda: tf.RobertaConfig(**sizes, pad_token_id=1),
              "electra": lambda: tf.ElectraConfig(**sizes, embedding_size=16)}[family]()
    torch.manual_seed(0)
    return tf.AutoModel.from_config(config, attn_implementation=attention).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_a_ready_made_attention_mask_gives_the_states_of_the_2d_one(family, attention):
    """BERT-family text towers get their attention mask in transformers' own 4D form (so that building
    it reads nothing back from the device); every hidden state, padded positions included, is the one the
    2D mask gives, for padded batches and for a batch without padding (where transformers drops the mask)."""
    model = _tiny_text_model(family, attention)
    encoder = BackboneEncoder(model, "text", (0, 1, 2), "mean")
    ids = torch.randint(3, 60, (4, 8))
    padded = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6, [1] * 7 + [0]])
    for mask in (padded, torch.ones_like(padded)):
        inputs = {"input_ids": ids, "attention_mask": mask}
        given = encoder.model_inputs(inputs)
        assert given["attention_mask"].shape == (4, 1, 8, 8) and given["input_ids"] is ids
        assert given["attention_mask"].dtype == (torch.bool if attention == "sdpa" else torch.float32)
        with torch.no_grad():
            ours = model(**given, output_hidden_states=True).hidden_states
            theirs = model(**inputs, output_hidden_states=True).hidden_states
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            pooled = encoder.layer_states(**inputs)  # (4, 3, 32): pooling reads the 2D mask
            real = mask.bool()[:, :, None]
            expected = torch.stack([(h * real).sum(1) / real.sum(1) for h in theirs], dim=1)
            torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)


def test_other_towers_get_their_inputs_unchanged(tiny):
    import transformers as tf

    llama = tf.AutoModel.from_config(tf.LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=48))
    inputs = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    assert BackboneEncoder(llama, "text", (0, 2), "mean").model_inputs(inputs) is inputs  # a causal LLM
    bert = _tiny_text_model("bert", "sdpa")
    bert.config._attn_implementation = "flash_attention_2"  # wants the 2D mask itself
    assert BackboneEncoder(bert, "text", (0, 2), "cls").model_inputs(inputs) is inputs
    vit = load_image_encoder(tiny["image_model"], six_groups(tiny["image_model"], "image"))
    pixels = {"pixel_values": torch.zeros(1, 3, 8, 8)}
    assert vit.model_inputs(pixels) is pixels


def test_models_whose_blocks_or_sizes_cannot_be_found_are_one_line():
    from types import SimpleNamespace

    from torch import nn

    from iisan.errors import TargetError
    from iisan.model.backbones import depth_and_width
    from iisan.model.peft_methods import block_roles, transformer_blocks

    class NoBlocks(nn.Module):
        config = SimpleNamespace(num_hidden_layers=3, hidden_size=4)

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])  # 2 blocks, the config says 3

    with pytest.raises(TargetError, match=r"^NoBlocks: no list of 3 transformer blocks found$"):
        transformer_blocks(NoBlocks())
    block = nn.ModuleDict({"q": nn.Linear(4, 4), "k": nn.Linear(4, 4), "up": nn.Linear(4, 8)})
    with pytest.raises(TargetError, match=r"^cannot tell attention and FFN projections apart in enc.0 "
                                          r"\(enc.0.q, enc.0.k, enc.0.up\)$"):
        block_roles("enc.0", block, 4)
    with pytest.raises(EncoderError, match=r"^cannot read depth and width from a SimpleNamespace$"):
        depth_and_width(SimpleNamespace(num_hidden_layers=2))
    assert depth_and_width(SimpleNamespace(n_layer=2, n_embd=16)) == (2, 16)  # GPT-2's names
    for depth in (-1, 0, 2.5, True):
        with pytest.raises(EncoderError, match=rf"^models/x: its config.json gives {depth!r} layers of width 8; "
                                               r"expected positive integers \(num_hidden_layers, hidden_size\)$"):
            depth_and_width(SimpleNamespace(num_hidden_layers=depth, hidden_size=8), "models/x")
    assert depth_and_width(SimpleNamespace(num_hidden_layers=1024, hidden_size=8)) == (1024, 8)
    with pytest.raises(EncoderError, match=r"^models/x: its config.json gives 100,000 layers; no encoder has more "
                                           r"than 1024$"):  # building them took minutes and all memory
        depth_and_width(SimpleNamespace(num_hidden_layers=100000, hidden_size=8), "models/x")


def test_a_roberta_tower_takes_as_many_title_tokens_as_its_positions_hold():
    """RoBERTa's family numbers positions from its pad id + 1: 40 position embeddings with pad id 1 hold
    38 tokens, and 39 would fail inside the model; BERT's 40 hold 40."""
    from iisan.errors import EncoderError

    roberta = BackboneEncoder(_tiny_text_model("roberta", "sdpa"), "text", (0, 1, 2), "mean")
    with torch.no_grad():
        roberta.model(input_ids=torch.randint(3, 60, (1, 38)))  # the limit holds
        with pytest.raises((IndexError, RuntimeError)):
            roberta.model(input_ids=torch.randint(3, 60, (1, 39)))  # one more does not
    with pytest.raises(EncoderError, match=r"title_tokens=39 is more than the text encoder .*takes "
                                           r"\(max_position_embeddings 40, numbered from 2\); use --title-tokens 38 "
                                           r"or fewer$"):
        roberta.title_inputs(["a title"], 39)
    bert = BackboneEncoder(_tiny_text_model("bert", "sdpa"), "text", (0, 1, 2), "mean")
    with pytest.raises(EncoderError, match=r"\(max_position_embeddings 40\); use --title-tokens 40 or fewer$"):
        bert.title_inputs(["a title"], 41)


def test_a_tower_without_a_position_limit_takes_any_title_length(tiny):
    """XLNet's config says -1 positions, meaning no limit: 30 tokens were refused, with 'use --title-tokens -1
    or fewer', a value refused in turn."""
    enc = load_text_encoder(tiny["text_model"], (0, 1, 2))
    enc.model.config.max_position_embeddings = -1
    ids, mask = enc.title_inputs(["a title"], 500)
    assert ids.shape == mask.shape and ids.shape[0] == 1


def test_a_clip_vision_towers_final_cls_is_after_its_post_layernorm(towers):
    """CLIP's vision tower leaves its final LayerNorm to the pooled token (post_layernorm), unlike ViT's
    last_hidden_state: the baselines' head reads what CLIP's own pooled output is."""
    enc = load_image_encoder(towers["clip24x3"], (0, 1, 2, 3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.final_cls(pixel_values=x), enc.model(pixel_values=x).pooler_output)


def test_tokenising_many_titles_is_said_before_it_takes_seconds(monkeypatch, caplog):
    """200,000 titles took some 15 s between a cache build's first line and its 'caching ...' line, unsaid."""
    import logging
    import types

    from iisan.config import Config
    from iisan.model import build

    class Text:
        def title_inputs(self, titles, tokens):
            return None, None

    monkeypatch.setattr(build, "LiveStates", lambda *args: types.SimpleNamespace(to=lambda device: "live"))
    monkeypatch.setattr(build, "image_pixels", lambda *args: None)
    with caplog.at_level(logging.INFO, logger="iisan.model.build"):
        build.live_states(Config(), [], ["t"] * 50_000, "cpu", {"text": Text()})
        build.live_states(Config(), [], ["t"] * 50_001, "cpu", {"text": Text()})
    assert caplog.messages == ["tokenising 50,001 titles"]
