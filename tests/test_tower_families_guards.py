"""What a tower's family and tokenizer decide, each on a tiny random model: the authors' LLM inputs keep the
tokenizer's BOS, titles with no token at all are warned of, a whole CLIP checkpoint is a text tower pooled by
its mean, CLIP's vision tower normalises its pooled token for the baselines' heads, and a DINOv2 tower with
registers takes crops of another size than its config's (its position embeddings interpolate)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from iisan.errors import EncoderError
from iisan.model.backbones import load_image_encoder, load_text_encoder, read_spec
from iisan.model.families import check_architecture, resolve_pooling
from iisan.model.inputs import pixels_to_input, tokenize_titles, tokenize_titles_as_authors_llm
from iisan.model.tiny import write_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LLaMA (2 layers x 16) whose word-level tokenizer adds no special tokens (``write_llama``'s),
    and the same model with a tokenizer that adds its BOS (``<s>``, id 2), as LLaMA's do."""
    root = tmp_path_factory.mktemp("llama")
    plain = write_llama(root / "plain", ["red", "lamp", "blue", "chair"], hidden=16, layers=2, heads=2)
    bos = root / "bos"
    shutil.copytree(plain, bos)
    AutoTokenizer.from_pretrained(bos, add_bos_token=True).save_pretrained(bos)
    return {"plain": str(plain), "bos": str(bos)}


# --- model/inputs.py -------------------------------------------------------------------------------------------


def test_the_authors_llm_inputs_start_with_the_tokenizers_bos(llama):
    """The authors' LLaMA preprocessing tokenizes with the special tokens (LLaMA: BOS first), titles as written,
    padded with id 0 and no mask: every row starts with BOS, the padding item's too."""
    tokenizer = AutoTokenizer.from_pretrained(llama["bos"])
    assert tokenizer("red lamp")["input_ids"] == [2, 4, 5]  # the tokenizer adds its BOS
    ids, mask = tokenize_titles_as_authors_llm(tokenizer, ["", "red lamp", "Blue chair  "], 5)
    assert ids.tolist() == [[2, 0, 0, 0, 0], [2, 4, 5, 0, 0], [2, 1, 7, 0, 0]]  # "Blue": not lower-cased, <unk>
    assert mask.tolist() == [[1] * 5] * 3
    encoder = load_text_encoder(llama["bos"], (0, 1, 2), pooling="authors")  # what a cache build tokenizes with
    assert encoder.title_inputs(["", "red lamp"], 4)[0].tolist() == [[2, 0, 0, 0], [2, 4, 5, 0]]
    plain, _ = tokenize_titles_as_authors_llm(AutoTokenizer.from_pretrained(llama["plain"]), ["", "red lamp"], 4)
    assert plain.tolist() == [[0, 0, 0, 0], [4, 5, 0, 0]]  # no BOS where the tokenizer adds none


def test_titles_with_no_token_at_all_are_warned_of_and_the_padding_item_is_not_counted(llama, caplog):
    plain, bos = (AutoTokenizer.from_pretrained(llama[k]) for k in ("plain", "bos"))
    with caplog.at_level(logging.WARNING, logger="iisan"):
        ids, mask = tokenize_titles(plain, ["", "", "red lamp", ""], 4)
    assert mask.tolist() == [[0] * 4, [0] * 4, [1, 1, 0, 0], [0] * 4]
    said = [r.getMessage() for r in caplog.records if r.name.startswith("iisan")]
    assert said == ["2 titles have no token at all (empty titles and a tokenizer that adds no special tokens); "
                    "their pooled text states are zeros"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iisan"):
        tokenize_titles(plain, ["", "red lamp", "blue"], 4)  # row 0, the padding item, is empty by design
        tokenize_titles(bos, ["", "", "red lamp"], 4)  # BOS: an empty title still has a token
    assert not [r for r in caplog.records if r.name.startswith("iisan")]


# --- model/families.py -----------------------------------------------------------------------------------------


def test_a_whole_clip_checkpoint_is_a_text_tower_pooled_by_its_mean(llama, tmp_path, caplog):
    """A CLIP checkpoint of both towers (model_type 'clip', what the Hub's openai/clip-* hold) is a text tower
    by its causal text model: accepted, mean-pooled by default, and its first token warned of under cls."""
    from transformers import CLIPConfig, CLIPModel

    check_architecture("clip", "text", "openai/clip-vit-base-patch32")  # no error
    assert resolve_pooling("auto", "clip") == "mean"
    torch.manual_seed(0)
    text = {"vocab_size": 16, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, "eos_token_id": 3, "bos_token_id": 2,
            "pad_token_id": 0}
    vision = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 16}
    folder = tmp_path / "clip"
    shutil.copytree(llama["plain"], folder)  # its tokenizer (8 words), then CLIP's weights in place of LLaMA's
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    spec = read_spec(str(folder), "text")
    assert (spec.model_type, spec.depth, spec.width) == ("clip", 2, 16)
    encoder = load_text_encoder(str(folder), (0, 1, 2))
    assert encoder.pooling == "mean" and (encoder.depth, encoder.width) == (2, 16)
    ids, mask = encoder.title_inputs(["", "red lamp", "blue chair red"], 5)
    with torch.no_grad():
        states = encoder.layer_states(input_ids=ids[1:], attention_mask=mask[1:])
        hidden = encoder.model(input_ids=ids[1:], attention_mask=mask[1:], output_hidden_states=True).hidden_states
    for row, n in enumerate((2, 3)):  # the mean over each title's real tokens
        for j in range(3):
            torch.testing.assert_close(states[row, j], hidden[j][row, :n].mean(0))
    with caplog.at_level(logging.WARNING, logger="iisan"):
        assert load_text_encoder(str(folder), (0, 2), pooling="cls").pooling == "cls"
    assert any("looks like a causal decoder" in r.getMessage() for r in caplog.records)


def test_a_clip_vision_towers_baseline_output_is_its_pooled_token_layernormed(towers):
    """CLIP's vision tower leaves its final LayerNorm (post_layernorm) to the pooled token, not to
    last_hidden_state: the baselines' heads read post_layernorm(CLS), unlike ViT's plain CLS."""
    enc = load_image_encoder(towers["clip24x3"], (0, 3))
    assert enc.model.config.model_type == "clip_vision_model"
    pixels = pixels_to_input(torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8), enc.norm)
    with torch.no_grad():
        last = enc.model(pixel_values=pixels).last_hidden_state
        final = enc.final_cls(pixel_values=pixels)
    torch.testing.assert_close(final, enc.model.post_layernorm(last[:, 0]))
    assert not torch.allclose(final, last[:, 0], atol=1e-3)  # the norm is no identity here
    torch.testing.assert_close(final.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)  # LayerNormed: zero mean


def _registers_tower(folder, config_side: int, crop: int) -> str:
    """A tiny DINOv2 with registers (2 layers x 16, patches of 8) whose config's image_size is ``config_side``
    and whose processor crops to ``crop``, as DINOv2's checkpoints (config 518, crops of 224)."""
    import transformers as tf

    config = tf.Dinov2WithRegistersConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                          image_size=config_side, patch_size=8)
    torch.manual_seed(0)
    tf.AutoModel.from_config(config).save_pretrained(folder)
    tf.BitImageProcessor(size={"shortest_edge": crop + 4}, crop_size={"height": crop, "width": crop},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)


def test_a_tower_with_registers_takes_crops_of_another_size_than_its_config(tmp_path):
    """DINOv2 (with registers too) interpolates its position embeddings: a config of 48 pixels fed 32-pixel
    crops loads, at the processor's side, and runs (1 CLS + 4 registers + 4 x 4 patches); a ViT so made is
    refused, its position embeddings being for its config's side alone."""
    from iisan.model.tiny import write_vit

    enc = load_image_encoder(_registers_tower(tmp_path / "reg", config_side=48, crop=32), (0, 1, 2))
    assert enc.model.config.model_type == "dinov2_with_registers" and enc.norm["size"] == 32
    pixels = pixels_to_input(torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8), enc.norm)
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        states = enc.layer_states(pixel_values=pixels)
        hidden = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert states.shape == (2, 3, 16) and hidden[0].shape == (2, 1 + 4 + 16, 16) and torch.isfinite(states).all()
    vit = write_vit(tmp_path / "vit", hidden=16, layers=2, heads=2, image_size=48, patch_size=8)
    import transformers as tf

    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    with pytest.raises(EncoderError, match=r"sizes images to 32 pixels, its config.json's image_size is 48"):
        load_image_encoder(str(vit), (0, 1, 2))
