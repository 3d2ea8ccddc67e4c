"""Full-ranking metrics against hand-computed values, including the repeated-target rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iisan.evaluate import evaluate_split, metrics_from_ranks, popularity_metrics, rank_targets


def test_metrics_from_ranks_by_hand():
    ranks = torch.tensor([1.0, 3.0, 10.0, 11.0, math.inf])
    m = metrics_from_ranks(ranks, ks=(5, 10))
    assert m["hit@5"] == pytest.approx(2 / 5)
    assert m["hit@10"] == pytest.approx(3 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 5)


def test_ranks_mask_history_and_padding():
    # items 0..5; column 0 is padding and never ranks
    scores = torch.tensor([[9.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    # target 4 (score 2); history holds items 1 and 2 (scores 5, 4), so only item 3 is above it
    ranks = rank_targets(scores, torch.tensor([4]), torch.tensor([[0, 1, 2]]))
    assert ranks.tolist() == [2.0]


def test_repeated_target_is_a_miss_unless_flag():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    targets, history = torch.tensor([1]), torch.tensor([[0, 1, 3]])  # target 1 repeats the history
    assert rank_targets(scores.clone(), targets, history).tolist() == [math.inf]
    # with the flag the target keeps its score; item 3 is masked, so nothing beats it
    assert rank_targets(scores, targets, history, rank_repeated_targets=True).tolist() == [1.0]


def test_evaluate_split_chunks_give_same_metrics():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 4, generator=g)
    inputs = np.random.default_rng(0).integers(0, 30, size=(50, 3))
    targets = np.random.default_rng(1).integers(1, 30, size=50)
    history = inputs

    def users(tab, x):
        return tab[x].sum(1)

    a = evaluate_split(users, table, inputs, targets, history, batch_users=7)
    b = evaluate_split(users, table, inputs, targets, history, batch_users=1000)
    assert a == b
    # hand check one user
    s = users(table, torch.as_tensor(inputs[:1])) @ table.T
    s[0, torch.as_tensor(history[0])] = -math.inf
    s[0, 0] = -math.inf
    t = targets[0]
    rank = 1 + int((s[0] > s[0, t]).sum()) if not math.isinf(s[0, t]) else math.inf
    single = evaluate_split(users, table, inputs[:1], targets[:1], history[:1])
    assert single["hit@20"] == (1.0 if rank <= 20 else 0.0)


def test_popularity_baseline_by_hand(tmp_path):
    from iisan.data.interactions import load_dataset

    (tmp_path / "items.tsv").write_text("".join(f"{x}\tt{x}\n" for x in "abcdefg"))
    # train parts: u1 a b c (then d, e), u2 a b f (then g, a)
    (tmp_path / "users.tsv").write_text("u1\ta b c d e\nu2\ta b f g a\n")
    data = load_dataset(tmp_path / "users.tsv", tmp_path / "items.tsv", max_seq_len=3)
    # popularity: a 2, b 2, c 1, f 1, d 0, e 0, g 0
    m = popularity_metrics(data, "valid")
    # u1 valid target d: history a b c masked; above d (0): f (1) -> rank 2 (ties do not count)
    # u2 valid target g: history a b f masked; above g (0): c (1) -> rank 2
    assert m["hit@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3))
    # test: u2's target a repeats its history: a miss under the paper's protocol
    test = popularity_metrics(data, "test")
    assert test["hit@20"] == pytest.approx(0.5)
    assert popularity_metrics(data, "test", rank_repeated_targets=True)["hit@20"] == 1.0
