"""Differential tests: the library's pure computations against brute-force references written from the
docs (README's protocol, the evaluate and loss modules' docstrings: the authors' split, loss and ranking), on
seeded random cases with ties, duplicates, padding, repeated targets and minimal histories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from iisan.data.batches import CollateTrain
from iisan.data.epochs import epoch_order
from iisan.data.interactions import load_dataset
from iisan.data.shapes import ShapeBuckets
from iisan.errors import DataError
from iisan.evaluate import KS, evaluate_scores, popularity_metrics, popularity_scores, score_ranks
from iisan.model.feeds import CachedStates
from iisan.model.id_embedding import ItemIDEncoder
from iisan.model.loss import in_batch_softmax_loss
from iisan.model.recommender import IISANItemEncoder, Recommender
from iisan.model.san import SANItemTower

# ------------------------------------------------------------------------------------------------
# brute-force references


def expected_hit_ndcg(scores, target: int, history, k: int, repeated: bool) -> tuple[float, float]:
    """One user: candidates are items 1..N not in the history (the target kept with ``repeated``); the
    target's place is uniform over the places its ties allow; every place enumerated."""
    hist = {int(h) for h in history if h != 0}
    if target in hist and not repeated:
        return 0.0, 0.0
    candidates = [i for i in range(1, len(scores)) if i not in hist or i == target]
    higher = sum(scores[i] > scores[target] for i in candidates)
    ties = sum(scores[i] == scores[target] for i in candidates if i != target)
    places = range(higher + 1, higher + ties + 2)
    return (sum(p <= k for p in places) / len(places),
            sum(1 / math.log2(p + 1) for p in places if p <= k) / len(places))


def expected_metrics(scores, targets, history, ks, repeated) -> dict[str, float]:
    out = {}
    for k in ks:
        per_user = [expected_hit_ndcg(scores[u], int(targets[u]), history[u], k, repeated) for u in range(len(targets))]
        out[f"hit@{k}"] = float(np.mean([h for h, _ in per_user]))
        out[f"ndcg@{k}"] = float(np.mean([n for _, n in per_user]))
    return out


def protocol_reference(items: list[str], users: list[tuple[str, list[str]]], L: int, min_len: int) -> dict:
    """README 'The protocol' / authors' read_behaviors, in plain Python."""
    provisional = {item: row + 1 for row, item in enumerate(items)}
    kept, seqs = [], []
    for user, tokens in users:
        seq = [provisional[t] for t in tokens if t in provisional]  # unknown ids skipped
        if len(seq) >= min_len:
            kept.append(user)
            seqs.append(seq[-(L + 3):])
    used = sorted({x for s in seqs for x in s})  # provisional order = items-file order
    new = {p: n + 1 for n, p in enumerate(used)}
    seqs = [[new[x] for x in s] for s in seqs]
    counts = np.zeros(len(used) + 1)
    for s in seqs:
        for x in s[:-2]:
            counts[x] += 1
    return {"users": kept, "item_ids": [""] + [items[p - 1] for p in used], "seqs": seqs, "counts": counts,
            "valid": ([s[:-2][-L:] for s in seqs], [s[-2] for s in seqs], [s[:-2] for s in seqs]),
            "test": ([s[:-1][-L:] for s in seqs], [s[-1] for s in seqs], [s[:-1] for s in seqs])}


def unpad(row) -> list[int]:
    row = [int(x) for x in row]
    start = next((i for i, x in enumerate(row) if x != 0), len(row))
    assert 0 not in row[start:], f"padding inside a sequence: {row}"
    return row[start:]


def loop_loss(users, items, ids, log_pop):
    """The authors' in-batch loss (their ModelMM.forward), a row and a column at a time, masked columns left out."""
    B, L, D = users.shape
    flat = ids.reshape(-1).tolist()
    E = items.reshape(-1, D)
    terms = []
    for i in range(B):
        own = set(ids[i].tolist())
        for j in range(L):
            if ids[i, j] == 0:
                continue
            target = i * (L + 1) + j + 1
            cols = [c for c, item in enumerate(flat) if c == target or (item != 0 and item not in own)]
            logits = torch.stack([users[i, j] @ E[c] - log_pop[flat[c]] for c in cols])
            terms.append(torch.logsumexp(logits, 0) - logits[cols.index(target)])
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------------
# random cases


def random_eval_case(rng):
    N, U, H = int(rng.integers(1, 25)), int(rng.integers(1, 12)), int(rng.integers(1, 8))
    kind = rng.integers(3)
    if kind == 0:
        scores = rng.integers(0, int(rng.integers(1, 5)), size=(U, N + 1)).astype(np.float32)  # many ties
    elif kind == 1:
        scores = rng.standard_normal((U, N + 1)).astype(np.float32)
    else:
        scores = np.round(rng.standard_normal((U, N + 1)), 1).astype(np.float32)
    targets = rng.integers(1, N + 1, size=U)
    history = rng.integers(0, N + 1, size=(U, H))  # duplicates and padding anywhere
    for u in range(U):
        history[u, : rng.integers(0, H + 1)] = 0
        if rng.random() < 0.3:
            history[u, rng.integers(0, H)] = targets[u]  # the target repeats a history item
    ks = tuple(sorted({int(k) for k in rng.integers(1, N + 6, size=3)}))
    return scores, targets, history, ks


def random_users(rng, nitems: int, nusers: int, L: int):
    items = [f"I{k:03d}" for k in rng.permutation(nitems)]  # file order differs from name order
    users = []
    for u in range(nusers):
        pool = items + ["UNKNOWN"]
        tokens = [str(rng.choice(pool)) for _ in range(int(rng.integers(0, 3 * L + 8)))]
        if len(tokens) > 2 and rng.random() < 0.3:
            tokens[-1] = tokens[0]  # test target repeats the history
        users.append((f"U{u}", tokens))
    return items, users


def write_files(tmp_path, items, users):
    up, ip = tmp_path / "users.tsv", tmp_path / "items.tsv"
    up.write_text("".join(f"{u}\t{' '.join(t)}\n" for u, t in users))
    ip.write_text("".join(f"{i}\ttitle of {i}\n" for i in items))
    return up, ip


# ------------------------------------------------------------------------------------------------
# evaluation


@pytest.mark.parametrize("repeated", [False, True])
def test_hr_ndcg_equal_brute_force_expectation_over_ties(repeated):
    rng = np.random.default_rng(1)
    for case in range(150):
        scores, targets, history, ks = random_eval_case(rng)
        got = evaluate_scores(lambda sl, s=scores: torch.from_numpy(s[sl]).clone(), targets, history,
                              batch_users=int(rng.integers(1, 14)), rank_repeated_targets=repeated, ks=ks)
        want = expected_metrics(scores.astype(np.float64), targets, history, ks, repeated)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-9), (case, key, scores, targets, history)


def test_ranks_do_not_depend_on_the_evaluation_batch_size():
    rng = np.random.default_rng(2)
    for _ in range(100):
        scores, targets, history, _ = random_eval_case(rng)
        fn = lambda sl, s=scores: torch.from_numpy(s[sl]).clone()  # noqa: E731
        whole = score_ranks(fn, targets, history, batch_users=len(targets))
        for size in (1, 2, 3, 5, len(targets) + 1):
            assert torch.equal(score_ranks(fn, targets, history, batch_users=size), whole)


# ------------------------------------------------------------------------------------------------
# data protocol and popularity


def test_protocol_split_truncation_and_reindexing_match_reference(tmp_path):
    rng = np.random.default_rng(3)
    checked = 0
    for case in range(60):
        L, min_len = int(rng.integers(1, 6)), int(rng.integers(3, 7))
        items, users = random_users(rng, int(rng.integers(1, 30)), int(rng.integers(1, 15)), L)
        ref = protocol_reference(items, users, L, min_len)
        folder = tmp_path / str(case)
        folder.mkdir()
        if not ref["users"]:
            with pytest.raises(DataError, match="no user has"):
                load_dataset(*write_files(folder, items, users), max_seq_len=L, min_seq_len=min_len)
            continue
        data = load_dataset(*write_files(folder, items, users), max_seq_len=L, min_seq_len=min_len)
        checked += 1
        assert data.user_ids == ref["users"] and data.item_ids == ref["item_ids"]
        assert [unpad(row) for row in data.padded] == ref["seqs"]
        assert [unpad(row) for row in data.train_sequences()] == [s[:-2] for s in ref["seqs"]]
        for split in ("valid", "test"):
            inputs, targets, history = data.eval_split(split)
            want_inputs, want_targets, want_history = ref[split]
            assert inputs.shape[1] == L
            assert [unpad(r) for r in inputs] == want_inputs, split
            assert targets.tolist() == want_targets, split
            assert [unpad(r) for r in history] == want_history, split
        assert data.repeated_targets("test") == sum(t in h for _, t, h in zip(*ref["test"]))
    assert checked > 40


def test_popularity_counts_train_parts_and_most_popular_baseline_matches_reference(tmp_path):
    rng = np.random.default_rng(4)
    for case in range(25):
        L, min_len = int(rng.integers(1, 6)), 3
        items, users = random_users(rng, int(rng.integers(2, 30)), int(rng.integers(3, 15)), L)
        ref = protocol_reference(items, users, L, min_len)
        if not ref["users"]:
            continue
        folder = tmp_path / str(case)
        folder.mkdir()
        data = load_dataset(*write_files(folder, items, users), max_seq_len=L, min_seq_len=min_len)
        counts = ref["counts"]
        assert popularity_scores(data.train_sequences(), data.num_items).tolist() == counts.tolist()
        prob = counts / counts.sum()
        prob[0] = 1.0
        np.testing.assert_allclose(data.popularity(), prob, rtol=1e-12)
        for split in ("valid", "test"):
            for repeated in (False, True):
                got = popularity_metrics(data, split, repeated, batch_users=int(rng.integers(1, 5)))
                _, targets, history = ref[split]
                want = expected_metrics([counts] * len(targets), targets, history, KS, repeated)
                assert got == pytest.approx(want, abs=1e-9), (case, split, repeated)


# ------------------------------------------------------------------------------------------------
# loss, batches, buckets


def test_in_batch_loss_and_gradients_match_loop_reference():
    rng = np.random.default_rng(5)
    for case in range(120):
        B, L, D, N = (int(rng.integers(1, 6)), int(rng.integers(1, 5)), int(rng.integers(1, 4)),
                      int(rng.integers(1, 8)))
        ids = rng.integers(1, N + 1, size=(B, L + 1))
        for i in range(B):
            ids[i, : rng.integers(0, L + 1)] = 0
        ids = torch.from_numpy(ids)
        if not (ids[:, :-1] != 0).any():
            continue
        users = torch.tensor(rng.standard_normal((B, L, D)), requires_grad=True)
        items = torch.tensor(rng.standard_normal((B, L + 1, D)), requires_grad=True)
        pop = rng.random(N + 1) + 0.01
        pop /= pop.sum()
        pop[0] = 1.0
        log_pop = torch.tensor(np.log(pop))
        got, want = in_batch_softmax_loss(users, items, ids, log_pop), loop_loss(users, items, ids, log_pop)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6), (case, ids)
        for g, w in zip(torch.autograd.grad(got, (users, items)), torch.autograd.grad(want, (users, items))):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def tiny_recommender(kind: str, N: int, seed: int) -> Recommender:
    torch.manual_seed(seed)
    pop = torch.rand(N + 1) + 0.1
    pop /= pop.sum()
    pop[0] = 1.0
    if kind == "id":
        encoder = ItemIDEncoder(N, 8)
    else:
        tables = {"text": torch.randn(N + 1, 3, 6), "image": torch.randn(N + 1, 3, 5)}
        for t in tables.values():
            t[0] = 0
        encoder = IISANItemEncoder(CachedStates(tables, {"text": "float32", "image": "float32"}),
                                   SANItemTower({"text": 6, "image": 5}, {"text": 3, "image": 3}, 8,
                                                {"text": 4, "image": 4}))
    model = Recommender(encoder, pop, dim=8, max_len=4, blocks=1, heads=2)
    return model.eval()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["id", "san"])
def test_encodings_and_bucket_padding_change_no_batch_loss_or_gradient(kind):
    """Every item layout ('items', 'slots', 'all', towers by distinct item) and bucket ladder: each slot
    finds its own item, padded rows are index 0 that no slot points at, and loss and gradients are those
    of the plain layout."""
    rng = np.random.default_rng(6)
    for case in range(6 if kind == "id" else 3):
        N, U = int(rng.integers(1, 40)), int(rng.integers(1, 20))
        seqs = rng.integers(1, N + 1, size=(U, 5))
        for u in range(U):
            seqs[u, : rng.integers(0, 4)] = 0
        users = list(rng.choice(U, size=int(rng.integers(1, U + 1)), replace=False))
        model = tiny_recommender(kind, N, case)
        base = loss_and_grads(model, CollateTrain(seqs, "items")(users))
        for encoding in ("items", "slots", "all"):
            for growth in (None, 0.0, 0.125, 1.0):
                buckets = None if growth is None else ShapeBuckets(growth=growth)
                plain = CollateTrain(seqs, encoding)(users)
                for per_item in ([(), ("text",), ("text", "image")] if encoding == "slots" else [()]):
                    batch = CollateTrain(seqs, encoding, None, buckets, per_item)(users)
                    ids = batch.items.ids
                    assert torch.equal(ids[batch.inverse].view(len(users), -1), torch.from_numpy(seqs[users]))
                    if buckets is not None and encoding != "all":
                        assert len(ids) == buckets.bucket(len(plain.items.ids))
                        assert not ids[len(plain.items.ids):].any()  # padded rows: index 0
                    if per_item:
                        assert torch.equal(batch.items.distinct.ids[batch.items.to_distinct], ids)
                    loss, grads = loss_and_grads(model, batch)
                    assert loss == pytest.approx(base[0], rel=1e-5), (case, encoding, growth, per_item)
                    assert grads.keys() == base[1].keys()
                    for name, grad in grads.items():
                        torch.testing.assert_close(grad, base[1][name], rtol=1e-4, atol=1e-6)


def test_authors_user_order_is_distributed_samplers():
    rng = np.random.default_rng(7)
    for _ in range(60):
        n, world, epoch = int(rng.integers(1, 150)), int(rng.integers(1, 5)), int(rng.integers(0, 20))
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch + 1)
            assert epoch_order(n, None, epoch, rank, world).tolist() == list(sampler)
