"""Encoders: loading errors, layer selection, pooled states from hidden states."""

from __future__ import annotations

import pytest
import torch

from iisan.backbones import EncoderError, group_layers, load_image_encoder, load_text_encoder, tokenize_titles


def test_group_layers_reproduce_the_authors_lists():
    assert group_layers(12, 6) == (0, 2, 4, 6, 8, 10, 12)
    assert group_layers(12, 6, include_embedding=False) == (2, 4, 6, 8, 10, 12)
    assert group_layers(2, 6) == (0, 1, 2)
    assert group_layers(32, 6)[-1] == 32 and len(group_layers(80, 6)) == 7


def test_missing_model_folder_is_one_line(tmp_path):
    for name in (str(tmp_path / "no-such-model"), "./pretrained_models/none", "a/b/c"):
        with pytest.raises(EncoderError, match="model folder .* does not exist") as info:
            load_text_encoder(name)
        assert "\n" not in str(info.value)


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
    enc = load_image_encoder(tiny["image_model"])
    assert enc.norm == {"mean": [0.5] * 3, "std": [0.5] * 3, "size": 32}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last_state = enc.layer_states(pixel_values=x)[:, -1]
        final = enc.final_cls(pixel_values=x)
        torch.testing.assert_close(final, enc.model.layernorm(last_state))


def test_pixels_become_contiguous_normalised_nchw():
    from iisan.backbones import pixels_to_input

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
