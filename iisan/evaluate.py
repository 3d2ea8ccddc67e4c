"""Full-ranking evaluation (authors' ``metrics.py``, vectorised): every item is a candidate, the
user's history is masked, and the target's place follows from ``#(score > target score)`` and the
number of other items whose score equals the target's.

Ties: the authors sort the scores (``torch.argsort``), which puts a tied target at an arbitrary place
among its ties. Here every place is taken as equally likely: the target ranks uniformly in
``best .. best + ties`` (``best = 1 + #higher``), its expected rank is ``best + ties / 2``, and HR@K
and NDCG@K are the averages of the hit and the discount over those places, which is what sorting gives
on average. (Counting only strictly higher scores would give every tie to the target: a model that
scores every item the same would hit at every K.) Ties are scores equal to the last bit: items of the same
content may score an ulp apart (summation order), which breaks their tie as sorting would. A NaN target
score (non-finite weights, or vectors that overflowed: a cache refuses non-finite states, and training
stops at a non-finite loss or validation metric unless ``--nonfinite authors``) makes the metrics NaN, not
a number that looks like a result; a NaN score of another item counts as below the target's (a comparison
with NaN is false), and a target scored +inf (an overflow) ranks first, tied with the other items at +inf;
a target scored -inf counts as a miss, as a masked one does.

``evaluate_model`` runs it for a recommender: the item table once (``item_table``, every item through
the item encoder in chunks), then every user's vector against it. Under torchrun each rank ranks a
block of whole chunks and the blocks are gathered in order, so the numbers equal a single process's.

A target that repeats a history item is masked with the history, so it always counts as a miss (the
paper's protocol, 4-6 % of users); ``rank_repeated_targets=True`` keeps such targets rankable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import Config
from .console import progress_bar
from .data.batches import PixelSource, item_chunks
from .distributed import SINGLE, Dist, chunk_block, gather_rows
from .errors import EncoderError
from .metric_names import KS
from .model.recommender import Recommender, in_mode


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """ranks (U,) exact 1-based ranks, or (U, 2) ``[best, ties]`` from ``rank_targets`` (inf = never
    ranked) -> ``hit@K`` and ``ndcg@K`` averaged over users, each the expectation over the
    ``ties + 1`` equally likely places ``best .. best + ties``."""
    ranks = ranks.double()
    best, ties = (ranks, torch.zeros_like(ranks)) if ranks.dim() == 1 else (ranks[:, 0], ranks[:, 1])
    best = best.clamp(max=1e12)  # inf (a masked target) -> a place beyond every K
    last = best + ties  # (U,) the worst place the target can take
    # discount_sum[r] = sum of 1 / log2(j + 1) for j = 1..r (r = 0..max K)
    discounts = 1.0 / torch.log2(torch.arange(2, max(ks) + 2, dtype=torch.float64, device=ranks.device))
    discount_sum = torch.cat([discounts.new_zeros(1), discounts.cumsum(0)])
    out = {}
    for k in ks:
        # the places best..last that fall within the top k are lo+1..hi (none when hi == lo)
        lo = (best - 1).clamp(max=k).long()
        hi = last.clamp(max=k).long().clamp(min=lo)
        out[f"hit@{k}"] = ((hi - lo) / (ties + 1)).mean().item()
        out[f"ndcg@{k}"] = ((discount_sum[hi] - discount_sum[lo]) / (ties + 1)).mean().item()
    return out


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor,
                 rank_repeated_targets: bool = False, counts: torch.Tensor | None = None) -> torch.Tensor:
    """scores (U, N+1) over item indices (column 0 = padding), targets (U,), history (U, H) with 0 =
    padding -> (U, 2) float ``[best, ties]``: ``best = 1 + #(items scored higher)``, ``ties`` the other
    items scored the same, so the target's place is uniform in ``best .. best + ties``; a masked target
    gets ``[inf, 0]`` (a miss at every K). ``scores`` is overwritten (masked in place: one pass less
    over the largest array of evaluation); so is ``counts``, where given: a buffer of ``scores``' shape and
    ``count_dtype`` that the comparisons write into (else a new one)."""
    scores = scores if scores.dtype == torch.float64 else scores.float()  # (float64 scores keep their precision)
    target_score = scores.gather(1, targets[:, None])  # (U, 1)
    scores.scatter_(1, history, -math.inf)
    if rank_repeated_targets:
        scores.scatter_(1, targets[:, None], target_score)  # the target keeps its own score
    else:
        target_score = scores.gather(1, targets[:, None])  # -inf when the target repeats the history
    scores[:, 0] = -math.inf
    # Counted in floats the comparison writes straight into: summing its bool mask would first cast it to int64,
    # (U, N+1) x 8 bytes, the costliest pass of a CPU evaluation. A sum of 0s and 1s is exact below 2**24 items.
    ones = torch.empty_like(scores, dtype=count_dtype(scores.shape[1])) if counts is None else counts
    higher = torch.gt(scores, target_score, out=ones).sum(1).float()  # (U,)
    ties = torch.ge(scores, target_score, out=ones).sum(1).float() - higher - 1  # (U,) the target's own column excluded
    masked = torch.isneginf(target_score.squeeze(1))  # (a target scored +inf, an overflow, ranks among the +infs)
    best = torch.where(masked, torch.full_like(higher, math.inf), 1.0 + higher)
    return torch.stack([best, torch.where(masked, 0.0, ties)], dim=1)


def count_dtype(columns: int) -> torch.dtype:
    """What ``rank_targets`` counts items in: a sum of 0s and 1s in float32 is exact below 2**24 items."""
    return torch.float32 if columns < 2**24 else torch.float64


def score_ranks(score_fn, targets: np.ndarray, history: np.ndarray, batch_users: int = 1024,
                rank_repeated_targets: bool = False, device: torch.device | str = "cpu",
                progress: str = "") -> torch.Tensor:
    """``score_fn(slice) -> (u, N+1)`` scores for those users -> (U, 2) ranks (``rank_targets``),
    computed chunk by chunk; ``progress``: what a progress bar calls the work ('': none). The scores
    ``score_fn`` returns are overwritten (``rank_targets``): a slice of a matrix kept elsewhere, cloned."""
    # One tensor of ranks and one comparison buffer for every chunk. Each chunk's small ranks kept apart, between
    # its large new scratch arrays, pinned the CPU heap's freed memory (about 11 KB per user: 1.7 GB for 131k
    # users over 32k items); scratch freed each chunk, it is given back and paged in again (1.7x the time).
    ranks, counts = torch.empty(len(targets), 2, dtype=torch.float32), None
    chunks = [slice(start, start + batch_users) for start in range(0, len(targets), batch_users)]
    for sl in progress_bar(chunks, len(targets), desc=progress, unit="users", enabled=bool(progress),
                           size=lambda sl: len(targets[sl])):  # one update per chunk, after its ranks reach the CPU
        scores = score_fn(sl)
        if counts is None:  # the first chunk is the largest
            counts = torch.empty_like(scores, dtype=count_dtype(scores.shape[1]))
        ranks[sl] = rank_targets(scores, torch.as_tensor(targets[sl], device=device),
                                 torch.as_tensor(history[sl], device=device), rank_repeated_targets,
                                 counts[: len(scores)]).cpu()
    return ranks


def evaluate_scores(score_fn, targets: np.ndarray, history: np.ndarray, batch_users: int = 1024,
                    rank_repeated_targets: bool = False, device: torch.device | str = "cpu",
                    ks: tuple[int, ...] = KS) -> dict[str, float]:
    """The metrics at ``ks`` of ``score_ranks`` (its scores overwritten: return a new tensor from ``score_fn``).
    Item 0 is padding: ``targets`` and ``history`` hold item indices from 1, ``history`` 0 where it is padded."""
    ranks = score_ranks(score_fn, targets, history, batch_users, rank_repeated_targets, device)
    return metrics_from_ranks(ranks, ks)


@torch.no_grad()
def split_ranks(user_vectors, table: torch.Tensor, inputs: np.ndarray, targets: np.ndarray,
                history: np.ndarray, batch_users: int = 1024,
                rank_repeated_targets: bool = False, progress: str = "") -> torch.Tensor:
    """(U, 2) ranks of the targets (``rank_targets``). ``user_vectors(table, inputs (u, L)) -> (u, D)``;
    ``table`` (N+1, D); ``progress`` as ``score_ranks``'. In fp32, even inside a caller's autocast: a bf16
    score ties targets with other items, which changes hit@10."""
    table = table.float()
    product = None  # one (u, N+1) buffer of scores for every chunk (see score_ranks)

    def scores(sl):
        nonlocal product
        with torch.autocast(table.device.type, enabled=False):
            users = user_vectors(table, torch.as_tensor(inputs[sl], device=table.device)).float()  # (u, D)
            if product is None:  # the first chunk is the largest
                product = torch.empty(len(users), len(table), dtype=table.dtype, device=table.device)
            return torch.matmul(users, table.T, out=product[: len(users)])  # (u, N+1)

    return score_ranks(scores, targets, history, batch_users, rank_repeated_targets, table.device, progress)


def popularity_scores(train_sequences: np.ndarray, num_items: int) -> torch.Tensor:
    """(N+1,) train-part counts: the most-popular baseline's score for every item."""
    counts = np.bincount(train_sequences.ravel(), minlength=num_items + 1).astype(np.float32)
    counts[0] = 0
    return torch.from_numpy(counts)


def popularity_metrics(data, split: str, rank_repeated_targets: bool = False,
                       batch_users: int | None = None) -> dict[str, float]:
    """The most-popular baseline under the same protocol (history masked, same ranks and metrics), on the CPU in
    a CPU evaluation's chunks (``eval_chunk``'s: fewer users past 1M items): each holds two (chunk, items) float
    arrays."""
    _, targets, history = data.eval_split(split)
    pop = popularity_scores(data.train_sequences(), data.num_items)
    return evaluate_scores(lambda sl: pop[None, :].repeat(len(targets[sl]), 1), targets, history,
                           batch_users or users_per_chunk(torch.device("cpu"), data.num_items), rank_repeated_targets)


# --------------------------------------------------------------------------------------------------
# a recommender's item table and ranks


@torch.no_grad()
def item_table(model: Recommender, num_items: int, chunk: int, pixels: PixelSource | None,
               device: torch.device, ids: np.ndarray | None = None, progress: bool = False,
               width: int | None = None) -> torch.Tensor:
    """(N+1, D) embeddings of every item (or of the items ``ids``), computed once per evaluation, in fp32
    whatever precision training ran in; with ``progress``, a bar (or log lines) while the items go through
    the item encoder, minutes for a live feed on a CPU. The model is in eval mode while it runs, and back in
    its own mode after (a caller's training loop goes on with its dropout). Each chunk is written into the
    table as it comes (a list of chunks and their cat held the table twice: 0.5 GB at 1M items of width 64).
    ``width``: D, or None to take the first chunk's; a chunk of another shape than (its items, D) is an
    ``EncoderError``."""
    table, done = None, 0
    ids = np.arange(num_items + 1) if ids is None else ids
    # one bar update per chunk, which waits for nothing on a GPU (the chunk's size is known beforehand)
    with in_mode(model, training=False):
        for batch in progress_bar(item_chunks(ids, chunk, pixels), len(ids), desc="encoding items", unit="items",
                                  enabled=progress, size=lambda batch: len(batch.ids)):
            with torch.autocast(device.type, enabled=False):  # fp32 even inside a caller's autocast
                rows = model.item_encoder(batch.to(device)).float()  # (n, D)
            _check_rows(rows, len(batch.ids), width if table is None else table.shape[1])
            if table is None:
                table = rows.new_empty((len(ids), rows.shape[1]))
            table[done:done + len(rows)] = rows
            done += len(rows)
    return table


def _check_rows(rows: torch.Tensor, items: int, width: int | None) -> None:
    """An item encoder's output for a chunk of ``items`` must be (items, width) (any width where None). Unchecked,
    fewer rows (one meant to broadcast among them) leave the table's last rows as unwritten memory without a word,
    and more rows or another width fail in the copy with torch's broadcast error. Shapes only: no wait for a GPU."""
    if rows.dim() == 2 and len(rows) == items and width in (None, rows.shape[1]):
        return
    two_d = rows.dim() == 2
    came = f"{_rows(len(rows))} of width {rows.shape[1]}" if two_d else f"a tensor of shape {tuple(rows.shape)}"
    width = rows.shape[1] if width is None and two_d else width  # (the first chunk, which decides the width)
    wanted = _rows(items) + ("" if width is None else f" of width {width}")
    raise EncoderError(f"the item encoder returned {came} for a chunk of {items} items; expected {wanted}")


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


@torch.no_grad()
def shared_item_table(model: Recommender, num_items: int, cfg: Config, pixels: PixelSource | None,
                      device: torch.device, dist: Dist = SINGLE) -> torch.Tensor:
    """``item_table`` with the work split across ranks in whole chunks; every rank gets the whole table."""
    progress = cfg.progress and dist.is_main  # the main rank's part stands for all
    if not dist.enabled:
        return item_table(model, num_items, cfg.encode_batch_size, pixels, device, progress=progress,
                          width=cfg.embedding_dim)
    lo, hi = chunk_block(num_items + 1, cfg.encode_batch_size, dist)
    part = item_table(model, num_items, cfg.encode_batch_size, pixels, device, ids=np.arange(lo, hi),
                      progress=progress, width=cfg.embedding_dim) if hi > lo else \
        torch.zeros(0, cfg.embedding_dim, device=device)
    return gather_rows(part, dist)


@torch.no_grad()
def evaluate_ranks(model: Recommender, data, split: str, cfg: Config, device: torch.device,
                   pixels: PixelSource | None = None, table: torch.Tensor | None = None,
                   dist: Dist = SINGLE) -> torch.Tensor:
    """(users, 2) target ranks (``rank_targets``) in user order. Under torchrun each rank ranks a block of whole
    evaluation chunks and the blocks are gathered in order: every user exactly once, and the same
    numbers as one process computes. Eval mode while it runs, as ``item_table``."""
    inputs, targets, history = data.eval_split(split)
    chunk = eval_chunk(cfg, device, data.num_items)
    lo, hi = chunk_block(len(targets), chunk, dist)
    with in_mode(model, training=False):
        if table is None:
            table = shared_item_table(model, data.num_items, cfg, pixels, device, dist)
        ranks = split_ranks(model.user_vectors, table, inputs[lo:hi], targets[lo:hi], history[lo:hi], chunk,
                            cfg.rank_repeated_targets, f"ranking {split}" if cfg.progress and dist.is_main else "")
    ranks = gather_rows(ranks.to(table.device), dist).cpu()
    if len(ranks) != len(targets):
        raise RuntimeError(f"evaluation gathered {len(ranks)} ranks for {len(targets)} users")
    return ranks


SCORES_PER_CHUNK = 2**27  # a default chunk's (users, items) scores at most: 512 MiB in fp32


def eval_chunk(cfg: Config, device: torch.device, items: int) -> int:
    """Users per evaluation chunk: ``--eval-batch-size``, or 2048 on CUDA and 128 elsewhere, fewer where so many
    items would make a chunk's scores more than ``SCORES_PER_CHUNK`` (a GPU past 65k items, a CPU past 1M)."""
    return cfg.eval_batch_size or users_per_chunk(device, items)


def users_per_chunk(device: torch.device, items: int) -> int:
    """``eval_chunk``'s default."""
    return max(1, min(2048 if device.type == "cuda" else 128, SCORES_PER_CHUNK // (items + 1)))


def evaluate_model(model: Recommender, data, split: str, cfg: Config, device: torch.device,
                   pixels: PixelSource | None = None, table: torch.Tensor | None = None,
                   dist: Dist = SINGLE) -> dict[str, float]:
    return metrics_from_ranks(evaluate_ranks(model, data, split, cfg, device, pixels, table, dist))
