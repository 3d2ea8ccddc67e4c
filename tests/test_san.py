"""The side adapter network: formulas by hand, initial state, parameter counts, LR groups."""

from __future__ import annotations

import pytest
import torch

from iisan.model.item_encoder import LrGroup
from iisan.model.san import InterSAN, IntraSAN, SANItemTower, SideAdapterBlock
from iisan.model.sasrec import SASRec


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_block_is_residual_bottleneck_with_small_zero_mean_init():
    torch.manual_seed(0)
    block = SideAdapterBlock(768, 64)
    assert n_params(block) == 99_136  # authors' count per block
    w = torch.cat([block.down_proj.weight.flatten(), block.up_proj.weight.flatten()])
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.01, rel=0.05)
    assert block.down_proj.bias.abs().sum() == 0 and block.up_proj.bias.abs().sum() == 0
    x = torch.randn(3, 768)
    expected = x + block.up_proj(torch.relu(block.down_proj(x)))
    torch.testing.assert_close(block(x), expected)


def test_intra_san_recurrence_by_hand():
    torch.manual_seed(0)
    san = IntraSAN(width=4, steps=3, bottleneck=2, temperature=0.1)
    with torch.no_grad():
        san.gate_logits.copy_(torch.tensor([0.0, 0.1, -0.2]))
    h = torch.randn(5, 3, 4)
    s = torch.zeros(5, 4)
    for k in range(3):
        g = torch.sigmoid(san.gate_logits[k] / 0.1)
        s = san.blocks[k](g * h[:, k] + (1 - g) * s)
    torch.testing.assert_close(san(h), s)
    assert IntraSAN(4, 3, 2).gates().tolist() == [0.5, 0.5, 0.5]  # theta = 0 at start
    assert InterSAN(4, 6, 2, 2).gates().tolist() == [0.5, 0.5] and InterSAN(4, 4, 2, 2, fusion="add").gates() is None


def test_intra_san_add_fusion_has_no_gates():
    torch.manual_seed(0)
    san = IntraSAN(width=4, steps=2, bottleneck=2, fusion="add")
    assert san.gate_logits is None
    h = torch.randn(2, 2, 4)
    s = san.blocks[1](h[:, 1] + san.blocks[0](h[:, 0]))
    torch.testing.assert_close(san(h), s)


def test_inter_san_reads_raw_states_of_both_modalities():
    torch.manual_seed(0)
    san = InterSAN(text_width=4, image_width=4, steps=2, bottleneck=2)
    with torch.no_grad():
        san.gate_logits.copy_(torch.tensor([0.3, -0.1]))
    txt, img = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    s = torch.zeros(3, 4)
    for k in range(2):
        g = torch.sigmoid(san.gate_logits[k] / 0.1)
        s = san.blocks[k](s + g * img[:, k] + (1 - g) * txt[:, k])
    torch.testing.assert_close(san(txt, img), s)
    assert san.text_align is None and san.image_align is None


def test_iisan_default_parameter_counts_match_the_authors():
    tower = SANItemTower({"text": 768, "image": 768}, {"text": 7, "image": 7})
    sasrec = SASRec(64, 10, 2, 2, 0.1)
    assert n_params(sasrec) == 100_224
    # 21 blocks 2,081,856 + fc_* 1,771,776 + three 768->64 heads 147,648 + 21 gates + com_dense 12,352
    assert n_params(tower) == 2_081_856 + 1_771_776 + 147_648 + 21 + 12_352
    assert n_params(tower) + n_params(sasrec) == 4_113_877  # the paper's 4.11 M


@pytest.mark.parametrize("modality,branches", [("intra_inter", 3), ("intra", 2), ("inter", 1)])
def test_every_modality_setting_runs(modality, branches):
    torch.manual_seed(0)
    tower = SANItemTower({"text": 8, "image": 8}, {"text": 3, "image": 3}, embedding_dim=4, modality=modality)
    assert tower.combine.in_features == branches * 4
    states = {"text": torch.randn(5, 3, 8), "image": torch.randn(5, 3, 8)}
    out = tower(states)
    # the branches (each checked by hand above) wired as the authors do: image, text, then inter, into com_dense
    parts = []
    if modality != "inter":
        parts += [tower.heads[m](tower.intra[m](states[m])) for m in ("image", "text")]
    if modality != "intra":
        parts.append(tower.heads["inter"](tower.inter(states["text"], states["image"])))
    assert len(parts) == branches and (tower.inter is None) == (modality == "intra")
    assert len(tower.intra) == (0 if modality == "inter" else 2)
    torch.testing.assert_close(out, tower.combine(torch.cat(parts, dim=-1)))
    assert out.shape == (5, 4)


@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_tower(modality):
    torch.manual_seed(0)
    tower = SANItemTower({modality: 8}, {modality: 3}, embedding_dim=4, modality="intra")
    assert tower.combine.in_features == 4 and tower.inter is None and list(tower.intra) == [modality]
    states = torch.randn(2, 3, 8)
    expected = tower.combine(tower.heads[modality](tower.intra[modality](states)))
    torch.testing.assert_close(tower({modality: states}), expected)


def test_param_groups_cover_every_parameter_once_with_the_authors_split():
    tower = SANItemTower({"text": 8, "image": 8}, {"text": 3, "image": 3}, embedding_dim=4)
    groups = tower.param_groups()
    # the order optimizer groups (and so checkpoints) take: LrGroup's, as the bare names were before it
    assert list(groups) == list(LrGroup) == ["recsys", "image_net", "text_encoder", "adapter_image", "adapter_text"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(tower.parameters()))
    names = {id(p): n for n, p in tower.named_parameters()}
    named = {g: {names[id(p)] for p in ps} for g, ps in groups.items()}
    assert named["text_encoder"] == {"heads.text.0.weight", "heads.text.0.bias"}  # fc_bert
    assert named["image_net"] == {"heads.image.0.weight", "heads.image.0.bias", "intra.image.gate_logits"}
    every = set(names.values())
    # each group exactly (``all`` over a group held for whatever part of it was left there)
    assert named["adapter_image"] == {n for n in every if n.startswith(("inter.blocks.", "intra.image.blocks."))}
    assert named["adapter_text"] == {n for n in every if n.startswith("intra.text.blocks.")}
    assert named["recsys"] == every - named["adapter_image"] - named["adapter_text"] - named["image_net"] - \
        named["text_encoder"]
    assert {"intra.text.gate_logits", "inter.gate_logits", "combine.weight"} <= named["recsys"]
    assert named["adapter_text"] and any(n.startswith("inter.") for n in named["adapter_image"])


@pytest.mark.parametrize("modality", ["intra_inter", "intra", "inter"])
@pytest.mark.parametrize("fusion", ["gated", "add"])
def test_the_ablation_switches_reach_the_tower_a_run_builds(modality, fusion):
    """--modality, --fusion and --gate-temperature drive the paper's ablations: the tower ``build`` makes
    for a run has exactly the SANs asked for, gates only where fused by gates, and the run's temperature
    (dropping any of them from build.san_tower left every other test passing)."""
    from iisan.config import Config
    from iisan.model.build import san_tower

    cfg = Config(modality=modality, fusion=fusion, gate_temperature=0.5)
    tower = san_tower(cfg, {"text": (3, 8), "image": (3, 8)})
    assert set(tower.intra) == (set() if modality == "inter" else {"text", "image"})
    assert (tower.inter is not None) == (modality != "intra")
    sans = [*tower.intra.values(), *([tower.inter] if tower.inter is not None else [])]
    branches = len(sans)
    assert tower.combine.in_features == branches * cfg.embedding_dim
    for san in sans:
        if fusion == "add":
            assert san.gate_logits is None and san.gates() is None
            continue
        with torch.no_grad():
            san.gate_logits.fill_(1.0)
        torch.testing.assert_close(san.gates(), torch.full_like(san.gate_logits, torch.sigmoid(torch.tensor(2.0))))


@pytest.mark.parametrize("widths, narrow", [({"text": 48, "image": 24}, "image"), ({"text": 24, "image": 48}, "text")])
def test_versa_inter_adapters_take_the_narrower_towers_bottleneck_and_its_maps_train_with_recsys(widths, narrow):
    """Towers of two widths: the inter SAN runs at the narrower width with that tower's bottleneck (the authors'
    draft), and the maps that align the wider tower train at the recsys rate, as the heads do."""
    bottleneck = {"text": 8, "image": 4}
    tower = SANItemTower(widths, {"text": 3, "image": 3}, embedding_dim=4, bottleneck=bottleneck)
    assert tower.inter.width == 24
    assert {b.down_proj.out_features for b in tower.inter.blocks} == {bottleneck[narrow]}
    groups = {g: {id(p) for p in ps} for g, ps in tower.param_groups().items()}
    aligned = [m for m in (tower.inter.text_align, tower.inter.image_align) if m is not None]
    assert len(aligned) == 1 and {id(p) for p in aligned[0].parameters()} <= groups[LrGroup.RECSYS]


def test_sasrec_starts_as_the_authors_xavier_normal_with_zero_biases():
    torch.manual_seed(0)
    model = SASRec(dim=64, max_len=50, blocks=2, heads=2)
    expected = (2 / (50 + 64)) ** 0.5  # xavier normal of a (50, 64) position table
    assert abs(model.position.weight.std().item() - expected) < 0.1 * expected
    linear = model.blocks[0].ffn[0]
    assert abs(linear.weight.std().item() - (2 / (64 + 256)) ** 0.5) < 0.1 * (2 / 320) ** 0.5
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)


def test_sasrec_in_training_drops_out_after_the_input_norm():
    """x = Dropout(LN(items + positions)), then the blocks, in train mode (eval-mode tests cannot tell the
    order): the same draws by hand."""
    from torch.nn import functional as F

    model = SASRec(dim=8, max_len=5, blocks=1, heads=2, dropout=0.3).train()
    items, valid = torch.randn(2, 5, 8), torch.tensor([[False, True, True, True, True]] * 2)
    torch.manual_seed(3)
    got = model(items, valid)
    torch.manual_seed(3)
    x = F.dropout(model.input_norm(items + model.position.weight[:5]), 0.3, training=True)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None] & valid[:, None, :]
    bias = torch.zeros(2, 1, 5, 5).masked_fill(~allowed[:, None], -1e4)
    torch.testing.assert_close(got, model.blocks[0](x, bias))


def test_a_tower_built_without_a_config_refuses_what_would_build_another_model_silently():
    """Reused outside the trainer (a tower over one's own states): fusion='gate' built an ungated tower, widths
    {'txt': ...} an image-only one, and 7 states into a 3-state chain read the first 3 (the inter chain the last)."""
    from iisan.model.san import SANItemTower

    widths, steps = {"text": 8, "image": 8}, {"text": 3, "image": 3}
    with pytest.raises(ValueError, match="fusion must be one of gated, add, not 'gate'"):
        SANItemTower(widths, steps, 4, fusion="gate")
    with pytest.raises(ValueError, match="modality must be one of intra_inter, intra, inter, not 'intra[+]inter'"):
        SANItemTower(widths, steps, 4, modality="intra+inter")
    with pytest.raises(ValueError, match=r"expected keys among image, text, the same in both"):
        SANItemTower({"txt": 8, "image": 8}, {"txt": 3, "image": 3}, 4)
    with pytest.raises(ValueError, match=r"bottleneck \{'text': 2\}: expected one for image too \(a key per tower\)"):
        SANItemTower(widths, steps, 4, {"text": 2})  # (a KeyError: 'image' before)
    tower = SANItemTower(widths, steps, 4)
    assert tower({"text": torch.randn(2, 3, 8), "image": torch.randn(2, 3, 8)}).shape == (2, 4)
    with pytest.raises(ValueError, match=r"an intra SAN of 3 states got 7"):
        tower({"text": torch.randn(2, 7, 8), "image": torch.randn(2, 3, 8)})


def test_a_fusion_the_chains_do_not_implement_is_refused_not_built_as_add():
    """A newcomer adding a fusion to --fusion alone got 'add' chains, intra and inter, without a word."""
    from iisan.config import choices
    from iisan.model.san import FUSIONS

    assert choices("fusion") == FUSIONS  # what a run may ask for is what the chains implement
    for build in (lambda: IntraSAN(4, 3, 2, fusion="concat"), lambda: InterSAN(4, 4, 3, 2, fusion="concat")):
        with pytest.raises(ValueError, match="fusion 'concat' is not implemented by the SAN chains [(]gated, add[)]"):
            build()


def test_evaluation_puts_a_callers_model_back_in_its_own_mode(tiny_config):
    """item_table and evaluate_ranks called from someone else's training loop left the model in eval mode:
    its dropout stayed off for the rest of their training."""
    from iisan.data.run_data import load_data
    from iisan.evaluate import evaluate_ranks
    from iisan.model.build import build_model

    cfg = tiny_config(feed="live")  # (no cache to build)
    data = load_data(cfg)
    model, pixels = build_model(cfg, data, torch.device("cpu"))
    model.train()
    ranks = evaluate_ranks(model, data, "valid", cfg, torch.device("cpu"), pixels)
    assert model.training and len(ranks) == data.num_users
    model.eval()
    evaluate_ranks(model, data, "valid", cfg, torch.device("cpu"), pixels)
    assert not model.training
