"""Golden values: modules that follow the authors' formulas, on small fixed inputs, against numbers
recorded by running the authors' published code (GAIR-Lab/IISAN at commit 67f5c1f, ``Code_Cached/``:
``AdapterBlock``, ``IISANAdaptedMModel``, ``User_Encoder``, ``ModelMM.forward``, ``metrics_topK``) outside
this repository, in eval mode, with every weight and input set by ``pattern`` below in the same order.
No randomness is involved, so the numbers do not depend on either side's initialisation or RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iisan.evaluate import metrics_from_ranks, rank_targets
from iisan.model.loss import in_batch_softmax_loss
from iisan.model.san import SANItemTower, SideAdapterBlock
from iisan.model.sasrec import SASRec

TOL = {"atol": 2e-6, "rtol": 1e-4}


def pattern(n: int, seed: float, scale: float) -> torch.Tensor:
    return scale * torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + seed)


def fill(param: torch.Tensor, seed: float, scale: float = 0.05, offset: float = 0.0) -> None:
    with torch.no_grad():
        param.copy_((offset + pattern(param.numel(), seed, scale)).view_as(param).float())


def golden(values: list[float], *shape: int) -> torch.Tensor:
    return torch.tensor(values).view(*shape)


def test_side_adapter_block_matches_the_authors_adapter_block():
    block = SideAdapterBlock(6, 3)
    fill(block.down_proj.weight, 1, 0.5)
    fill(block.down_proj.bias, 2, 0.1)
    fill(block.up_proj.weight, 3, 0.5)
    fill(block.up_proj.bias, 4, 0.1)
    x = pattern(12, 5, 1.0).view(2, 6).float()
    # recorded: the authors' AdapterBlock(args, 6, 3) with ReLU, the same weights and input
    expected = golden([-1.3010805, -1.4111965, -0.8177318, 0.0823576, 0.6329798, 0.6011066,
                       0.8730856, 0.0356734, 0.0083126, 0.8440787, 1.5193222, 1.0835223], 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, **TOL)


def _states(offset: float) -> torch.Tensor:
    """(2 items, 13 hidden states, 768): the authors' cached layout, state i of item n."""
    i = torch.arange(13, dtype=torch.float64)[None, :, None]
    d = torch.arange(768, dtype=torch.float64)[None, None, :]
    n = torch.arange(2, dtype=torch.float64)[:, None, None]
    return torch.sin(0.01 * (d + 1) * (i + 1) + n + offset).float()


def _fill_tower(tower: SANItemTower, blocks: int, seed: int) -> None:
    """The authors' fill order: per step k the text, image and inter blocks; then fc_bert, fc_cv, fc_mm,
    fc_mm_down (from ``seed``) and the two 768 -> 64 heads (always from 102: the authors' model shares them)."""
    for k in range(blocks):
        for block in (tower.intra["text"].blocks[k], tower.intra["image"].blocks[k], tower.inter.blocks[k]):
            fill(block.down_proj.weight, seed, 0.05)
            fill(block.down_proj.bias, seed + 1, 0.01)
            fill(block.up_proj.weight, seed + 2, 0.05)
            fill(block.up_proj.bias, seed + 3, 0.01)
            seed += 4
    heads = tower.heads
    for linear, s in ((heads["text"][0], seed), (heads["image"][0], seed + 2), (heads["inter"][0], seed + 4),
                      (heads["inter"][1], seed + 6), (heads["text"][1], 102), (heads["image"][1], 104)):
        fill(linear.weight, s, 0.03)
        fill(linear.bias, s + 1, 0.01)
    with torch.no_grad():
        k = torch.arange(blocks, dtype=torch.float32)
        tower.intra["text"].gate_logits.copy_(0.02 * (k - 3))
        tower.intra["image"].gate_logits.copy_(-0.03 * (k - 2))
        tower.inter.gate_logits.copy_(0.01 * k)


def _branches(tower: SANItemTower, states: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return [tower.heads[m](tower.intra[m](states[m])) for m in ("image", "text")] + \
            [tower.heads["inter"](tower.inter(states["text"], states["image"]))]


@pytest.mark.parametrize("seeded", [False, True])
def test_intra_and_inter_sans_match_the_authors_iisan_model(seeded):
    """``seeded=False``: the authors' default (remove_first=None): states 0, 2, ..., 12 through 7 blocks.
    ``seeded=True``: their remove_first="TRUE": state 0 starts the intra chains, 6 blocks read 2..12."""
    selected = [0, 2, 4, 6, 8, 10, 12]
    states = {"text": _states(-0.7)[:, selected], "image": _states(0.3)[:, selected]}
    tower = SANItemTower({"text": 768, "image": 768}, {"text": 7, "image": 7}, 64, seeded=seeded)
    _fill_tower(tower, 6 if seeded else 7, 500 if seeded else 10)
    # recorded: IISANAdaptedMModel.forward -> (image, (text, inter)), first 4 values of both items
    if seeded:
        expected = [[0.1004042, -0.0210032, -0.1223046, -0.0302448, 0.0993222, -0.0202148, -0.1209805, -0.0306267],
                    [0.1150754, -0.0114187, -0.1139404, -0.0246165, 0.1164025, -0.0108275, -0.115086, -0.0255595],
                    [0.0640889, -0.0783195, -0.0730602, 0.0713574, 0.0579234, -0.0808645, -0.067676, 0.0755556]]
        sums = [0.24230706691741943, 0.13457804918289185, -0.05272209644317627]
    else:
        expected = [[0.0751712, -0.0733543, -0.113146, 0.0249185, 0.0741088, -0.072961, -0.1119629, 0.0248885],
                    [0.0904762, -0.063033, -0.1051895, 0.0296848, 0.0918854, -0.0614417, -0.1061101, 0.0278108],
                    [0.0650465, -0.0832482, -0.0790194, 0.0735531, 0.0643662, -0.0887967, -0.0800428, 0.0787873]]
        sums = [0.09316450357437134, -0.010543256998062134, -0.011380374431610107]
    for out, first, total in zip(_branches(tower, states), expected, sums, strict=True):
        assert out.shape == (2, 64)
        torch.testing.assert_close(out[:, :4], golden(first, 2, 4), **TOL)
        assert out.sum().item() == pytest.approx(total, abs=2e-5)


def test_sasrec_matches_the_authors_user_encoder_at_every_real_position():
    model = SASRec(dim=8, max_len=4, blocks=2, heads=2, dropout=0.1).eval()
    seed = 100
    fill(model.position.weight, seed, 0.3)
    fill(model.input_norm.weight, seed + 1, 0.1, 1.0)
    fill(model.input_norm.bias, seed + 2, 0.1)
    seed += 3
    for block in model.blocks:
        for linear in (block.attention.query, block.attention.key, block.attention.value, block.attention.out):
            fill(linear.weight, seed, 0.4)
            seed += 1
        for norm in (block.attention_norm,):
            fill(norm.weight, seed, 0.1, 1.0)
            fill(norm.bias, seed + 1, 0.1)
            seed += 2
        fill(block.ffn[0].weight, seed, 0.3)
        fill(block.ffn[0].bias, seed + 1, 0.1)
        fill(block.ffn[2].weight, seed + 2, 0.3)
        fill(block.ffn[2].bias, seed + 3, 0.1)
        seed += 4
        fill(block.ffn_norm.weight, seed, 0.1, 1.0)
        fill(block.ffn_norm.bias, seed + 1, 0.1)
        seed += 2
    embs = pattern(2 * 4 * 8, 7, 1.0).view(2, 4, 8).float()
    valid = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]).bool()  # left padding: user 0 has 3 items, user 1 two
    with torch.no_grad():
        out = model(embs, valid)
    # recorded: User_Encoder(embs, log_mask).eval(); padded positions are never read, so only real ones
    user0 = golden([1.2321421, 1.4155937, 0.1718668, -0.301673, -1.4980153, -1.054294, -0.6252372, 0.8713921,
                    -1.4415665, -0.4730941, 0.5582782, 1.3173075, 1.4730636, 0.7870266, -0.1593331, -1.3371279,
                    0.1472265, 0.7665376, 0.9433964, 1.3498781, 0.6670512, -0.2667724, -1.4039104, -1.9233687], 3, 8)
    user1 = golden([-0.7916656, -0.254218, 1.9292988, 1.0682472, 1.0466101, -0.5065826, -1.1570401, -0.8465695,
                    -0.2642263, -1.0497482, 0.1464775, 0.3976583, 1.9188517, 0.9367849, 0.4277583, -1.8367442], 2, 8)
    torch.testing.assert_close(out[0, 1:], user0, **TOL)
    torch.testing.assert_close(out[1, 2:], user1, **TOL)


def test_in_batch_loss_matches_the_authors_model_forward():
    B, L, D = 3, 4, 5
    # padding, a repeat inside a user (4), an item shared by two users (2 and 3)
    ids = torch.tensor([[0, 0, 3, 5, 2], [0, 4, 4, 6, 3], [1, 2, 7, 8, 9]])
    item_embs = pattern(B * (L + 1) * D, 21, 1.0).view(B, L + 1, D).float()
    user_states = pattern(B * L * D, 22, 1.0).view(B, L, D).float()
    pop = torch.tensor([1.0] + list(np.linspace(0.02, 0.2, 9)), dtype=torch.float32)
    loss = in_batch_softmax_loss(user_states, item_embs, ids, torch.log(pop))
    # recorded: ModelMM.forward with its encoders replaced by these item embeddings and user states
    assert loss.item() == pytest.approx(3.87152361869812, rel=1e-5)


def test_metrics_match_the_authors_argsort_ranking():
    N = 15
    scores = pattern(4 * (N + 1), 31, 1.0).view(4, N + 1).float()  # no ties
    targets = torch.tensor([3, 7, 12, 5])
    history = torch.tensor([[1, 2, 0], [0, 4, 9], [12, 6, 0], [0, 0, 8]])  # user 2's target is in its history
    ranks = rank_targets(scores.clone(), targets, history)
    # recorded: metrics_topK(score, label, item_rank, 5) per user: [hit@5, ndcg@5]
    recorded = [[1.0, 0.3868528], [1.0, 0.6309298], [0.0, 0.0], [0.0, 0.0]]
    for u, (hit, ndcg) in enumerate(recorded):
        m = metrics_from_ranks(ranks[u : u + 1], ks=(5,))
        assert (m["hit@5"], m["ndcg@5"]) == pytest.approx((hit, ndcg), abs=1e-6)
    assert ranks[0, 0].item() == 5  # so user 0's ndcg@5 is 1 / log2(6) = 0.3868528, as recorded
