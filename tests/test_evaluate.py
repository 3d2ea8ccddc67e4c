"""Full-ranking metrics against hand-computed values, including the repeated-target rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iisan.evaluate import metrics_from_ranks, popularity_metrics, rank_targets, split_ranks


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
    assert ranks.tolist() == [[2.0, 0.0]]  # [best place, items tied with the target]


def test_float64_scores_are_ranked_in_their_own_precision():
    """Scores 1 and 1 + 1e-12 are one float32 value: rounded, the target tied with the item above it."""
    scores = torch.tensor([[0.0, 1.0 + 1e-12, 1.0, 0.5]], dtype=torch.float64)
    assert rank_targets(scores, torch.tensor([2]), torch.tensor([[0]])).tolist() == [[2.0, 0.0]]
    assert rank_targets(scores.float(), torch.tensor([2]), torch.tensor([[0]])).tolist() == [[1.0, 1.0]]


def test_a_target_scored_minus_inf_is_a_miss_as_documented():
    """An overflow to -inf cannot be told from the history's mask: the module docstring says it is a miss."""
    scores = torch.tensor([[0.0, -math.inf, -2.0, -3.0]])
    assert rank_targets(scores, torch.tensor([1]), torch.tensor([[0]])).tolist() == [[math.inf, 0.0]]


def test_repeated_target_is_a_miss_unless_flag():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    targets, history = torch.tensor([1]), torch.tensor([[0, 1, 3]])  # target 1 repeats the history
    assert rank_targets(scores.clone(), targets, history).tolist() == [[math.inf, 0.0]]
    # with the flag the target keeps its score; item 3 is masked, so nothing beats it
    assert rank_targets(scores, targets, history, rank_repeated_targets=True).tolist() == [[1.0, 0.0]]


def test_ties_take_every_place_among_them_equally_often():
    # target 2 (score 3) ties with items 1 and 4; item 3 (score 5) is above: places 2, 3, 4 equally likely
    scores = torch.tensor([[0.0, 3.0, 3.0, 5.0, 3.0, 1.0]])
    ranks = rank_targets(scores, torch.tensor([2]), torch.tensor([[0]]))
    assert ranks.tolist() == [[2.0, 2.0]]
    m = metrics_from_ranks(ranks, ks=(2, 3, 10))
    # by hand: hit@2 = 1/3 (only place 2), hit@3 = 2/3, hit@10 = 1
    assert m["hit@2"] == pytest.approx(1 / 3)
    assert m["hit@3"] == pytest.approx(2 / 3)
    assert m["hit@10"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / 3)


def test_ranks_count_every_higher_and_tied_item_as_a_loop_does():
    """Scores from a few values (many ties), histories and repeated targets: the counts against a plain loop."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (64, 301), generator=gen).float()
    targets = torch.randint(1, 301, (64,), generator=gen)
    history = torch.randint(0, 301, (64, 7), generator=gen)
    history[::5, 0] = targets[::5]  # every fifth target repeats the history
    for repeated in (False, True):
        ranks = rank_targets(scores.clone(), targets, history, rank_repeated_targets=repeated)
        for u in range(64):
            t, masked = int(targets[u]), set(history[u].tolist()) | {0}
            if t in masked and not repeated:
                assert ranks[u].tolist() == [math.inf, 0.0]
                continue
            others = [float(scores[u, i]) for i in range(301) if i not in masked and i != t]
            target = float(scores[u, t])
            assert ranks[u].tolist() == [1 + sum(x > target for x in others), sum(x == target for x in others)]


def evaluate_split(user_vectors, table, inputs, targets, history, batch_users=1024, ks=(5, 10, 20)):
    return metrics_from_ranks(split_ranks(user_vectors, table, inputs, targets, history, batch_users), ks)


def test_a_model_that_scores_every_item_the_same_hits_about_k_in_items():
    # 500 items, 200 users, histories of 3 items: the target is one of 497 tied candidates for everyone
    items, users = 500, 200
    rng = np.random.default_rng(0)
    history = np.stack([rng.choice(np.arange(1, items + 1), 4, replace=False) for _ in range(users)])
    targets, history = history[:, 0], history[:, 1:]
    m = evaluate_split(lambda table, x: torch.ones(len(x), 4), torch.ones(items + 1, 4), history, targets,
                       history, ks=(10,))
    assert m["hit@10"] == pytest.approx(10 / 497)  # not 1: ties no longer count in the target's favour
    assert m["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 11)) / 497)


def test_a_sorted_ranking_averages_to_the_expected_metrics():
    # The authors sort: a tied target lands at an arbitrary place among its ties. Averaged over random
    # tie-breaks (a random permutation before a stable sort), the hit rate is what metrics_from_ranks says.
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (1, 40), generator=g).float()  # many ties
    scores[0, 0] = -math.inf
    target = 7
    hits = []
    for _ in range(4000):
        perm = torch.randperm(40, generator=g)
        order = perm[torch.argsort(scores[0, perm], descending=True, stable=True)]
        hits.append(float(int((order == target).nonzero()) + 1 <= 5))
    ranks = rank_targets(scores.clone(), torch.tensor([target]), torch.tensor([[0]]))
    assert sum(hits) / len(hits) == pytest.approx(metrics_from_ranks(ranks, ks=(5,))["hit@5"], abs=0.03)


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
    # by hand, user by user: rank among unmasked items (random scores: no ties), a target in the
    # history is masked with it (a miss)
    ranks = []
    for u in range(len(targets)):
        s = users(table, torch.as_tensor(inputs[u:u + 1]))[0] @ table.T  # (30,)
        s[torch.as_tensor(history[u])] = -math.inf
        s[0] = -math.inf
        t = targets[u]
        ranks.append(math.inf if math.isinf(s[t]) else 1 + int((s > s[t]).sum()))
    assert any(5 < r <= 20 for r in ranks) and any(math.isinf(r) for r in ranks)  # the cases that matter
    for k in (5, 10, 20):
        assert a[f"hit@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]), abs=1e-12)
        assert a[f"ndcg@{k}"] == pytest.approx(np.mean([1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]),
                                               abs=1e-12)


def test_popularity_baseline_by_hand(tmp_path):
    from iisan.data.interactions import load_dataset

    (tmp_path / "items.tsv").write_text("".join(f"{x}\tt{x}\n" for x in "abcdefg"))
    # train parts: u1 a b c (then d, e), u2 a b f (then g, a)
    (tmp_path / "users.tsv").write_text("u1\ta b c d e\nu2\ta b f g a\n")
    data = load_dataset(tmp_path / "users.tsv", tmp_path / "items.tsv", max_seq_len=3)
    # popularity: a 2, b 2, c 1, f 1, d 0, e 0, g 0
    m = popularity_metrics(data, "valid")
    # u1 valid target d: history a b c masked; above d (0): f (1); tied with d: e and g (0) -> places 2..4
    # u2 valid target g: history a b f masked; above g (0): c (1); tied with g: d and e (0) -> places 2..4
    assert m["hit@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    # test: u2's target a repeats its history: a miss under the paper's protocol
    test = popularity_metrics(data, "test")
    assert test["hit@20"] == pytest.approx(0.5)
    assert popularity_metrics(data, "test", rank_repeated_targets=True)["hit@20"] == 1.0


def test_rank_repeated_targets_reaches_the_evaluation_of_a_model(tiny_config):
    """The config key, not only ``rank_targets``: with it a target the user had before is ranked (the
    authors'), without it that user is a miss."""
    from iisan.data.run_data import load_data
    from iisan.evaluate import evaluate_ranks
    from iisan.model.build import build_model

    cfg = tiny_config(method="id")
    data = load_data(cfg)
    _, targets, history = data.eval_split("test")
    repeats = (history == targets[:, None]).any(1)
    assert 0 < repeats.sum() < len(targets)  # the tiny data has users whose target repeats their history
    torch.manual_seed(0)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    ours = evaluate_ranks(model, data, "test", cfg, torch.device("cpu"))
    authors = evaluate_ranks(model, data, "test", cfg.replace(rank_repeated_targets=True), torch.device("cpu"))
    assert torch.isinf(ours[repeats, 0]).all() and torch.isfinite(authors[:, 0]).all()
    assert torch.equal(ours[~repeats], authors[~repeats])


def test_a_nan_target_score_makes_the_metrics_nan_not_a_number_that_looks_like_a_result():
    """As evaluate's docstring says: NaN compares false with everything, so no item is counted higher or tied
    (ties -1), and the metrics are 0/0."""
    scores = torch.tensor([[0.0, 1.0, math.nan, 0.5], [0.0, 1.0, 2.0, 0.5]])
    ranks = rank_targets(scores, torch.tensor([2, 3]), torch.tensor([[0], [0]]))
    assert ranks.tolist() == [[1.0, -1.0], [3.0, 0.0]]
    metrics = metrics_from_ranks(ranks[:1], (10,))
    assert all(math.isnan(v) for v in metrics.values())
    assert metrics_from_ranks(ranks[1:], (10,))["hit@10"] == 1.0


def test_raising_a_target_s_score_never_ranks_it_lower_not_even_to_inf():
    """A target scored +inf (an fp32 overflow) ranks first, tied with the other items at +inf; only a masked
    target (-inf: it repeats the history) is a miss. A NaN score of another item counts as below the target."""
    history = torch.tensor([[0]])
    places = [rank_targets(torch.tensor([[0.0, v, 2.0, 1.0]]), torch.tensor([1]), history).tolist()[0]
              for v in (0.5, 1.5, 3.0, 1e38, math.inf)]
    assert places == [[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    tied = rank_targets(torch.tensor([[0.0, math.inf, math.inf, 1.0]]), torch.tensor([1]), history)
    assert tied.tolist() == [[1.0, 1.0]]
    assert rank_targets(torch.tensor([[0.0, 1.0, math.nan, 2.0]]), torch.tensor([1]), history).tolist() == [[2.0, 0.0]]
    repeated = torch.tensor([[0.0, math.inf, 2.0, 1.0]])
    assert rank_targets(repeated, torch.tensor([1]), torch.tensor([[1]])).tolist() == [[math.inf, 0.0]]


def test_a_default_evaluation_chunk_holds_at_most_2_27_scores_however_many_the_items():
    """2048 users x 500k items made 4 GiB arrays per chunk on a GPU (two alive at once); a given size wins."""
    from iisan.config import Config
    from iisan.evaluate import eval_chunk

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # (a device object needs no GPU)
    assert [eval_chunk(Config(), cpu, n) for n in (20_314, 1_048_575, 1_048_576, 4_000_000)] == [128, 128, 127, 33]
    on_gpu = [eval_chunk(Config(), gpu, n) for n in (20_314, 65_535, 65_536, 500_000, 2**28)]
    assert on_gpu == [2048, 2048, 2047, 268, 1]
    assert eval_chunk(Config(eval_batch_size=4096), gpu, 500_000) == 4096


def test_the_most_popular_baseline_ranks_in_a_cpu_evaluations_chunks(monkeypatch):
    """It ranked 128 users a chunk whatever the items: 512 MiB a chunk at 1M items, and growing past it."""
    from types import SimpleNamespace

    import iisan.evaluate as evaluate

    chunks = []
    monkeypatch.setattr(evaluate, "evaluate_scores", lambda scores, targets, history, chunk, repeated: chunks.append(
        chunk))
    for items in (20_314, 4_000_000):
        data = SimpleNamespace(num_items=items, eval_split=lambda split: (None, np.zeros(3), np.zeros((3, 2))),
                               train_sequences=lambda: np.ones((3, 2), dtype=np.int64))
        popularity_metrics(data, "test")
    assert chunks == [128, 33]


def test_ranks_are_computed_in_fp32_inside_a_callers_autocast():
    """evaluate(run) called inside torch.autocast(bfloat16): the scores were bf16, where items scored 1.0001 and
    1.0002 tie; training's evaluation, outside autocast, tells them apart."""
    n = 40
    table = torch.zeros(n + 1, 4)
    table[1:, 0] = 1.0 + torch.arange(n) * 1e-4  # item i scores 1 + (i - 1) 1e-4 for the user (1, 0, 0, 0)
    inputs, history = np.ones((3, 2), dtype=np.int64), np.zeros((3, 1), dtype=np.int64)
    targets = np.array([5, 20, 40])

    def user_vectors(table, inputs):
        return torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(len(inputs), 4) @ torch.eye(4)

    plain = split_ranks(user_vectors, table, inputs, targets, history)
    assert plain.tolist() == [[36.0, 0.0], [21.0, 0.0], [1.0, 0.0]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(split_ranks(user_vectors, table, inputs, targets, history), plain)


def test_every_chunk_scores_into_one_buffer_and_compares_into_another(monkeypatch):
    """Scratch made anew for each chunk, on a CPU, pinned freed heap memory or paged it in again (1.7 GB, or 1.7x
    the time, for 131k users over 32k items); the ranks are the same as in one chunk."""
    import iisan.evaluate as evaluation

    g = torch.Generator().manual_seed(0)
    table = torch.randn(30, 4, generator=g)
    inputs = np.random.default_rng(0).integers(0, 30, size=(50, 3))
    targets = np.random.default_rng(1).integers(1, 30, size=50)
    calls, real = [], evaluation.rank_targets

    def spy(scores, targets, history, repeated=False, counts=None):
        calls.append((scores._base, None if counts is None else counts.untyped_storage().data_ptr(), len(scores)))
        return real(scores, targets, history, repeated, counts)

    monkeypatch.setattr(evaluation, "rank_targets", spy)
    ranks = split_ranks(lambda tab, x: tab[x].sum(1), table, inputs, targets, inputs, batch_users=7)
    assert [n for *_, n in calls] == [7] * 7 + [1]
    assert calls[0][0] is not None and all(base is calls[0][0] for base, *_ in calls)
    assert calls[0][1] is not None and {ptr for _, ptr, _ in calls} == {calls[0][1]}
    monkeypatch.undo()
    assert ranks.dtype == torch.float32
    assert torch.equal(ranks, split_ranks(lambda tab, x: tab[x].sum(1), table, inputs, targets, inputs, 1000))


class _ItemsByRow(torch.nn.Module):
    """An item encoder that is one table: item i's embedding is row i."""

    def __init__(self, rows: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(rows, 3, generator=torch.Generator().manual_seed(0)))

    def item_encoder(self, batch):
        return (self.weight[batch.ids] * (1.0 if self.training else 2.0)).to(self.dtype)  # (run in eval mode)


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_item_table_writes_each_chunk_in_place_in_item_order(chunk, dtype):
    """Chunks written into one fp32 table (a list of them and their cat held the table twice: 0.5 GB at 1M
    items), whatever the encoder computes in."""
    from iisan.evaluate import item_table

    model = _ItemsByRow(31).train()
    model.dtype = dtype
    with torch.no_grad():
        table = item_table(model, 30, chunk, None, torch.device("cpu"))
        part = item_table(model, 30, chunk, None, torch.device("cpu"), ids=np.array([5, 2, 9, 2]))
    expected = (2 * model.weight.detach()).to(dtype).float()
    assert table.shape == (31, 3) and table.dtype == torch.float32 and torch.equal(table, expected)
    assert torch.equal(part, expected[[5, 2, 9, 2]]) and model.training


class _Misshapen(_ItemsByRow):
    """``_ItemsByRow`` whose output for a chunk goes through ``reshape(rows, chunk number)``."""

    def __init__(self, reshape):
        super().__init__(31)
        self.dtype, self.reshape, self.chunks = torch.float32, reshape, 0

    def item_encoder(self, batch):
        self.chunks += 1
        return self.reshape(super().item_encoder(batch), self.chunks - 1)


@pytest.mark.parametrize("reshape, width, message", [
    (lambda rows, k: rows[:-1], None, "3 rows of width 3 for a chunk of 4 items; expected 4 rows of width 3"),
    # one row, which a copy into the chunk's 4 rows of the table would broadcast: the table took it as one row,
    # returned without an error and its last rows unwritten memory
    (lambda rows, k: rows[:1], None, "1 row of width 3 for a chunk of 4 items; expected 4 rows of width 3"),
    (lambda rows, k: torch.cat([rows, rows]), None, "8 rows of width 3 for a chunk of 4 items; expected 4 rows of "
     "width 3"),
    (lambda rows, k: rows[:, :2] if k == 2 else rows, None, "4 rows of width 2 for a chunk of 4 items; expected "
     "4 rows of width 3"),  # a later chunk of another width than the first's
    (lambda rows, k: rows, 5, "4 rows of width 3 for a chunk of 4 items; expected 4 rows of width 5"),
    (lambda rows, k: rows.sum(1), None, "a tensor of shape (4,) for a chunk of 4 items; expected 4 rows"),
    (lambda rows, k: rows[None], None, "a tensor of shape (1, 4, 3) for a chunk of 4 items; expected 4 rows"),
], ids=["fewer", "one-broadcastable", "more", "width-changes", "wrong-width", "1-D", "3-D"])
def test_an_item_encoder_output_not_shaped_as_its_chunk_is_refused_in_one_line(reshape, width, message):
    """Each chunk's output must be (its items, the table's width): anything else was an obscure copy error or,
    for fewer rows (one meant to broadcast among them), a table with unwritten rows and no error at all."""
    from iisan.errors import EncoderError
    from iisan.evaluate import item_table

    model = _Misshapen(reshape)
    with pytest.raises(EncoderError) as caught:
        item_table(model, 30, 4, None, torch.device("cpu"), **({} if width is None else {"width": width}))
    assert str(caught.value) == f"the item encoder returned {message}" and "\n" not in str(caught.value)
    assert model.training  # its own mode put back


def test_a_recommender_s_table_equals_its_items_encoded_one_by_one_and_a_misfit_encoder_is_refused(tiny_config):
    """A tiny ID model's table at its config's width equals a loop over single items; an item encoder of
    another width than the user encoder's (plugged in by hand) is refused before ranking, where it failed in
    SASRec's sum with the positions."""
    from iisan.data.batches import ItemBatch
    from iisan.data.run_data import load_data
    from iisan.errors import EncoderError
    from iisan.evaluate import evaluate_ranks, shared_item_table
    from iisan.model.build import build_model
    from iisan.model.id_embedding import ItemIDEncoder

    cfg, cpu = tiny_config(method="id", encode_batch_size=7), torch.device("cpu")
    data = load_data(cfg)
    torch.manual_seed(0)
    model, _ = build_model(cfg, data, cpu)
    with torch.no_grad():
        table = shared_item_table(model, data.num_items, cfg, None, cpu)
        by_hand = torch.cat([model.item_encoder(ItemBatch.from_numpy(np.array([i]))) for i in range(len(table))])
    assert table.shape == (data.num_items + 1, cfg.embedding_dim) and torch.equal(table, by_hand)
    model.item_encoder = ItemIDEncoder(data.num_items, cfg.embedding_dim // 2)
    with pytest.raises(EncoderError, match=f"^the item encoder returned 7 rows of width {cfg.embedding_dim // 2} "
                       f"for a chunk of 7 items; expected 7 rows of width {cfg.embedding_dim}$"):
        evaluate_ranks(model, data, "test", cfg, cpu)
