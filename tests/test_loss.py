"""The vectorised in-batch loss against a plain loop written from the authors' description."""

from __future__ import annotations

import math

import pytest
import torch

from iisan.model.loss import in_batch_softmax_loss


def loop_reference(users, items, ids, log_pop):
    """Row by row, column by column, as in the authors' ``ModelMM.forward``."""
    B, L, D = users.shape
    flat_ids = ids.reshape(-1).tolist()
    flat_items = items.reshape(-1, D)
    total, count = 0.0, 0
    for i in range(B):
        row_items = set(ids[i].tolist())
        for j in range(L):
            if ids[i, j] == 0:  # padded input position
                continue
            target = i * (L + 1) + j + 1
            logits = []
            for c, item in enumerate(flat_ids):
                value = float(users[i, j] @ flat_items[c]) - float(log_pop[item])
                if c != target and (item == 0 or item in row_items):
                    value = -1e4
                logits.append(value)
            top = max(logits)
            log_z = top + math.log(sum(math.exp(v - top) for v in logits))
            total += log_z - logits[target]
            count += 1
    return total / count


@pytest.mark.parametrize("seed", range(5))
def test_matches_loop_reference_with_repeats_and_padding(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, D, N = 6, 5, 8, 9  # few items, so repeats within and across rows are frequent
    ids = torch.randint(1, N + 1, (B, L + 1), generator=g)
    lengths = torch.randint(2, L + 2, (B,), generator=g)
    for i, n in enumerate(lengths):
        ids[i, : L + 1 - n] = 0  # left padding; at least 2 items per row
    users = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    items = torch.randn(B, L + 1, D, generator=g, dtype=torch.float64)
    pop = torch.rand(N + 1, generator=g, dtype=torch.float64) + 0.1
    pop[0] = 1.0
    log_pop = pop.log()
    expected = loop_reference(users, items, ids, log_pop)
    got = in_batch_softmax_loss(users, items, ids, log_pop)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert (ids[:, :-1] == 0).any() and len(set(ids[ids > 0].tolist())) < (ids > 0).sum()


def test_target_repeated_in_its_own_row_keeps_only_its_true_column():
    # one user, sequence [7, 7]: the input 7 predicts the target 7 in column 1; column 0 (same item)
    # must be masked, so the loss is 0 (only one unmasked column).
    ids = torch.tensor([[7, 7]])
    users = torch.randn(1, 1, 4)
    items = torch.randn(1, 2, 4)
    loss = in_batch_softmax_loss(users, items, ids, torch.zeros(8))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_popularity_correction_shifts_logits():
    # two users [1, 2] and [3, 4], one position each; logits are u . e - log p(item) over the columns
    # that are neither the row's own items (except its target) nor padding.
    ids = torch.tensor([[1, 2], [3, 4]])
    users = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    items = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])
    log_pop = torch.log(torch.tensor([1.0, 0.1, 0.2, 0.3, 0.4]))
    # row 0: columns 0 (item 1, own) and 1 (target item 2) and 2 (item 3) and 3 (item 4)
    z0 = torch.tensor([2.0 - log_pop[2], 0.0 - log_pop[3], 1.0 - log_pop[4]])
    # row 1 (user 2, target item 4 in column 3): candidates item 1 (col 0), item 2 (col 1), item 4 (col 3)
    z1 = torch.tensor([0.0 - log_pop[1], 0.0 - log_pop[2], 0.0 - log_pop[4]])
    expected = (-torch.log_softmax(z0, 0)[0] - torch.log_softmax(z1, 0)[2]) / 2
    got = in_batch_softmax_loss(users, items, ids, log_pop)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
