"""IISAN-Versa's SAN: dimension transformation maps, unequal block counts, the symmetric case reducing to
IISAN exactly, and tiny asymmetric pairs that train end to end with a hand-counted parameter total."""

from __future__ import annotations

import math

import pytest
import torch

from iisan.config import choices
from iisan.model.san import HEADS, InterSAN, SANItemTower, head_style

D = 64  # item embedding width
SASREC = 100_224  # SASRec, 2 blocks of 64, 10 positions (test_san)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def block(d, r=64):
    return 2 * d * r + d + r


def tower_params(wt, kt, wi, ki, heads, r=64):
    """Hand count of the item tower: intra SANs (blocks + gates), inter SAN (blocks, gates, a map per
    step for the wider modality), heads, com_dense."""
    s, narrow, wide = min(kt, ki), min(wt, wi), max(wt, wi)
    intra = kt * block(wt, r) + kt + ki * block(wi, r) + ki
    inter = s * block(narrow, r) + s + (s * (wide * narrow + narrow) if wide != narrow else 0)

    def head(d):
        return d * d + d + d * D + D if heads == "iisan" else d * D + D + D * D + D

    return intra + inter + head(wt) + head(wi) + narrow * narrow + narrow + narrow * D + D + 3 * D * D + D


def iisan_reference(tower, txt, img, temperature=0.1):
    """IISAN from the spec's formulas (authors' §2.4-2.6), on the tower's own weights."""

    def sanb(blk, x):
        return x + blk.up_proj(torch.relu(blk.down_proj(x)))

    out = {}
    for m, h in (("image", img), ("text", txt)):
        san, s = tower.intra[m], torch.zeros(h.shape[0], h.shape[2])
        for k in range(h.shape[1]):
            g = torch.sigmoid(san.gate_logits[k] / temperature)
            s = sanb(san.blocks[k], g * h[:, k] + (1 - g) * s)
        fc, pre_fc = tower.heads[m]
        out[m] = pre_fc(fc(s))
    s = torch.zeros(txt.shape[0], txt.shape[2])
    for k in range(txt.shape[1]):
        g = torch.sigmoid(tower.inter.gate_logits[k] / temperature)
        s = sanb(tower.inter.blocks[k], s + g * img[:, k] + (1 - g) * txt[:, k])
    fc_mm, fc_mm_down = tower.heads["inter"]
    return tower.combine(torch.cat([out["image"], out["text"], fc_mm_down(fc_mm(s))], dim=-1))


def _randomise_gates(tower):
    with torch.no_grad():
        for p in (tower.intra["text"].gate_logits, tower.intra["image"].gate_logits, tower.inter.gate_logits):
            p.copy_(torch.randn_like(p) * 0.2)


def test_symmetric_pair_is_exactly_iisan():
    torch.manual_seed(0)
    tower = SANItemTower({"text": 16, "image": 16}, {"text": 7, "image": 7}, embedding_dim=D)
    _randomise_gates(tower)
    assert tower.head_style == "iisan" and tower.inter.text_align is None and tower.inter.image_align is None
    txt, img = torch.randn(5, 7, 16), torch.randn(5, 7, 16)
    torch.testing.assert_close(tower({"text": txt, "image": img}), iisan_reference(tower, txt, img))
    # BERT-base + ViT-B through the Versa code: the paper's 4.11 M with SASRec, nothing added
    full = SANItemTower({"text": 768, "image": 768}, {"text": 7, "image": 7})
    assert n_params(full) + SASREC == 4_113_877 == tower_params(768, 7, 768, 7, "iisan") + SASREC


@pytest.mark.parametrize("heads", ["iisan", "versa"])
def test_image_head_init_follows_each_design(heads):
    """IISAN's image head ends in the authors' xavier-normal classifier (zero bias); the Versa draft's
    cv_pre_fc is a fresh Linear, torch's default init, as is the text head in both."""
    torch.manual_seed(0)
    tower = SANItemTower({"text": 256, "image": 256}, {"text": 3, "image": 3}, embedding_dim=D, heads=heads)
    image, text = tower.heads["image"][1], tower.heads["text"][1]
    fan_in, fan_out = image.weight.shape[1], image.weight.shape[0]
    default_std = 1 / math.sqrt(3 * fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert abs(text.weight.std().item() - 1 / math.sqrt(3 * text.weight.shape[1])) < 0.2 * default_std
    assert text.bias.abs().sum() > 0
    if heads == "iisan":
        assert image.bias.abs().sum() == 0
        xavier_std = math.sqrt(2 / (fan_in + fan_out))
        assert abs(image.weight.std().item() - xavier_std) < 0.1 * xavier_std
    else:
        assert image.bias.abs().sum() > 0
        assert abs(image.weight.std().item() - default_std) < 0.2 * default_std


def test_llm_pair_parameter_count_matches_the_authors_computation():
    """LLaMA-3-70B (8192) + ViT-B (768), bottleneck 64: ~54 M trainable, 44 M of them the 7 maps."""
    tower = SANItemTower({"text": 8192, "image": 768}, {"text": 7, "image": 7})
    maps = n_params(tower.inter.text_align)
    assert tower.head_style == "versa" and tower.inter.image_align is None
    assert maps == 7 * (8192 * 768 + 768) == 44_045_568
    assert n_params(tower) == tower_params(8192, 7, 768, 7, "versa")
    assert 53.5e6 < n_params(tower) + SASREC < 54.5e6


@pytest.mark.parametrize("wt,kt,wi,ki", [(48, 7, 24, 4), (16, 3, 40, 5), (32, 3, 32, 6), (40, 4, 24, 4)])
def test_inter_san_aligns_widths_and_pairs_the_last_states(wt, kt, wi, ki):
    torch.manual_seed(0)
    steps = min(kt, ki)
    san = InterSAN(wt, wi, steps, bottleneck=8)
    with torch.no_grad():
        san.gate_logits.copy_(torch.randn(steps) * 0.2)
    txt, img = torch.randn(3, kt, wt), torch.randn(3, ki, wi)
    s = torch.zeros(3, min(wt, wi))
    for k in range(steps):  # the longer chain's extra leading states are not fused
        t, i = txt[:, kt - steps + k], img[:, ki - steps + k]
        t = san.text_align[k](t) if wt > wi else t
        i = san.image_align[k](i) if wi > wt else i
        g = torch.sigmoid(san.gate_logits[k] / 0.1)
        s = san.blocks[k](s + g * i + (1 - g) * t)
    torch.testing.assert_close(san(txt, img), s)
    assert (san.text_align is not None) == (wt > wi) and (san.image_align is not None) == (wi > wt)


@pytest.mark.parametrize("wt,wi", [(48, 24), (16, 40)])
def test_inter_san_of_two_widths_runs_under_half_precision_autocast(wt, wi):
    """Under autocast (bf16 on a GPU, where steps run by default) the align layer's output is half while its
    partner is fp32; the gated mix (lerp, which does not promote) takes both in the wider dtype and gives the
    fp32 result within half precision's rounding (it raised 'expected dtype float' before)."""
    torch.manual_seed(0)
    san = InterSAN(wt, wi, 3, bottleneck=8)
    txt, img = torch.randn(4, 3, wt), torch.randn(4, 3, wi)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = san(txt, img)
    half.float().sum().backward()
    assert san.gate_logits.grad is not None and torch.isfinite(san.gate_logits.grad).all()
    torch.testing.assert_close(half.float(), san(txt, img), atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# tiny asymmetric pairs, end to end: cache, a few training steps, hand-counted parameters

PAIRS = {
    # name: (text tower, text pooling, image tower, text (width, blocks), image (width, blocks))
    "text deeper and wider (decoder LLM)": ("llama48x6", "auto", "vit24x3", (48, 7), (24, 4)),
    "text shallower and narrower": ("bert16x2", "auto", "deit40x4", (16, 3), (40, 5)),
    "equal widths, image deeper": ("bert32x2", "auto", "dinov2_32x5", (32, 3), (32, 6)),
    "equal depths, different widths": ("qwen2_40x3", "auto", "clip24x3", (40, 4), (24, 4)),
    "gpt-2, last-token pooling": ("gpt2_24x4", "last", "vit24x3", (24, 5), (24, 4)),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_asymmetric_pair_trains_with_finite_loss(pair, towers, tiny_config, capsys):
    from iisan.model.caching import build_cache_from_config
    from iisan.train.trainer import train

    text, pooling, image, (wt, kt), (wi, ki) = PAIRS[pair]
    cfg = tiny_config(text_model=towers[text], image_model=towers[image], text_pooling=pooling, epochs=1,
                      max_steps_per_epoch=3)
    build_cache_from_config(cfg, dtype="float32")
    results = train(cfg)
    loss = results["epochs"][0]["loss"]
    style = "iisan" if wt == wi else "versa"
    trainable = results["parameters"]["trainable"]
    print(f"{pair}: text {wt} x {kt} blocks, image {wi} x {ki} blocks, loss {loss:.4f}, "
          f"trainable {trainable:,}")
    assert math.isfinite(loss) and results["epochs"][0]["steps"] == 3
    assert trainable == tower_params(wt, kt, wi, ki, style) + SASREC
    from iisan.experiments.trained import evaluate, load_run

    again = evaluate(load_run(results["run_dir"], "cpu"), "test")
    assert again == pytest.approx(results["test"], abs=1e-9)  # the reported numbers are the best weights'


def test_decoder_pair_cached_and_live_feeds_give_the_same_item_embeddings(towers, tiny_config):
    from iisan.model.caching import build_cache_from_config

    from .conftest import cached_and_live_tables

    cfg = tiny_config(text_model=towers["llama48x6"], image_model=towers["deit40x4"])
    build_cache_from_config(cfg, dtype="float32")
    a, b, cached = cached_and_live_tables(cfg, torch.device("cpu"))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cached.item_encoder.tower.inter.text_align is not None  # 48 -> 40: the text side is mapped


def test_head_styles_are_the_san_heads_fields_choices_and_another_is_refused():
    assert HEADS == choices("san_heads") == ("auto", "iisan", "versa")
    with pytest.raises(ValueError) as info:
        head_style({"text": 8, "image": 8}, "wide")
    assert str(info.value) == "heads must be one of auto, iisan, versa, not 'wide'"
